from __future__ import annotations

from django.core.management.base import CommandError

from billing.pruning import prune_ledger
from keyaos.lib.commands import OperatorCommand


class Command(OperatorCommand):
    help = (
        "Delete ledger rows (and their attempts) older than DAYS days, after adding them to the "
        "daily totals (Billing > Daily usage), so spend per day, key and model is kept."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--older-than", type=int, required=True, metavar="DAYS")
        parser.add_argument("--batch-size", type=int, default=1000)

    def handle(self, *args, **options) -> None:
        days, batch_size = options["older_than"], options["batch_size"]
        if days < 1:
            raise CommandError("--older-than must be at least 1 day.")
        if batch_size < 1:
            raise CommandError("--batch-size must be at least 1.")
        result = prune_ledger(older_than_days=days, batch_size=batch_size)
        cutoff = f"{result.cutoff:%Y-%m-%d %H:%M} UTC"
        if not result.rows:
            self.stdout.write(f"No ledger rows older than {days} days (before {cutoff}).")
            return
        self.stdout.write(
            f"Pruned {result.rows} ledger rows and {result.attempts} attempts older than {days} "
            f"days (before {cutoff}), over {len(result.days)} day(s): "
            f"{result.groups_created} daily totals created, {result.groups_updated} added to."
        )

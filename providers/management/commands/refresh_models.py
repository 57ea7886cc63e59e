"""``manage.py refresh_models``: the same refresh as the schedule and the admin button."""

from __future__ import annotations

import logging

from django.core.management.base import CommandError

from keyaos.lib.commands import OperatorCommand
from providers.models import RefreshResult, RefreshRun
from providers.refresh import UnknownProvider, describe, refresh_providers


class Command(OperatorCommand):
    help = "Refresh the model catalog, prices and balances of every enabled provider."

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--provider", metavar="SLUG", help="Refresh only this provider (even if disabled)."
        )

    def handle(self, *args, provider: str | None = None, **options) -> None:
        # This command prints each provider's line itself; below -v 2 the log would repeat it.
        logger = logging.getLogger("providers.refresh")
        level = logger.level
        if options["verbosity"] < 2:
            logger.setLevel(logging.ERROR)
        try:
            self.refresh(provider)
        finally:
            logger.setLevel(level)

    def refresh(self, provider: str | None) -> None:
        try:
            run = refresh_providers(
                trigger=RefreshRun.Trigger.COMMAND, provider_slug=provider, progress=self.report
            )
        except UnknownProvider as exc:
            raise CommandError(str(exc)) from None
        refreshed = run.results.count()
        if not refreshed:
            self.stdout.write("No enabled provider to refresh.")
            return
        if run.error_count:
            raise CommandError(
                f"{run.error_count} of {refreshed} provider(s) failed; their offers were left "
                "as they were."
            )
        self.stdout.write(self.style.SUCCESS(run.summary()))

    def report(self, result: RefreshResult) -> None:
        line = describe(result)
        if result.error:
            line = self.style.ERROR(line)
        elif result.unpriced_models:
            line = self.style.WARNING(line)
        self.stdout.write(line)

from __future__ import annotations

from django.core.management.base import CommandError

from billing.currency import UnknownCurrency, usd_per_unit
from keyaos.lib.commands import OperatorCommand
from providers import services
from providers.presets import PRESETS


class Command(OperatorCommand):
    help = "Add an upstream provider from a preset (openai-compatible: any other /v1 API)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("slug", help="Short unique name, e.g. openrouter or moonshot.")
        parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
        parser.add_argument("--base-url", help="Overrides the preset's; required for a custom one.")
        parser.add_argument("--currency", help="Three-letter code the provider bills in.")
        parser.add_argument("--name", help="Display name (default: the preset's).")

    def handle(self, *args, **options) -> None:
        try:
            provider = services.create_provider(
                slug=options["slug"],
                preset=options["preset"],
                base_url=options["base_url"],
                currency=options["currency"],
                name=options["name"],
            )
        except services.SetupError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(
            f"Added provider {provider.slug} ({provider.name}) at {provider.base_url}, "
            f"billing in {provider.currency}."
        )
        from providers.tasks import queue_first_refresh

        queue_first_refresh(provider.slug)
        self.stdout.write(
            "Its first refresh (catalog, prices, balances) is queued: the task cluster of "
            "`make run` runs it within seconds (`manage.py refresh_models --provider "
            f"{provider.slug}` runs it now). Add its key with add_upstream_key."
        )
        seeded = provider.offers.count()
        if seeded:
            self.stdout.write(f"Seeded {seeded} manual price(s); change them with set_price.")
        elif PRESETS[options["preset"]].seed_prices:
            self.stderr.write(
                self.style.WARNING(
                    f"The preset's seed prices are not in {provider.currency}: "
                    f"set this provider's prices with set_price."
                )
            )
        try:
            usd_per_unit(provider.currency)
        except UnknownCurrency:
            self.stderr.write(
                self.style.WARNING(
                    f"There is no exchange rate for {provider.currency}: costs in it cannot be "
                    "converted to USD until you add one under Billing > Currency rates."
                )
            )

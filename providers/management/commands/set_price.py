from __future__ import annotations

from django.core.management.base import CommandError

from keyaos.lib.commands import OperatorCommand
from providers import services
from providers.models import Provider


class Command(OperatorCommand):
    help = (
        "Set a model's price per 1M tokens in the provider's currency. A price set here is kept "
        "by every refresh."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("provider", help="The provider's slug.")
        parser.add_argument(
            "model",
            help="The provider's own model id (deepseek-chat) or the canonical id it serves "
            "(deepseek/deepseek-chat).",
        )
        parser.add_argument("--input", required=True, help="Input (prompt) price per 1M tokens.")
        parser.add_argument("--output", required=True, help="Output price per 1M tokens.")
        parser.add_argument("--cached-input", help="Cached input price per 1M tokens.")
        parser.add_argument(
            "--create",
            action="store_true",
            help="Add the model even though the provider's catalog does not list it.",
        )

    def handle(self, *args, **options) -> None:
        provider = Provider.objects.filter(slug=options["provider"]).first()
        if provider is None:
            raise CommandError(f"There is no provider {options['provider']!r} (see add_provider).")
        try:
            cached = None
            if options["cached_input"] is not None:
                cached = services.parse_amount(options["cached_input"], what="--cached-input")
            offer = services.set_price(
                provider=provider,
                model=options["model"],
                input_per_mtok=services.parse_amount(options["input"], what="--input"),
                output_per_mtok=services.parse_amount(options["output"], what="--output"),
                cached_input_per_mtok=cached,
                create=options["create"],
            )
        except services.SetupError as exc:
            raise CommandError(str(exc)) from None
        cached_text = f", cached input {cached}" if cached is not None else ""
        self.stdout.write(
            f"{offer.canonical_id} on {provider.slug} ({offer.upstream_model_id}): "
            f"input {offer.input_price_per_mtok}, output {offer.output_price_per_mtok}"
            f"{cached_text} {provider.currency} per 1M tokens."
        )

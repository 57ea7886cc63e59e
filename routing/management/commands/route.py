from __future__ import annotations

from django.core.management.base import CommandError

from keyaos.lib.commands import OperatorCommand
from routing.dispatcher import AmbiguousModel, ModelNotFound, ProviderPreferences
from routing.explain import explain_route


class Command(OperatorCommand):
    help = "Explain how a request for MODEL would be routed: every candidate and every exclusion."

    def add_arguments(self, parser) -> None:
        parser.add_argument("model")
        parser.add_argument("--prompt-tokens", type=int, default=1000)
        parser.add_argument("--max-tokens", type=int, default=None)
        parser.add_argument("--only", default="", help="Comma-separated provider slugs.")
        parser.add_argument("--ignore", default="", help="Comma-separated provider slugs.")
        parser.add_argument(
            "--cached-key",
            default="",
            help="Rank as if this key (name or id) had just served the conversation.",
        )
        parser.add_argument(
            "--cached-tokens",
            type=int,
            default=0,
            help="Prompt tokens it served then (default: --prompt-tokens).",
        )

    def handle(self, *args, **options) -> None:
        preferences = ProviderPreferences(
            only=frozenset(_slugs(options["only"])), ignore=frozenset(_slugs(options["ignore"]))
        )
        try:
            explanation = explain_route(
                options["model"],
                prompt_tokens=options["prompt_tokens"],
                output_tokens=options["max_tokens"],
                preferences=preferences,
                cached_key=options["cached_key"],
                cached_tokens=options["cached_tokens"],
            )
        except ValueError as error:
            raise CommandError(str(error)) from None
        except ModelNotFound:
            raise CommandError(f"No active offer serves {options['model']!r}.") from None
        except AmbiguousModel as error:
            raise CommandError(str(error)) from None
        self.stdout.write("\n".join(explanation.lines()))


def _slugs(value: str) -> list[str]:
    return [slug.strip().lower() for slug in value.split(",") if slug.strip()]

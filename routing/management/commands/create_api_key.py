from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from billing.models import ApiKey


class Command(BaseCommand):
    help = "Create a client API key for /v1. The key is printed once, as the last line."

    def add_arguments(self, parser) -> None:
        parser.add_argument("name")

    def handle(self, *args, **options) -> None:
        name = options["name"].strip()
        if not name:
            raise CommandError("The key needs a name.")
        api_key, plain = ApiKey.create_key(name=name)
        self.stdout.write(
            f"Created client key #{api_key.pk} {api_key.name!r}. "
            "Copy it now: it is stored only as a hash and cannot be shown again."
        )
        self.stdout.write(plain)

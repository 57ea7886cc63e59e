from __future__ import annotations

import getpass
import os
import sys

from django.core.management.base import CommandError

from keyaos.lib.commands import OperatorCommand
from providers import services
from providers.models import Provider


class Command(OperatorCommand):
    help = (
        "Add an upstream API key to a provider. The secret is read from standard input (or from "
        "the environment variable named by --secret-env), never from the command line."
    )
    stealth_options = ("stdin",)

    def add_arguments(self, parser) -> None:
        parser.add_argument("provider", help="The provider's slug.")
        parser.add_argument("--label", default="", help="A name for the key, shown in the admin.")
        parser.add_argument(
            "--multiplier",
            default="1",
            help="Real cost relative to list price: 0.8 for discounted credits, 0 for free ones.",
        )
        parser.add_argument(
            "--balance", help="Credit left, in the provider's currency (default: unknown)."
        )
        parser.add_argument(
            "--secret-env", metavar="VAR", help="Read the secret from this environment variable."
        )

    def handle(self, *args, **options) -> None:
        provider = Provider.objects.filter(slug=options["provider"]).first()
        if provider is None:
            raise CommandError(f"There is no provider {options['provider']!r} (see add_provider).")
        try:
            multiplier = services.parse_amount(options["multiplier"], what="--multiplier")
            balance = None
            if options["balance"] is not None:
                balance = services.parse_amount(options["balance"], what="--balance")
            secret = self.read_secret(options)
            key = services.add_upstream_key(
                provider=provider,
                secret=secret,
                label=options["label"],
                multiplier=multiplier,
                balance=balance,
            )
        except services.SetupError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"Added key #{key.pk} ({key.secret_masked}) to {provider.slug}.")
        if key.balance_source == key.BalanceSource.AUTO:
            self.stdout.write("Its balance will be read on the next refresh.")

    def read_secret(self, options) -> str:
        variable = options["secret_env"]
        if variable:
            if variable not in os.environ:
                raise CommandError(f"The environment variable {variable} is not set.")
            secret = os.environ[variable].strip()
            if not secret:
                raise CommandError(f"The environment variable {variable} is empty.")
            return secret
        stream = options.get("stdin") or sys.stdin
        if stream.isatty():
            secret = getpass.getpass("Secret (input hidden): ")
        else:
            secret = stream.readline()
        secret = secret.strip()
        if not secret:
            raise CommandError(
                "The secret is empty: pipe it on standard input or use --secret-env."
            )
        return secret

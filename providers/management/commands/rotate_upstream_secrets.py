from __future__ import annotations

from django.core.management.base import CommandError

from keyaos.lib.commands import OperatorCommand
from providers import services
from providers.crypto import SecretDecryptionError


class Command(OperatorCommand):
    help = (
        "Re-encrypt every upstream secret with the first key of KEYAOS_ENCRYPTION_KEYS. Put the "
        "new key first, run this, then remove the old key."
    )

    def handle(self, *args, **options) -> None:
        try:
            count = services.rotate_upstream_secrets()
        except SecretDecryptionError as exc:
            raise CommandError(f"{exc} Nothing was changed.") from None
        self.stdout.write(f"Re-encrypted {count} upstream secret(s) with the current key.")

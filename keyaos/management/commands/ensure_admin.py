"""Create the first superuser, so a new install can log in to the admin; idempotent.

``make run`` calls it on every start. Once any superuser exists it does nothing.
"""

from __future__ import annotations

import secrets

from django.contrib.auth import get_user_model, password_validation
from django.core.exceptions import ValidationError
from django.core.management.base import CommandError

from keyaos.env import env_str
from keyaos.lib.commands import OperatorCommand

MIN_PASSWORD_LENGTH = 8


def generate_admin_password() -> str:
    return secrets.token_urlsafe(18)


class Command(OperatorCommand):
    help = (
        "Create a superuser from KEYAOS_ADMIN_USER (default 'admin'), KEYAOS_ADMIN_PASSWORD "
        "(generated and printed once when unset) and KEYAOS_ADMIN_EMAIL, unless one exists."
    )

    def handle(self, *args, **options) -> None:
        user_model = get_user_model()
        if user_model.objects.filter(is_superuser=True).exists():
            if options["verbosity"] >= 2:
                self.stdout.write("A superuser exists; nothing to do.")
            return

        username = env_str("KEYAOS_ADMIN_USER") or "admin"
        email = env_str("KEYAOS_ADMIN_EMAIL") or ""
        password = env_str("KEYAOS_ADMIN_PASSWORD") or ""
        if password:
            self._validate(password, user_model(username=username, email=email))
        if user_model.objects.filter(username=username).exists():
            raise CommandError(
                f"A user named {username!r} exists but is not a superuser. Set KEYAOS_ADMIN_USER "
                "to another name, or promote that user in the admin or with `manage.py shell`."
            )

        generated = not password
        if generated:
            password = generate_admin_password()
        user_model.objects.create_superuser(username=username, email=email, password=password)

        if generated:
            self.stdout.write(
                self.style.WARNING(
                    f"Created admin user {username!r} with password: {password}  "
                    "(shown once; change it in the admin)"
                )
            )
            self.stdout.write(
                f"Lost it? `.venv/bin/python manage.py changepassword {username}` sets a new one "
                "(this command never changes an existing admin's password)."
            )
        else:
            self.stdout.write(f"Created admin user {username!r} from KEYAOS_ADMIN_PASSWORD.")

    def _validate(self, password: str, user) -> None:
        if len(password) < MIN_PASSWORD_LENGTH:
            raise CommandError(
                f"KEYAOS_ADMIN_PASSWORD must be at least {MIN_PASSWORD_LENGTH} characters long "
                "(or unset it to have a strong one generated)."
            )
        try:
            password_validation.validate_password(password, user)
        except ValidationError as error:
            raise CommandError(f"KEYAOS_ADMIN_PASSWORD is rejected: {' '.join(error)}") from None

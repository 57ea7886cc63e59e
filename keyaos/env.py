"""Strict readers for settings that come from the environment.

A malformed value raises ``ImproperlyConfigured`` naming the variable, instead of falling back to a
default that would hide the mistake.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import secrets
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

TRUE_VALUES = {"1", "true", "yes", "on"}
FALSE_VALUES = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return default if value is None else value.strip()


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in TRUE_VALUES:
        return True
    if lowered in FALSE_VALUES:
        return False
    raise ImproperlyConfigured(f"{name} must be one of true/false/1/0/yes/no/on/off, not {value!r}")


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    return _env_number(name, default, int, "an integer", minimum)


def env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    return _env_number(name, default, float, "a number", minimum)


def _env_number[N: (int, float)](
    name: str, default: N, parse: Callable[[str], N], kind: str, minimum: N | None
) -> N:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        number = parse(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be {kind}, not {value!r}") from None
    if not math.isfinite(number):
        raise ImproperlyConfigured(f"{name} must be a finite number, not {value!r}")
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, not {number}")
    return number


def env_decimal(name: str, default: str, *, minimum: Decimal = Decimal(0)) -> Decimal:
    value = os.environ.get(name)
    try:
        number = Decimal(value.strip() if value and value.strip() else default)
    except InvalidOperation:
        raise ImproperlyConfigured(f"{name} must be a decimal number, not {value!r}") from None
    if not number.is_finite() or number < minimum:
        raise ImproperlyConfigured(f"{name} must be a number of at least {minimum}, not {value!r}")
    return number


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = (os.environ.get(name) or "").strip().lower() or default
    if value not in choices:
        raise ImproperlyConfigured(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name)
    if value is None:
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


def writable_directory(name: str, path: Path) -> Path:
    """``path``, created (mode 0700) if missing; stops start-up when this user cannot write it."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise ImproperlyConfigured(f"{name}: cannot create {path}: {error.strerror}") from None
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise ImproperlyConfigured(f"{name}: {path} is not a directory this user can write to")
    return path


def read_or_create_state_file(path: Path, generate) -> str:
    """Return the secret kept in ``path``, creating it (mode 0600) on first use.

    Only the embedded default (no ``DATABASE_URL``) uses this, so a first ``make run`` needs no
    environment and ``manage.py`` in another terminal sees the same keys.
    """
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    return value


def generate_secret_key() -> str:
    return secrets.token_urlsafe(50)


def generate_fernet_key() -> str:
    """What ``Fernet.generate_key()`` makes, without importing ``cryptography`` at start-up."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def is_fernet_key(key: str) -> bool:
    """The check ``Fernet(key)`` makes: 32 bytes, url-safe base64."""
    try:
        return len(base64.urlsafe_b64decode(key.encode())) == 32
    except (binascii.Error, ValueError):
        return False

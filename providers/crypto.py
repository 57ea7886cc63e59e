"""Encryption of upstream secrets at rest, and their masked display.

``KEYAOS_ENCRYPTION_KEYS`` holds one or more Fernet keys: the first encrypts, all of them decrypt,
so a key is rotated by putting a new one first, running ``manage.py rotate_upstream_secrets`` and
then dropping the old one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings


class SecretDecryptionError(Exception):
    """No configured encryption key can decrypt a stored secret."""


@cache
def _fernet(keys: tuple[str, ...]) -> MultiFernet:
    return MultiFernet([Fernet(key) for key in keys])


def current_fernet() -> MultiFernet:
    return _fernet(tuple(settings.KEYAOS_ENCRYPTION_KEYS))


def encrypt_secret(plain: str) -> str:
    return current_fernet().encrypt(plain.encode()).decode()


def decrypt_secret(token: str) -> str:
    with _decrypting():
        return current_fernet().decrypt(token.encode()).decode()


def reencrypt_secret(token: str) -> str:
    """Re-encrypt ``token`` with the first (current) key."""
    with _decrypting():
        return current_fernet().rotate(token.encode()).decode()


@contextmanager
def _decrypting() -> Iterator[None]:
    try:
        yield
    except InvalidToken:
        raise SecretDecryptionError(
            "cannot decrypt an upstream secret: is its key missing from KEYAOS_ENCRYPTION_KEYS?"
        ) from None


def secret_fingerprint(plain: str) -> str:
    """A SHA-256 of the secret, used to find duplicates without decrypting every key."""
    return hashlib.sha256(plain.encode()).hexdigest()


def mask_secret(plain: str) -> str:
    """``sk-or-v1-abcd...wxyz`` becomes ``sk-or-...wxyz``: enough to recognise, never to use."""
    if len(plain) <= 12:
        return "..." + plain[-2:] if len(plain) > 4 else "****"
    prefix = plain[: plain.find("-", 3) + 1] if "-" in plain[3:8] else plain[:3]
    return f"{prefix[:6]}...{plain[-4:]}"

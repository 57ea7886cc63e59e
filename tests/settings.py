"""Test settings: the real settings, with throwaway keys when the environment gives none."""

import os
import tempfile

from cryptography.fernet import Fernet

os.environ.setdefault("SECRET_KEY", "test-" + "x" * 40)
os.environ.setdefault("KEYAOS_ENCRYPTION_KEYS", Fernet.generate_key().decode())
os.environ.setdefault("KEYAOS_STATE_DIR", os.path.join(tempfile.gettempdir(), "keyaos-test-state"))

from keyaos.settings import *  # noqa: E402,F403

STORAGES["staticfiles"] = {  # noqa: F405
    "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
KEYAOS_SNAPSHOT_POLL_S = 0.1

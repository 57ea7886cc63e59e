"""Test settings: the real settings, with throwaway keys when the environment gives none."""

import atexit
import os
import shutil
import tempfile

from cryptography.fernet import Fernet

os.environ.setdefault("SECRET_KEY", "test-" + "x" * 40)
os.environ.setdefault("KEYAOS_ENCRYPTION_KEYS", Fernet.generate_key().decode())
# Each test run gets its own state folder (and SQLite test database), so runs never collide.
if "KEYAOS_STATE_DIR" not in os.environ:
    os.environ["KEYAOS_STATE_DIR"] = tempfile.mkdtemp(prefix="keyaos-test-")
    atexit.register(shutil.rmtree, os.environ["KEYAOS_STATE_DIR"], ignore_errors=True)

from keyaos.settings import *  # noqa: F403

STORAGES["staticfiles"] = {  # noqa: F405
    "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
KEYAOS_SNAPSHOT_POLL_S = 0.1
# Tests never reach the internet: a test that wants the public identity source points it at the fake.
KEYAOS_IDENTITY_SOURCE_URL = ""

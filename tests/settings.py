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

# On PostgreSQL the spool folder must be named; it is not exported, so that a gateway a test
# starts in another process never shares this one's spool (each needs its own).
_SPOOL = "KEYAOS_LEDGER_SPOOL_DIR"
_spool_given = _SPOOL in os.environ
os.environ.setdefault(_SPOOL, os.path.join(os.environ["KEYAOS_STATE_DIR"], "spool"))
try:
    from keyaos.settings import *  # noqa: F403
finally:
    if not _spool_given:
        del os.environ[_SPOOL]

STORAGES["staticfiles"] = {  # noqa: F405
    "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
KEYAOS_SNAPSHOT_POLL_S = 0.1
# Tests never reach the internet: a test that wants the public identity source points it at the fake.
KEYAOS_IDENTITY_SOURCE_URL = ""

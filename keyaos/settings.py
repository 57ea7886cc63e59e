"""Keyaos settings, read from the environment (see README, "Settings").

With no environment at all, Keyaos runs embedded: a SQLite file, and a generated secret key and
encryption key, all kept in the git-ignored ``var/`` folder (``KEYAOS_STATE_DIR``). With
``DATABASE_URL`` set (production), ``SECRET_KEY`` and ``KEYAOS_ENCRYPTION_KEYS`` must come from the
environment too: a missing or malformed value stops start-up with a clear error.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from keyaos.env import (
    env_bool,
    env_choice,
    env_decimal,
    env_float,
    env_int,
    env_list,
    env_str,
    generate_fernet_key,
    generate_secret_key,
    is_fernet_key,
    read_or_create_state_file,
    writable_directory,
)
from keyaos.lib.logs import logging_config

BASE_DIR = Path(__file__).resolve().parent.parent
STATE_DIR = Path(env_str("KEYAOS_STATE_DIR") or BASE_DIR / "var")
DATABASE_URL = env_str("DATABASE_URL") or ""
EMBEDDED = not DATABASE_URL

DEBUG = env_bool("DEBUG", False)


def _required_secret(name: str, generate) -> str:
    value = env_str(name)
    if value:
        return value
    if EMBEDDED:
        return read_or_create_state_file(STATE_DIR / name.lower(), generate)
    raise ImproperlyConfigured(
        f"{name} is not set. It is required when DATABASE_URL is set (production); "
        "see README, 'Settings'."
    )


SECRET_KEY = _required_secret("SECRET_KEY", generate_secret_key)
if len(SECRET_KEY) < 32:
    raise ImproperlyConfigured("SECRET_KEY must be at least 32 characters long.")

# Comma-separated Fernet keys: the first encrypts, every one decrypts (rotation: README).
KEYAOS_ENCRYPTION_KEYS = [
    key.strip()
    for key in _required_secret("KEYAOS_ENCRYPTION_KEYS", generate_fernet_key).split(",")
    if key.strip()
]
if not KEYAOS_ENCRYPTION_KEYS:
    raise ImproperlyConfigured("KEYAOS_ENCRYPTION_KEYS is empty.")
for _index, _key in enumerate(KEYAOS_ENCRYPTION_KEYS):
    if not is_fernet_key(_key):
        raise ImproperlyConfigured(
            f"KEYAOS_ENCRYPTION_KEYS entry #{_index + 1} is not a valid Fernet key "
            "(32 url-safe base64-encoded bytes; make one with "
            "`python -c 'from cryptography.fernet import Fernet; "
            "print(Fernet.generate_key().decode())'`)."
        )

# The reverse proxies whose X-Forwarded-For/-Proto headers `manage.py serve` lets uvicorn trust;
# empty: none (the connection's peer address is the client's).
FORWARDED_ALLOW_IPS = ",".join(env_list("FORWARDED_ALLOW_IPS", []))
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "keyaos.apps.KeyaosAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django_q",
    "keyaos",
    "providers",
    "billing",
    "routing",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

# A new client key is shown once in a message: keep messages server-side, not in a cookie.
MESSAGE_STORAGE = "django.contrib.messages.storage.session.SessionStorage"

ROOT_URLCONF = "keyaos.urls"
ASGI_APPLICATION = "keyaos.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "keyaos" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

if EMBEDDED:
    STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": STATE_DIR / "keyaos.sqlite3",
            "OPTIONS": {
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
            "TEST": {"NAME": STATE_DIR / "test.sqlite3"},
        }
    }
else:
    _database = dj_database_url.parse(DATABASE_URL, conn_max_age=0)
    if _database["ENGINE"] == "django.db.backends.postgresql":
        # Persistent connections leak under ASGI (one per thread); Django's pool does not.
        _database.setdefault("OPTIONS", {})["pool"] = {
            "min_size": env_int("KEYAOS_DB_POOL_MIN", 2, minimum=0),
            "max_size": env_int("KEYAOS_DB_POOL_MAX", 10, minimum=1),
            "timeout": 10,
        }
    DATABASES = {"default": _database}

REDIS_URL = env_str("REDIS_URL") or ""
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "keyaos",
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE") or "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
if DEBUG:
    STORAGES["staticfiles"] = {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}

if not DEBUG and env_bool("KEYAOS_HTTPS", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True

# WhiteNoise serves admin assets with sync iterators; under ASGI Django warns on each one.
warnings.filterwarnings(
    "ignore", message="StreamingHttpResponse must consume synchronous iterators"
)

KEYAOS_LOG_FORMAT = env_choice("KEYAOS_LOG_FORMAT", "plain", ("plain", "json"))
LOGGING = logging_config(log_format=KEYAOS_LOG_FORMAT, level=env_str("LOG_LEVEL") or "INFO")
# Python's warnings would reach stderr as plain text: make them log records (JSON lines) too.
logging.captureWarnings(KEYAOS_LOG_FORMAT == "json")

# The task queue's broker: Redis when configured (shared by every machine's cluster), else the
# database. The 5-minute schedule lives in the database either way; each cluster's scheduler
# takes due schedules under SELECT ... FOR UPDATE, so several clusters run each refresh once.
Q_CLUSTER = {
    "name": "keyaos",
    **({"redis": REDIS_URL} if REDIS_URL else {"orm": "default"}),
    "workers": env_int("KEYAOS_Q_WORKERS", 1, minimum=1),
    "timeout": 240,
    "retry": 300,
    "max_attempts": 1,
    "poll": 2,
    "catch_up": False,
    "save_limit": 200,
    "ack_failures": True,
}

# Gateway behaviour (README, "Settings").
KEYAOS_ADMIN_TOKEN = env_str("KEYAOS_ADMIN_TOKEN") or ""
KEYAOS_REFRESH_MINUTES = env_int("KEYAOS_REFRESH_MINUTES", 5, minimum=1)
KEYAOS_MAX_ATTEMPTS = env_int("KEYAOS_MAX_ATTEMPTS", 3, minimum=1)
KEYAOS_DEFAULT_MAX_TOKENS = env_int("KEYAOS_DEFAULT_MAX_TOKENS", 1024, minimum=1)
KEYAOS_MAX_BODY_BYTES = env_int("KEYAOS_MAX_BODY_BYTES", 10 * 1024 * 1024, minimum=1024)
KEYAOS_CONNECT_TIMEOUT_S = env_float("KEYAOS_CONNECT_TIMEOUT_S", 10.0)
KEYAOS_READ_TIMEOUT_S = env_float("KEYAOS_READ_TIMEOUT_S", 300.0)
KEYAOS_FETCH_TIMEOUT_S = env_float("KEYAOS_FETCH_TIMEOUT_S", 20.0)
KEYAOS_SNAPSHOT_POLL_S = env_float("KEYAOS_SNAPSHOT_POLL_S", 0.5)
KEYAOS_TRANSIENT_COOLDOWN_S = env_float("KEYAOS_TRANSIENT_COOLDOWN_S", 5.0)
KEYAOS_MAX_COOLDOWN_S = env_float("KEYAOS_MAX_COOLDOWN_S", 300.0)
KEYAOS_RATE_LIMIT_COOLDOWN_S = env_float("KEYAOS_RATE_LIMIT_COOLDOWN_S", 30.0)
KEYAOS_HEALTH_WINDOW_S = env_int("KEYAOS_HEALTH_WINDOW_S", 10, minimum=1)
KEYAOS_TRIP_MIN_FAILURES = env_int("KEYAOS_TRIP_MIN_FAILURES", 3, minimum=1)
KEYAOS_TRIP_FAILURE_RATIO = env_float("KEYAOS_TRIP_FAILURE_RATIO", 0.5)
KEYAOS_BODY_TIMEOUT_S = env_float("KEYAOS_BODY_TIMEOUT_S", 60.0, minimum=0.1)
DATA_UPLOAD_MAX_MEMORY_SIZE = KEYAOS_MAX_BODY_BYTES
KEYAOS_LOW_BALANCE_USD = env_decimal("KEYAOS_LOW_BALANCE_USD", "1")
# Where published model ids come from when no OpenRouter provider is configured; "" turns it off.
KEYAOS_IDENTITY_SOURCE_URL = env_str(
    "KEYAOS_IDENTITY_SOURCE_URL", "https://openrouter.ai/api/v1/models"
)
# Client key limit counters in Redis: how long one call may take, how often to retry after failure.
KEYAOS_REDIS_TIMEOUT_S = env_float("KEYAOS_REDIS_TIMEOUT_S", 0.5, minimum=0.01)
KEYAOS_REDIS_RETRY_S = env_float("KEYAOS_REDIS_RETRY_S", 2.0, minimum=0.1)

# Operations (README, "Deployment").
KEYAOS_METRICS = env_bool("KEYAOS_METRICS", True)
KEYAOS_METRICS_TOKEN = env_str("KEYAOS_METRICS_TOKEN") or ""
KEYAOS_DRAIN_S = env_float("KEYAOS_DRAIN_S", 600.0)
KEYAOS_DRAIN_NOTICE_S = env_float("KEYAOS_DRAIN_NOTICE_S", 5.0)

# The ledger's spool (README, "What survives a crash"): embedded, in the state folder; in
# production an explicit directory on a local disk, since it holds the record of money spent.
_spool_dir = env_str("KEYAOS_LEDGER_SPOOL_DIR")
if not _spool_dir and not EMBEDDED:
    raise ImproperlyConfigured(
        "KEYAOS_LEDGER_SPOOL_DIR is not set. It is required when DATABASE_URL is set (production): "
        "a directory on a local disk, one per machine, where each gateway process keeps the "
        "ledger records not yet in the database; see README, 'Settings'."
    )
KEYAOS_LEDGER_SPOOL_DIR = writable_directory(
    "KEYAOS_LEDGER_SPOOL_DIR", Path(_spool_dir) if _spool_dir else STATE_DIR / "spool"
)
KEYAOS_LEDGER_FSYNC_S = env_float("KEYAOS_LEDGER_FSYNC_S", 0.0)
KEYAOS_LEDGER_SHUTDOWN_S = env_float("KEYAOS_LEDGER_SHUTDOWN_S", 5.0)

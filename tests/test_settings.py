"""Settings start safely: a missing or malformed value stops start-up with a message naming it.

Each case loads ``keyaos.settings`` in a fresh interpreter with a controlled environment, the way
``manage.py`` and uvicorn load it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

BASE_DIR = Path(__file__).resolve().parent.parent
DATABASE_URL = "postgres://keyaos@127.0.0.1:5432/keyaos"
SECRET_KEY = "s" * 50
SHOW_SETTINGS = """
import json
import django
from django.conf import settings
django.setup()
print(json.dumps({
    "DEBUG": settings.DEBUG,
    "SECRET_KEY": settings.SECRET_KEY,
    "KEYAOS_ENCRYPTION_KEYS": settings.KEYAOS_ENCRYPTION_KEYS,
    "ENGINE": settings.DATABASES["default"]["ENGINE"],
    "NAME": str(settings.DATABASES["default"]["NAME"]),
    "OPTIONS": settings.DATABASES["default"].get("OPTIONS", {}),
    "KEYAOS_LEDGER_SPOOL_DIR": str(settings.KEYAOS_LEDGER_SPOOL_DIR),
}))
"""


def load_settings(state_dir: Path, **environ: str) -> subprocess.CompletedProcess:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DJANGO_SETTINGS_MODULE": "keyaos.settings",
        "KEYAOS_STATE_DIR": str(state_dir),
        **environ,
    }
    return subprocess.run(
        [sys.executable, "-c", SHOW_SETTINGS],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def loaded(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout
    return result.stderr.strip().splitlines()[-1]


def test_it_runs_embedded_with_no_environment_and_keeps_generated_secrets_private(tmp_path):
    settings = loaded(load_settings(tmp_path))

    assert settings["DEBUG"] is False
    assert settings["ENGINE"] == "django.db.backends.sqlite3"
    assert settings["NAME"] == str(tmp_path / "keyaos.sqlite3")
    for name in ("secret_key", "keyaos_encryption_keys"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert (tmp_path / "secret_key").read_text().strip() == settings["SECRET_KEY"]
    assert len(settings["SECRET_KEY"]) >= 50
    Fernet(settings["KEYAOS_ENCRYPTION_KEYS"][0])


def test_it_reads_the_same_generated_secrets_on_the_next_start(tmp_path):
    first = loaded(load_settings(tmp_path))
    second = loaded(load_settings(tmp_path))

    assert second["SECRET_KEY"] == first["SECRET_KEY"]
    assert second["KEYAOS_ENCRYPTION_KEYS"] == first["KEYAOS_ENCRYPTION_KEYS"]


def test_it_prefers_secrets_from_the_environment_over_state_files(tmp_path):
    key = Fernet.generate_key().decode()

    settings = loaded(load_settings(tmp_path, SECRET_KEY=SECRET_KEY, KEYAOS_ENCRYPTION_KEYS=key))

    assert settings["SECRET_KEY"] == SECRET_KEY
    assert settings["KEYAOS_ENCRYPTION_KEYS"] == [key]
    assert not (tmp_path / "secret_key").exists()
    assert not (tmp_path / "keyaos_encryption_keys").exists()


def production(tmp_path: Path, **environ: str) -> dict[str, str]:
    return {
        "DATABASE_URL": DATABASE_URL,
        "SECRET_KEY": SECRET_KEY,
        "KEYAOS_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
        "KEYAOS_LEDGER_SPOOL_DIR": str(tmp_path.with_name(tmp_path.name + "-spool")),
        **environ,
    }


def test_it_uses_postgresql_with_a_connection_pool_when_database_url_is_set(tmp_path):
    settings = loaded(load_settings(tmp_path, **production(tmp_path)))

    assert settings["ENGINE"] == "django.db.backends.postgresql"
    assert settings["NAME"] == "keyaos"
    assert settings["OPTIONS"]["pool"]["max_size"] == 10
    assert list(tmp_path.iterdir()) == []
    spool = Path(settings["KEYAOS_LEDGER_SPOOL_DIR"])
    assert spool.is_dir() and stat.S_IMODE(spool.stat().st_mode) == 0o700


def test_it_keeps_the_ledger_spool_in_the_state_folder_when_embedded(tmp_path):
    assert loaded(load_settings(tmp_path))["KEYAOS_LEDGER_SPOOL_DIR"] == str(tmp_path / "spool")


def test_it_refuses_to_start_without_a_spool_directory_when_database_url_is_set(tmp_path):
    environ = production(tmp_path)
    del environ["KEYAOS_LEDGER_SPOOL_DIR"]

    result = load_settings(tmp_path, **environ)

    assert "ImproperlyConfigured: KEYAOS_LEDGER_SPOOL_DIR is not set" in error_line(result)


def test_it_refuses_a_spool_directory_it_cannot_create(tmp_path):
    (tmp_path / "a-file").write_text("")
    spool = tmp_path / "a-file" / "spool"

    result = load_settings(tmp_path, **production(tmp_path, KEYAOS_LEDGER_SPOOL_DIR=str(spool)))

    assert f"KEYAOS_LEDGER_SPOOL_DIR: cannot create {spool}" in error_line(result)


def test_it_refuses_to_start_without_secret_key_when_database_url_is_set(tmp_path):
    result = load_settings(
        tmp_path, DATABASE_URL=DATABASE_URL, KEYAOS_ENCRYPTION_KEYS=Fernet.generate_key().decode()
    )

    assert "ImproperlyConfigured: SECRET_KEY is not set" in error_line(result)
    assert not (tmp_path / "secret_key").exists()


def test_it_refuses_to_start_without_encryption_keys_when_database_url_is_set(tmp_path):
    result = load_settings(tmp_path, DATABASE_URL=DATABASE_URL, SECRET_KEY=SECRET_KEY)

    assert "ImproperlyConfigured: KEYAOS_ENCRYPTION_KEYS is not set" in error_line(result)
    assert not (tmp_path / "keyaos_encryption_keys").exists()


def test_it_refuses_a_short_secret_key(tmp_path):
    result = load_settings(tmp_path, SECRET_KEY="too-short")

    assert "SECRET_KEY must be at least 32 characters" in error_line(result)


def test_it_names_the_malformed_encryption_key_without_echoing_it(tmp_path):
    good = Fernet.generate_key().decode()
    bad = "not-a-fernet-key-but-a-secret-value"

    result = load_settings(tmp_path, KEYAOS_ENCRYPTION_KEYS=f"{good},{bad}")

    assert "KEYAOS_ENCRYPTION_KEYS entry #2 is not a valid Fernet key" in error_line(result)
    assert bad not in result.stderr


def test_it_accepts_several_encryption_keys_for_rotation(tmp_path):
    keys = [Fernet.generate_key().decode() for _ in range(2)]

    settings = loaded(load_settings(tmp_path, KEYAOS_ENCRYPTION_KEYS=f" {keys[0]} , {keys[1]},"))

    assert settings["KEYAOS_ENCRYPTION_KEYS"] == keys


@pytest.mark.parametrize(
    ("value", "expected"), [("true", True), ("1", True), ("no", False), ("", False)]
)
def test_it_reads_debug_strictly(tmp_path, value, expected):
    assert loaded(load_settings(tmp_path, DEBUG=value))["DEBUG"] is expected


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DEBUG", "maybe", "DEBUG must be one of true/false"),
        ("KEYAOS_MAX_ATTEMPTS", "three", "KEYAOS_MAX_ATTEMPTS must be an integer"),
        ("KEYAOS_MAX_ATTEMPTS", "0", "KEYAOS_MAX_ATTEMPTS must be at least 1"),
        ("KEYAOS_READ_TIMEOUT_S", "soon", "KEYAOS_READ_TIMEOUT_S must be a number"),
        ("KEYAOS_READ_TIMEOUT_S", "nan", "KEYAOS_READ_TIMEOUT_S must be a finite number"),
        ("KEYAOS_DRAIN_S", "inf", "KEYAOS_DRAIN_S must be a finite number"),
    ],
)
def test_it_refuses_a_malformed_value_naming_the_variable(tmp_path, name, value, message):
    assert message in error_line(load_settings(tmp_path, **{name: value}))

"""A wrong KEYAOS_ENCRYPTION_KEYS is loud: the gateway refuses to start when no stored secret
decrypts, and names the keys it cannot read when only some do not."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from django.core.exceptions import ImproperlyConfigured

from providers.models import UpstreamKey
from routing.runtime import Runtime
from tests.factories import make_key, make_provider

BASE_DIR = Path(__file__).resolve().parent.parent
OLD_KEY, NEW_KEY = Fernet.generate_key().decode(), Fernet.generate_key().decode()


@pytest.fixture
def stored_under_old_key(transactional_db, settings):
    settings.KEYAOS_ENCRYPTION_KEYS = [OLD_KEY]
    provider = make_provider("acme", "http://127.0.0.1:9/v1")
    make_key(provider, "sk-acme-" + "a" * 30, label="main")
    make_key(provider, "sk-acme-" + "b" * 30, label="spare")
    return provider


def start(runtime: Runtime) -> None:
    async def run():
        try:
            await runtime.start()
        finally:
            await runtime.stop()

    asyncio.run(run())


def test_the_gateway_refuses_to_start_when_no_stored_secret_decrypts(
    stored_under_old_key, settings
):
    settings.KEYAOS_ENCRYPTION_KEYS = [NEW_KEY]
    with pytest.raises(ImproperlyConfigured) as refused:
        start(Runtime())
    message = str(refused.value)
    assert "decrypts none of the 2 stored upstream secrets" in message
    assert "acme:main" in message and "acme:spare" in message
    assert "sk-acme" not in message


def test_keys_that_do_not_decrypt_are_named_once_and_the_rest_serve(
    stored_under_old_key, settings, caplog
):
    settings.KEYAOS_ENCRYPTION_KEYS = [NEW_KEY, OLD_KEY]
    make_key(stored_under_old_key, "sk-acme-" + "c" * 30, label="new")
    settings.KEYAOS_ENCRYPTION_KEYS = [NEW_KEY]
    runtime = Runtime()
    with caplog.at_level(logging.ERROR, logger="keyaos.gateway"):
        start(runtime)
    here = threading.current_thread().name  # not the served gateway's runtime, also watching
    problems = [
        r.getMessage()
        for r in caplog.records
        if "cannot be decrypted" in r.getMessage() and r.threadName == here
    ]
    assert len(problems) == 1
    assert "acme:main" in problems[0] and "acme:spare" in problems[0]
    assert "acme:new" not in problems[0]
    assert runtime.secret_problem == problems[0]
    assert UpstreamKey.objects.secret_check().unreadable == ("acme:main", "acme:spare")


def test_the_right_key_first_or_after_a_new_one_reads_everything(stored_under_old_key, settings):
    settings.KEYAOS_ENCRYPTION_KEYS = [NEW_KEY, OLD_KEY]
    runtime = Runtime()
    start(runtime)
    assert runtime.secret_problem is None
    assert UpstreamKey.objects.secret_check().problem() is None


@pytest.mark.slow
def test_a_server_with_the_wrong_key_exits_and_says_why(tmp_path):
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DJANGO_SETTINGS_MODULE": "keyaos.settings",
        "KEYAOS_STATE_DIR": str(tmp_path),
        "KEYAOS_ENCRYPTION_KEYS": OLD_KEY,
        "UPSTREAM_SECRET": "sk-or-v1-" + "x" * 40,
    }

    setup = (
        "import django; django.setup();"
        "from django.core.management import call_command;"
        "call_command('migrate', verbosity=0);"
        "call_command('add_provider', 'openrouter', preset='openrouter');"
        "call_command('add_upstream_key', 'openrouter', label='main', secret_env='UPSTREAM_SECRET')"
    )
    done = subprocess.run(
        [sys.executable, "-c", setup], cwd=BASE_DIR, env=env, capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    server = subprocess.run(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "keyaos.asgi:application",
            "--port",
            "0",
            "--lifespan",
            "on",
        ],
        cwd=BASE_DIR,
        env={**env, "KEYAOS_ENCRYPTION_KEYS": NEW_KEY},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert server.returncode != 0
    assert "decrypts none of the 1 stored upstream secrets (openrouter:main)" in server.stderr
    assert "x" * 40 not in server.stderr

"""``manage.py`` starts fast for an operator's commands: no system checks, and none of the
gateway, the admin pages or the HTTP client is imported before a command needs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import get_commands, load_command_class

from keyaos.lib.commands import OperatorCommand

ROOT = Path(__file__).resolve().parent.parent
OPERATOR_COMMANDS = (
    "add_provider",
    "add_upstream_key",
    "create_api_key",
    "ensure_admin",
    "prune_ledger",
    "refresh_models",
    "rotate_upstream_secrets",
    "route",
    "set_price",
)
NOT_AT_START = ("keyaos.urls", "routing.api", "providers.admin", "billing.admin", "ninja")


@pytest.mark.parametrize("name", OPERATOR_COMMANDS)
def test_operator_commands_skip_the_system_checks(name):
    command = load_command_class(get_commands()[name], name)
    assert isinstance(command, OperatorCommand) and command.requires_system_checks == []


def test_django_setup_imports_no_page_and_no_http_client(tmp_path):
    script = (
        "import json, sys, django; django.setup(); "
        f"print(json.dumps([m for m in {list(NOT_AT_START) + ['httpx']!r} "
        "if m in sys.modules]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={
            "DJANGO_SETTINGS_MODULE": "keyaos.settings",
            "KEYAOS_STATE_DIR": str(tmp_path),
            "PATH": "/usr/bin:/bin",
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []

"""The first-admin bootstrap that ``make run`` calls on every start."""

from __future__ import annotations

import io
import re

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def no_admin_environment(monkeypatch):
    for name in ("KEYAOS_ADMIN_USER", "KEYAOS_ADMIN_PASSWORD", "KEYAOS_ADMIN_EMAIL"):
        monkeypatch.delenv(name, raising=False)


def ensure_admin() -> str:
    out = io.StringIO()
    call_command("ensure_admin", stdout=out)
    return out.getvalue()


def test_it_creates_the_superuser_from_the_environment(monkeypatch):
    monkeypatch.setenv("KEYAOS_ADMIN_USER", "operator")
    monkeypatch.setenv("KEYAOS_ADMIN_PASSWORD", "a-long-passphrase-42")
    monkeypatch.setenv("KEYAOS_ADMIN_EMAIL", "ops@example.com")

    output = ensure_admin()

    user = User.objects.get()
    assert (user.username, user.email, user.is_superuser, user.is_staff) == (
        "operator",
        "ops@example.com",
        True,
        True,
    )
    assert user.check_password("a-long-passphrase-42")
    assert "a-long-passphrase-42" not in output


def test_it_generates_a_strong_password_and_prints_it_once():
    output = ensure_admin()

    match = re.search(r"Created admin user 'admin' with password: (\S+) ", output)
    assert match, output
    assert "shown once; change it in the admin" in output
    assert "manage.py changepassword admin" in output  # the way back, where the password is
    password = match.group(1)
    assert len(password) >= 20
    assert User.objects.get(username="admin").check_password(password)


def test_it_does_nothing_when_a_superuser_exists(monkeypatch):
    ensure_admin()
    monkeypatch.setenv("KEYAOS_ADMIN_USER", "second")
    monkeypatch.setenv("KEYAOS_ADMIN_PASSWORD", "another-long-passphrase")

    assert ensure_admin() == ""
    assert list(User.objects.values_list("username", flat=True)) == ["admin"]


def test_it_refuses_a_password_shorter_than_eight_characters(monkeypatch):
    monkeypatch.setenv("KEYAOS_ADMIN_PASSWORD", "short")

    with pytest.raises(CommandError, match="KEYAOS_ADMIN_PASSWORD must be at least 8"):
        ensure_admin()
    assert not User.objects.exists()


def test_it_refuses_a_common_password(monkeypatch):
    monkeypatch.setenv("KEYAOS_ADMIN_PASSWORD", "password123")

    with pytest.raises(CommandError, match="KEYAOS_ADMIN_PASSWORD is rejected"):
        ensure_admin()
    assert not User.objects.exists()


def test_it_does_not_promote_an_existing_regular_user(monkeypatch):
    User.objects.create_user("admin", password="whatever-it-was")

    with pytest.raises(CommandError, match="exists but is not a superuser"):
        ensure_admin()
    assert not User.objects.get(username="admin").is_superuser

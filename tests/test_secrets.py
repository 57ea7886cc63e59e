from __future__ import annotations

import logging

import pytest
from cryptography.fernet import Fernet
from django.conf import settings
from django.db import connection
from django.test import override_settings
from django.urls import reverse

from providers import services
from providers.crypto import SecretDecryptionError
from providers.models import UpstreamKey
from tests.admin_client import key_change_form
from tests.payloads import upstream_error

pytestmark = pytest.mark.django_db

SECRET = "sk-or-v1-fake-secretvalue0123456789XYZ9"


@pytest.fixture
def key(openrouter) -> UpstreamKey:
    return services.add_upstream_key(provider=openrouter, secret=SECRET, label="main")


def raw_row(key: UpstreamKey) -> str:
    table = UpstreamKey._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {table} WHERE id = %s", [key.pk])
        return " ".join(str(value) for value in cursor.fetchone())


def test_the_secret_is_encrypted_in_the_database_row(key):
    row = raw_row(key)

    assert SECRET not in row
    assert UpstreamKey.objects.get(pk=key.pk).secret == SECRET


def test_the_secret_is_shown_masked(key):
    assert key.secret_masked == "sk-or-...XYZ9"
    assert str(key) == "openrouter:main"


def change_url(key: UpstreamKey) -> str:
    return reverse("admin:providers_upstreamkey_change", args=[key.pk])


def assert_only_the_masked_secret_shown(response, key: UpstreamKey) -> None:
    content = response.content.decode()
    assert response.status_code == 200
    assert key.secret_masked in content
    assert SECRET not in content
    assert key.secret_hash not in content
    assert key.secret_encrypted not in content


def save_change_form(admin_client, key: UpstreamKey, **fields: str) -> None:
    """Post the key's change form with ``fields`` changed, as the admin saves it, and reload."""
    response = admin_client.post(change_url(key), key_change_form(key, **fields))
    assert response.status_code == 302
    key.refresh_from_db()


def test_the_admin_changelist_shows_the_masked_secret_only(key, admin_client):
    response = admin_client.get(reverse("admin:providers_upstreamkey_changelist"))

    assert_only_the_masked_secret_shown(response, key)


def test_the_admin_change_page_never_renders_the_secret(key, admin_client):
    response = admin_client.get(change_url(key))

    assert_only_the_masked_secret_shown(response, key)


def test_a_new_secret_entered_in_the_admin_replaces_the_old_one_and_resets_health(
    key, admin_client
):
    key.health, key.last_error = UpstreamKey.Health.INVALID, "HTTP 401"
    key.save()

    save_change_form(admin_client, key, secret="sk-or-v1-replacement-secret-0000", health="invalid")

    assert key.secret == "sk-or-v1-replacement-secret-0000"
    assert key.health == UpstreamKey.Health.OK
    assert key.last_error == ""


def test_an_empty_secret_field_in_the_admin_keeps_the_stored_secret(key, admin_client):
    save_change_form(admin_client, key, label="renamed", secret="")

    assert key.label == "renamed"
    assert key.secret == SECRET


def test_adding_a_key_logs_nothing_secret(openrouter, caplog):
    with caplog.at_level(logging.DEBUG):
        services.add_upstream_key(provider=openrouter, secret=SECRET)

    assert SECRET not in caplog.text


def test_validating_a_rejected_key_keeps_the_secret_out_of_logs_and_errors(
    key, fake_upstream, caplog
):
    refresh = pytest.importorskip("providers.refresh")
    fake_upstream.reply(
        "GET",
        "/openrouter/api/v1/key",
        status=401,
        json_body=upstream_error(f"Invalid key {SECRET}"),
    )

    with caplog.at_level(logging.DEBUG):
        result = refresh.validate_key(key)

    key.refresh_from_db()
    assert not result.ok
    assert SECRET not in caplog.text
    assert SECRET not in result.message
    assert SECRET not in key.last_error


def test_a_duplicate_secret_error_does_not_reveal_the_secret(key):
    with pytest.raises(services.DuplicateUpstreamKey) as error:
        services.add_upstream_key(provider=key.provider, secret=f"  {SECRET}  ")

    assert SECRET not in str(error.value)


def test_rotation_re_encrypts_every_secret_with_the_new_first_key(key):
    old_keys = list(settings.KEYAOS_ENCRYPTION_KEYS)
    new_key = Fernet.generate_key().decode()

    with override_settings(KEYAOS_ENCRYPTION_KEYS=[new_key, *old_keys]):
        assert services.rotate_upstream_secrets() == 1

    with override_settings(KEYAOS_ENCRYPTION_KEYS=[new_key]):
        rotated = UpstreamKey.objects.get(pk=key.pk)
        assert rotated.secret == SECRET
        assert SECRET not in raw_row(rotated)


def test_without_rotation_dropping_the_old_key_makes_the_secret_unreadable(key):
    with (
        override_settings(KEYAOS_ENCRYPTION_KEYS=[Fernet.generate_key().decode()]),
        pytest.raises(SecretDecryptionError),
    ):
        UpstreamKey.objects.get(pk=key.pk).secret  # noqa: B018


def test_a_failed_rotation_changes_nothing(key, openrouter):
    other = Fernet.generate_key().decode()
    with override_settings(KEYAOS_ENCRYPTION_KEYS=[other]):
        services.add_upstream_key(provider=openrouter, secret="sk-or-v1-under-another-key")
    before = dict(UpstreamKey.objects.values_list("pk", "secret_encrypted"))

    with pytest.raises(SecretDecryptionError):
        services.rotate_upstream_secrets()

    assert dict(UpstreamKey.objects.values_list("pk", "secret_encrypted")) == before

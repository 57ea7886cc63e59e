"""Checking one upstream key, and refreshing its balance, on the operator's demand."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from providers.adapters import BalanceError
from providers.models import Provider, UpstreamKey
from providers.presets import PRESETS
from providers.refresh import refresh_key_balance, validate_key
from tests.payloads import deepseek_balance, deepseek_balance_info, upstream_error

pytestmark = pytest.mark.django_db


def make_key(fake_upstream, preset: str, **fields) -> UpstreamKey:
    provider_fields = PRESETS[preset].provider_fields() | {"base_url": fake_upstream.url(preset)}
    provider = Provider.objects.create(slug=preset, **provider_fields)
    key = UpstreamKey(provider=provider, label="main", **fields)
    key.set_secret("sk-or-v1-test-0123456789abcdef")
    key.save()
    return key


class TestValidateKey:
    @pytest.mark.parametrize(
        ("preset", "method", "path", "status", "message", "health"),
        [
            pytest.param(
                "openrouter",
                "GET",
                "/openrouter/key",
                401,
                "User not found.",
                UpstreamKey.Health.INVALID,
                id="401-is-invalid",
            ),
            pytest.param(
                "zenmux",
                "POST",
                "/zenmux/chat/completions",
                402,
                "Insufficient credits",
                UpstreamKey.Health.EXHAUSTED,
                id="402-is-exhausted",
            ),
        ],
    )
    def test_a_key_refused_by_the_provider_is_marked_by_the_status(
        self, fake_upstream, preset, method, path, status, message, health
    ):
        key = make_key(fake_upstream, preset)
        fake_upstream.reply(method, path, status=status, json_body=upstream_error(message))

        result = validate_key(key)

        key.refresh_from_db()
        assert not result.ok
        assert key.health == health
        assert message in key.last_error
        assert key.last_error_at is not None
        assert key.secret not in key.last_error

    def test_a_key_accepted_with_200_is_ok_and_its_cooldown_cleared(self, fake_upstream):
        key = make_key(
            fake_upstream,
            "openrouter",
            health=UpstreamKey.Health.INVALID,
            cooldown_until=timezone.now() + timedelta(minutes=5),
        )
        fake_upstream.reply("GET", "/openrouter/key", json_body={"data": {"label": "main"}})

        result = validate_key(key)

        key.refresh_from_db()
        assert result.ok
        assert key.health == UpstreamKey.Health.OK
        assert key.cooldown_until is None
        assert key.is_usable()

    def test_a_transient_failure_only_records_the_error(self, fake_upstream):
        key = make_key(fake_upstream, "deepseek")
        fake_upstream.reply("GET", "/deepseek/models", status=503, body=b"busy")

        result = validate_key(key)

        key.refresh_from_db()
        assert result.status_code == 503
        assert key.health == UpstreamKey.Health.OK
        assert "HTTP 503" in key.last_error

    def test_a_key_that_cannot_be_decrypted_fails_the_check_without_a_request(self, fake_upstream):
        key = make_key(fake_upstream, "openrouter")
        UpstreamKey.objects.filter(pk=key.pk).update(secret_encrypted="not-a-fernet-token")
        key.refresh_from_db()

        result = validate_key(key)

        assert not result.ok
        assert "KEYAOS_ENCRYPTION_KEYS" in result.message
        assert fake_upstream.requests == []


class TestRefreshKeyBalance:
    def test_it_stores_the_fetched_balance(self, fake_upstream):
        key = make_key(
            fake_upstream,
            "deepseek",
            balance_source=UpstreamKey.BalanceSource.AUTO,
            health=UpstreamKey.Health.EXHAUSTED,
        )
        fake_upstream.reply(
            "GET",
            "/deepseek/user/balance",
            json_body=deepseek_balance(deepseek_balance_info("CNY", "8.8")),
        )

        balance = refresh_key_balance(key)

        assert balance == Decimal("8.8")
        assert key.balance == Decimal("8.8")
        assert key.health == UpstreamKey.Health.OK
        key.refresh_from_db()
        assert key.balance == Decimal("8.8")
        assert key.balance_updated_at is not None

    def test_it_leaves_a_balance_kept_by_hand_alone(self, fake_upstream):
        key = make_key(fake_upstream, "openrouter", balance=Decimal("3"))

        assert refresh_key_balance(key) is None

        key.refresh_from_db()
        assert key.balance == Decimal("3")
        assert fake_upstream.requests == []

    def test_it_raises_a_balance_error_when_the_provider_fails(self, fake_upstream):
        key = make_key(fake_upstream, "openrouter", balance_source=UpstreamKey.BalanceSource.AUTO)
        fake_upstream.reply("GET", "/openrouter/credits", status=500, json_body={"error": "x"})

        with pytest.raises(BalanceError, match="HTTP 500"):
            refresh_key_balance(key)

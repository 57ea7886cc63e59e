"""Upstream keys in the admin: adding one (encrypted, never shown) and the key actions."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from providers import services
from providers.models import UpstreamKey
from tests.admin_client import SECRET_A, SECRET_B, messages_of, select
from tests.payloads import openrouter_credits

pytestmark = pytest.mark.django_db


class TestUpstreamKeyAdmin:
    def test_adding_a_key_stores_it_encrypted_with_an_automatic_balance(
        self, admin_client, openrouter
    ):
        response = admin_client.post(
            reverse("admin:providers_upstreamkey_add"),
            {
                "provider": openrouter.pk,
                "label": "main",
                "secret": SECRET_A,
                "multiplier": "1",
                "balance": "",
            },
        )

        assert response.status_code == 302
        key = UpstreamKey.objects.get()
        assert key.secret == SECRET_A
        assert key.balance_source == UpstreamKey.BalanceSource.AUTO

    def test_adding_a_duplicate_key_is_refused_without_showing_the_secret(
        self, admin_client, openrouter
    ):
        services.add_upstream_key(provider=openrouter, secret=SECRET_A, label="main")

        response = admin_client.post(
            reverse("admin:providers_upstreamkey_add"),
            {"provider": openrouter.pk, "secret": SECRET_A, "multiplier": "1"},
        )

        content = response.content.decode()
        assert response.status_code == 200
        assert "already stored" in content
        assert SECRET_A not in content
        assert UpstreamKey.objects.count() == 1

    def test_the_secret_is_required_when_adding_a_key(self, admin_client, openrouter):
        response = admin_client.post(
            reverse("admin:providers_upstreamkey_add"),
            {"provider": openrouter.pk, "secret": "", "multiplier": "1"},
        )

        assert response.status_code == 200
        assert response.context["adminform"].form.errors["secret"]
        assert not UpstreamKey.objects.exists()

    def test_the_disable_and_enable_actions_say_what_they_did(self, admin_client, openrouter):
        first = services.add_upstream_key(provider=openrouter, secret=SECRET_A)
        second = services.add_upstream_key(provider=openrouter, secret=SECRET_B)
        url = reverse("admin:providers_upstreamkey_changelist")

        response = admin_client.post(url, select("disable_selected", first, second), follow=True)

        assert "Disabled 2 key(s)." in messages_of(response)
        assert not UpstreamKey.objects.filter(enabled=True).exists()

        response = admin_client.post(url, select("enable_selected", first), follow=True)

        assert "Enabled 1 key(s)." in messages_of(response)
        assert list(UpstreamKey.objects.filter(enabled=True)) == [first]

    def test_the_validate_action_counts_accepted_and_rejected_keys(
        self, admin_client, openrouter, fake_upstream
    ):
        pytest.importorskip("providers.refresh")
        from tests.fake_upstream import Reply

        good = services.add_upstream_key(provider=openrouter, secret=SECRET_A, label="good")
        bad = services.add_upstream_key(provider=openrouter, secret=SECRET_B, label="bad")
        fake_upstream.handle(
            "GET",
            "/openrouter/api/v1/key",
            lambda request: (
                Reply(status=200, json_body={"data": {}})
                if request.bearer == SECRET_A
                else Reply(status=401, json_body={"error": {"message": "User not found."}})
            ),
        )

        response = admin_client.post(
            reverse("admin:providers_upstreamkey_changelist"),
            select("validate_keys", good, bad),
            follow=True,
        )

        [message] = messages_of(response)
        assert message.startswith("Validated 2 key(s): 1 OK, 1 invalid")
        assert "openrouter:bad" in message
        bad.refresh_from_db()
        good.refresh_from_db()
        assert bad.health == UpstreamKey.Health.INVALID
        assert good.health == UpstreamKey.Health.OK

    def test_the_balance_action_reads_the_providers_credits(
        self, admin_client, openrouter, fake_upstream
    ):
        pytest.importorskip("providers.refresh")
        key = services.add_upstream_key(provider=openrouter, secret=SECRET_A, label="main")
        fake_upstream.reply(
            "GET",
            "/openrouter/api/v1/credits",
            json_body=openrouter_credits(20, 7.5),
        )

        response = admin_client.post(
            reverse("admin:providers_upstreamkey_changelist"),
            select("refresh_balances", key),
            follow=True,
        )

        key.refresh_from_db()
        assert key.balance == Decimal("12.5")
        assert messages_of(response) == [
            "Refreshed the balance of 1 key(s) (openrouter:main: 12.50 USD)."
        ]

    def test_the_balance_action_reports_a_provider_failure(
        self, admin_client, openrouter, fake_upstream
    ):
        pytest.importorskip("providers.refresh")
        key = services.add_upstream_key(provider=openrouter, secret=SECRET_A, label="main")
        fake_upstream.reply("GET", "/openrouter/api/v1/credits", status=500, body=b"boom")

        response = admin_client.post(
            reverse("admin:providers_upstreamkey_changelist"),
            select("refresh_balances", key),
            follow=True,
        )

        [message] = messages_of(response)
        assert "1 failed (openrouter:main:" in message
        assert SECRET_A not in message

    def test_the_health_badge_is_coloured(self, admin_client, openrouter):
        key = services.add_upstream_key(provider=openrouter, secret=SECRET_A)
        key.health = UpstreamKey.Health.INVALID
        key.save()
        cooling = services.add_upstream_key(provider=openrouter, secret=SECRET_B)
        cooling.cooldown_until = timezone.now() + timedelta(minutes=1)
        cooling.save()

        page = admin_client.get(reverse("admin:providers_upstreamkey_changelist")).content.decode()

        assert 'class="kd-badge kd-health-invalid">Invalid<' in page
        assert 'class="kd-badge kd-health-cooling">Cooling down<' in page
        assert "keyaos/dashboard" in page  # the stylesheet that colours the badges

"""Client keys (shown once) and currency rates in the admin."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from django.urls import reverse

from billing.models import ApiKey, CurrencyRate, hash_api_key
from tests.admin_client import messages_of

pytestmark = pytest.mark.django_db


class TestBillingAdmin:
    def test_adding_a_client_key_shows_it_once(self, admin_client):
        response = admin_client.post(
            reverse("admin:billing_apikey_add"),
            {"name": "ci", "enabled": "on", "budget_period": "lifetime"},
            follow=True,
        )

        [shown] = [m for m in messages_of(response) if "Copy it now" in m]
        plain = re.search(r"sk-keyaos-[A-Za-z0-9_-]+", shown).group(0)
        api_key = ApiKey.objects.get()
        assert api_key.key_hash == hash_api_key(plain)
        assert plain.startswith(api_key.prefix)
        for url in (
            reverse("admin:billing_apikey_changelist"),
            reverse("admin:billing_apikey_change", args=[api_key.pk]),
        ):
            content = admin_client.get(url).content.decode()
            assert plain not in content
            assert api_key.key_hash not in content

    def test_the_client_key_add_form_never_asks_for_the_key_itself(self, admin_client):
        response = admin_client.get(reverse("admin:billing_apikey_add"))

        fields = list(response.context["adminform"].form.fields)
        assert fields[:2] == ["name", "enabled"]
        assert not {"key_hash", "prefix", "spent_usd"} & set(fields)

    def test_usd_needs_no_rate(self, admin_client):
        response = admin_client.post(
            reverse("admin:billing_currencyrate_add"), {"currency": "USD", "usd_per_unit": "1"}
        )

        assert response.status_code == 200
        assert not CurrencyRate.objects.filter(currency="USD").exists()

    def test_a_currency_rate_must_be_positive(self, admin_client):
        response = admin_client.post(
            reverse("admin:billing_currencyrate_add"), {"currency": "eur", "usd_per_unit": "0"}
        )

        assert response.status_code == 200
        assert not CurrencyRate.objects.filter(currency="EUR").exists()

    def test_a_currency_rate_is_stored_upper_case(self, admin_client):
        response = admin_client.post(
            reverse("admin:billing_currencyrate_add"), {"currency": "eur", "usd_per_unit": "1.08"}
        )

        assert response.status_code == 302
        assert CurrencyRate.objects.get(currency="EUR").usd_per_unit == Decimal("1.08")

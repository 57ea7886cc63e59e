"""Adding a provider in the admin: presets, seeded prices, a currency without rate, aliases."""

from __future__ import annotations

import pytest
from django.urls import reverse

from providers.models import Provider
from tests.admin_client import messages_of

pytestmark = pytest.mark.django_db


class TestProviderAdmin:
    def test_adding_a_provider_from_the_deepseek_preset_seeds_its_prices(self, admin_client):
        response = admin_client.post(
            reverse("admin:providers_provider_add"),
            {"preset": "deepseek", "slug": "deepseek", "name": "", "base_url": "", "currency": ""},
        )

        assert response.status_code == 302
        provider = Provider.objects.get(slug="deepseek")
        assert provider.currency == "CNY"
        assert provider.base_url == "https://api.deepseek.com"
        assert provider.balance_method == Provider.BalanceMethod.DEEPSEEK
        assert set(provider.offers.values_list("canonical_id", "price_source")) == {
            ("deepseek/deepseek-chat", "manual"),
            ("deepseek/deepseek-reasoner", "manual"),
        }

    def test_the_add_form_is_pre_filled_from_a_preset(self, admin_client):
        response = admin_client.get(reverse("admin:providers_provider_add"), {"preset": "zenmux"})

        form = response.context["adminform"].form
        assert form["base_url"].value() == "https://zenmux.ai/api/v1"
        assert form["slug"].value() == "zenmux"
        assert form["preset"].value() == "zenmux"

    def test_a_custom_provider_without_a_base_url_is_refused_with_the_reason(self, admin_client):
        response = admin_client.post(
            reverse("admin:providers_provider_add"),
            {"preset": "openai-compatible", "slug": "moonshot"},
        )

        assert response.status_code == 200
        assert "needs its base URL" in response.content.decode()
        assert not Provider.objects.exists()

    def test_a_provider_in_a_currency_without_rate_is_added_with_a_warning(self, admin_client):
        response = admin_client.post(
            reverse("admin:providers_provider_add"),
            {
                "preset": "openai-compatible",
                "slug": "mistral",
                "base_url": "https://api.mistral.ai/v1",
                "currency": "EUR",
            },
            follow=True,
        )

        assert Provider.objects.get(slug="mistral").currency == "EUR"
        assert any("No exchange rate for EUR" in m for m in messages_of(response))

    def test_a_provider_change_page_edits_its_model_aliases(self, admin_client, openrouter):
        url = reverse("admin:providers_provider_change", args=[openrouter.pk])
        data = {
            "name": "OpenRouter",
            "slug": "openrouter",
            "enabled": "on",
            "base_url": "https://openrouter.example/api/v1",
            "currency": "USD",
            "auth_style": "bearer",
            "read_timeout_s": "300",
            "catalog_format": "openrouter",
            "default_vendor": "",
            "balance_method": "openrouter_credits",
            "key_check": "openrouter_key",
            "key_check_model": "",
            "aliases-TOTAL_FORMS": "1",
            "aliases-INITIAL_FORMS": "0",
            "aliases-MIN_NUM_FORMS": "0",
            "aliases-MAX_NUM_FORMS": "1000",
            "aliases-0-upstream_model_id": "Qwen/Qwen3-Max",
            "aliases-0-canonical_id": "Qwen/Qwen3-Max-Preview",
        }

        response = admin_client.post(url, data)

        assert response.status_code == 302
        openrouter.refresh_from_db()
        assert openrouter.base_url == "https://openrouter.example/api/v1"
        assert openrouter.aliases.get().canonical_id == "qwen/qwen3-max-preview"

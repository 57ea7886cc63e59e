"""Every admin page renders, its lists show prices and counts, in a constant number of queries."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.urls import reverse

from billing.models import CurrencyRate
from providers import services
from tests.admin_client import ADMIN_MODELS, queries_for

pytestmark = pytest.mark.django_db


class TestPagesRender:
    @pytest.mark.parametrize("model", ADMIN_MODELS)
    def test_the_changelist_renders(self, admin_client, catalog, model):
        response = admin_client.get(reverse(f"admin:{model}_changelist"))

        assert response.status_code == 200

    @pytest.mark.parametrize("model", sorted(set(ADMIN_MODELS) - {"providers_refreshrun"}))
    def test_the_add_page_renders(self, admin_client, catalog, model):
        response = admin_client.get(reverse(f"admin:{model}_add"))

        assert response.status_code == 200

    @pytest.mark.parametrize("model", ADMIN_MODELS)
    def test_the_change_page_renders(self, admin_client, catalog, model):
        obj = catalog[model]

        response = admin_client.get(reverse(f"admin:{model}_change", args=[obj.pk]))

        assert response.status_code == 200

    def test_refresh_runs_cannot_be_added_by_hand(self, admin_client):
        response = admin_client.get(reverse("admin:providers_refreshrun_add"))

        assert response.status_code == 403

    def test_the_provider_list_counts_active_offers_and_keys(self, admin_client, catalog):
        response = admin_client.get(reverse("admin:providers_provider_changelist"))

        rows = {row.slug: row for row in response.context["cl"].result_list}
        assert rows["openrouter"].active_offer_count == 1
        assert rows["openrouter"].key_total == 1
        assert rows["deepseek"].active_offer_count == 2
        assert rows["deepseek"].key_total == 0

    def test_the_offer_list_shows_prices_in_their_currency_and_in_usd(self, admin_client, catalog):
        CurrencyRate.objects.filter(currency="CNY").update(usd_per_unit=Decimal("0.5"))

        response = admin_client.get(
            reverse("admin:providers_modeloffer_changelist"), {"q": "deepseek-chat"}
        )

        content = response.content.decode()
        assert "0.28 USD" in content
        assert "$0.28 / $0.42" in content
        assert "2.00 CNY" in content
        assert "$1.00 / $1.50" in content

    @pytest.mark.parametrize("url_name", ["provider", "upstreamkey", "modeloffer"])
    def test_the_list_query_count_does_not_grow_with_its_rows(
        self, admin_client, catalog, url_name
    ):
        url = reverse(f"admin:providers_{url_name}_changelist")
        few = queries_for(admin_client, url)
        for index in range(5):
            provider = services.create_provider(
                slug=f"more-{index}", preset="openai-compatible", base_url="http://x.test/v1"
            )
            services.add_upstream_key(provider=provider, secret=f"sk-more-secret-{index}")
            services.set_price(
                provider=provider,
                model="m",
                input_per_mtok=Decimal(1),
                output_per_mtok=Decimal(2),
                create=True,
            )

        assert queries_for(admin_client, url) == few

    def test_an_offer_in_a_currency_without_rate_says_so(self, admin_client, catalog):
        CurrencyRate.objects.filter(currency="CNY").delete()

        response = admin_client.get(reverse("admin:providers_modeloffer_changelist"))

        assert "no CNY rate" in response.content.decode()

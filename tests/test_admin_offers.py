"""Model offers in the admin: the refresh button, the compare page, prices set by hand."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.urls import reverse

from providers.models import ModelOffer, RefreshRun
from tests.admin_client import messages_of, offer_add_form
from tests.factories import make_offer
from tests.payloads import openrouter_model, serve_openrouter

pytestmark = pytest.mark.django_db


class TestModelOfferAdmin:
    def test_the_refresh_button_runs_a_refresh_and_reports_it(
        self, admin_client, openrouter, fake_upstream
    ):
        pytest.importorskip("providers.refresh")
        serve_openrouter(
            fake_upstream,
            openrouter_model("openai/gpt-4o", prompt="0.0000025", completion="0.00001"),
            openrouter_model(
                "deepseek/deepseek-chat", prompt="0.00000028", completion="0.00000042"
            ),
            prefix="openrouter/api/v1",
        )

        response = admin_client.post(reverse("admin:providers_modeloffer_refresh"), follow=True)

        run = RefreshRun.objects.get()
        assert run.trigger == RefreshRun.Trigger.ADMIN
        assert response.redirect_chain[-1][0] == reverse("admin:providers_modeloffer_changelist")
        assert messages_of(response)[0].startswith("Refreshed 1 provider(s)")
        assert "2 offer(s) added" in messages_of(response)[0]
        offer = ModelOffer.objects.get(upstream_model_id="openai/gpt-4o")
        assert offer.input_price_per_mtok == Decimal("2.5")

    def test_the_refresh_button_shows_each_providers_error(
        self, admin_client, openrouter, fake_upstream
    ):
        pytest.importorskip("providers.refresh")
        fake_upstream.reply("GET", "/openrouter/api/v1/models", status=503, body=b"down")

        response = admin_client.post(reverse("admin:providers_modeloffer_refresh"), follow=True)

        assert any(message.startswith("openrouter: ") for message in messages_of(response))
        assert RefreshRun.objects.get().error_count == 1

    def test_the_refresh_button_only_accepts_post(self, admin_client):
        response = admin_client.get(reverse("admin:providers_modeloffer_refresh"))

        assert response.status_code == 405

    def test_the_changelist_has_the_refresh_button(self, admin_client):
        response = admin_client.get(reverse("admin:providers_modeloffer_changelist"))

        assert "Refresh models now" in response.content.decode()

    def test_the_compare_page_lists_every_provider_offering_a_model(self, admin_client, catalog):
        url = reverse("admin:model", args=["deepseek/deepseek-chat"])

        response = admin_client.get(url)

        content = response.content.decode()
        assert response.status_code == 200
        rows = response.context["rows"]
        assert {row["offer"].provider.slug for row in rows} == {"openrouter", "deepseek"}
        assert "2.00 CNY" in content
        assert "0.28 USD" in content
        assert "131072" in content

    def test_each_offer_row_links_to_the_compare_page(self, admin_client, catalog):
        response = admin_client.get(reverse("admin:providers_modeloffer_changelist"))

        url = reverse("admin:model", args=["deepseek/deepseek-chat"])
        assert url in response.content.decode()

    def test_editing_a_price_in_the_admin_makes_it_manual_and_records_it(
        self, admin_client, openrouter
    ):
        offer = make_offer(openrouter, "openai/gpt-4o", input="2.5", output="10")
        offer.record_price()
        url = reverse("admin:providers_modeloffer_change", args=[offer.pk])
        page = admin_client.get(url)
        history = page.context["inline_admin_formsets"][0].formset.management_form

        response = admin_client.post(
            url,
            {
                "provider": openrouter.pk,
                "upstream_model_id": "openai/gpt-4o",
                "canonical_id": "openai/gpt-4o",
                "display_name": "",
                "kind": "chat",
                "active": "on",
                "context_length": "",
                "input_price_per_mtok": "2",
                "output_price_per_mtok": "10",
                "cached_input_price_per_mtok": "",
                "price_tiers": "{}",
                **{history.add_prefix(name): value for name, value in history.initial.items()},
            },
        )

        assert response.status_code == 302
        offer.refresh_from_db()
        assert offer.price_source == ModelOffer.PriceSource.MANUAL
        assert offer.input_price_per_mtok == Decimal("2")
        assert offer.price_history.count() == 2

    def test_a_negative_price_is_refused(self, admin_client, openrouter):
        response = admin_client.post(
            reverse("admin:providers_modeloffer_add"),
            offer_add_form(openrouter, "x/y", input_price_per_mtok="-1"),
        )

        assert response.status_code == 200
        assert "cannot be negative" in response.content.decode()
        assert not ModelOffer.objects.exists()

    def test_an_offer_added_by_hand_gets_its_canonical_id_and_a_manual_price(
        self, admin_client, openrouter
    ):
        response = admin_client.post(
            reverse("admin:providers_modeloffer_add"),
            # The provider has no catalog here.
            offer_add_form(openrouter, "Vendor/Model-X", create_anyway="on"),
        )

        assert response.status_code == 302
        offer = ModelOffer.objects.get()
        assert offer.canonical_id == "vendor/model-x"
        assert offer.price_source == ModelOffer.PriceSource.MANUAL
        assert offer.price_history.count() == 1

"""set_price and the admin refuse phantom offers: a model id the provider does not list would
fail every request routed to it, so only a listed id (native or canonical) takes a price, unless
the operator says to create it."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from providers.models import ModelOffer
from tests.admin_client import offer_add_form
from tests.factories import make_offer, make_provider

pytestmark = pytest.mark.django_db


@pytest.fixture
def deepseek():
    provider = make_provider("deepseek", "http://127.0.0.1:9/ds")
    make_offer(provider, "deepseek-chat", input="2", output="3")
    make_offer(provider, "deepseek-reasoner", input="4", output="16")
    return provider


def set_price(*args: str) -> None:
    call_command("set_price", *args, "--input", "1", "--output", "2")


def test_the_canonical_id_prices_the_providers_native_offer(deepseek):
    set_price("deepseek", "deepseek/deepseek-chat")
    assert deepseek.offers.count() == 2
    offer = deepseek.offers.get(upstream_model_id="deepseek-chat")
    assert offer.input_price_per_mtok == Decimal(1)
    assert offer.price_source == ModelOffer.PriceSource.MANUAL


def test_a_native_id_in_another_casing_is_the_same_offer(deepseek):
    set_price("deepseek", "DeepSeek-Reasoner")
    assert deepseek.offers.get(upstream_model_id="deepseek-reasoner").input_price_per_mtok == 1


def test_an_id_the_catalog_does_not_list_is_refused_with_close_matches(deepseek):
    with pytest.raises(CommandError) as refused:
        set_price("deepseek", "deepseek-chatt")
    message = str(refused.value)
    assert "does not list the model 'deepseek-chatt'" in message
    assert "Close matches: deepseek-chat" in message
    assert "--create" in message
    assert deepseek.offers.count() == 2


def test_create_adds_an_offer_the_catalog_does_not_list(deepseek):
    set_price("deepseek", "deepseek-v4", "--create")
    offer = deepseek.offers.get(upstream_model_id="deepseek-v4")
    assert offer.canonical_id == "deepseek/deepseek-v4"


def test_the_admin_refuses_a_phantom_offer_unless_told_to_create_it(deepseek, admin_client):
    form = offer_add_form(deepseek, "deepseek/deepseek-chatt")
    url = reverse("admin:providers_modeloffer_add")
    refused = admin_client.post(url, form)
    assert refused.status_code == 200
    errors = refused.context["adminform"].form.errors["upstream_model_id"][0]
    assert "Close matches: deepseek/deepseek-chat" in errors and "Create anyway" in errors
    assert deepseek.offers.count() == 2
    created = admin_client.post(url, {**form, "create_anyway": "on"})
    assert created.status_code == 302
    assert deepseek.offers.filter(upstream_model_id="deepseek/deepseek-chatt").exists()

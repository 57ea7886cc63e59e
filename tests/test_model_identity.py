"""One model, every provider: offers pooled under one canonical id without an operator's help."""

from __future__ import annotations

import time

import openai
import pytest
from django.test import override_settings

from providers.models import ModelAlias, ModelOffer, PublishedIdentity
from providers.refresh import IDENTITY_SOURCE_SLUG, refresh_providers
from tests.factories import make_client_key, make_key, make_provider
from tests.payloads import (
    chat_completion,
    deepinfra_model,
    openrouter_model,
    serve_deepinfra,
    serve_openrouter,
)

LLAMA = "meta-llama/llama-3.1-8b-instruct"
LLAMA_HF = "meta-llama/Meta-Llama-3.1-8B-Instruct"


def openrouter_catalog(fake_upstream) -> None:
    serve_openrouter(
        fake_upstream,
        openrouter_model(
            LLAMA, prompt="0.00000002", completion="0.00000005", hugging_face_id=LLAMA_HF
        ),
        openrouter_model(f"{LLAMA}:free", prompt="0", completion="0", hugging_face_id=LLAMA_HF),
        openrouter_model(
            "qwen/qwen3-max", canonical_slug="qwen/qwen3-max-2025-09", hugging_face_id=""
        ),
        openrouter_model("anthropic/claude-sonnet-4.5"),
    )


def deepinfra_catalog(fake_upstream) -> None:
    serve_deepinfra(
        fake_upstream,
        deepinfra_model(LLAMA_HF, 0.01, 0.03, context_length=131072),
        deepinfra_model("Qwen/Qwen3-Max-2025-09", 1.2, 6.0),
        deepinfra_model("mistralai/Mistral-Small-24B-Instruct-2501", 0.05, 0.1),
    )


def offer(slug: str, native: str) -> ModelOffer:
    return ModelOffer.objects.get(provider__slug=slug, upstream_model_id=native)


@pytest.mark.django_db
class TestTheRefreshPoolsOffers:
    def test_a_published_hugging_face_id_pools_deepinfras_offer(self, fake_upstream):
        make_provider("openrouter", fake_upstream.url("openrouter"))
        make_provider("deepinfra", fake_upstream.url("deepinfra"))
        openrouter_catalog(fake_upstream)
        deepinfra_catalog(fake_upstream)
        refresh_providers(trigger="command")
        llama = offer("deepinfra", LLAMA_HF)
        assert (llama.canonical_id, llama.identity_rule) == (LLAMA, "published")
        qwen = offer("deepinfra", "Qwen/Qwen3-Max-2025-09")
        assert (qwen.canonical_id, qwen.identity_rule) == ("qwen/qwen3-max", "published")
        mistral = offer("deepinfra", "mistralai/Mistral-Small-24B-Instruct-2501")
        assert mistral.canonical_id == "mistralai/mistral-small-24b-instruct-2501"
        assert mistral.identity_rule == "lowercase"
        assert offer("openrouter", LLAMA).identity_rule == "lowercase"

    def test_a_free_variant_does_not_make_a_conflict(self, fake_upstream):
        make_provider("openrouter", fake_upstream.url("openrouter"))
        openrouter_catalog(fake_upstream)
        refresh_providers(trigger="command")
        assert PublishedIdentity.as_map()[LLAMA_HF.lower()] == {LLAMA}

    def test_two_models_claiming_one_id_are_shown_as_a_conflict_not_guessed(self, fake_upstream):
        make_provider("openrouter", fake_upstream.url("openrouter"))
        make_provider("deepinfra", fake_upstream.url("deepinfra"))
        serve_openrouter(
            fake_upstream,
            openrouter_model("meta-llama/llama-a", hugging_face_id=LLAMA_HF),
            openrouter_model("nousresearch/llama-b", hugging_face_id=LLAMA_HF),
        )
        deepinfra_catalog(fake_upstream)
        refresh_providers(trigger="command")
        llama = offer("deepinfra", LLAMA_HF)
        assert llama.identity_rule == "conflict"
        assert llama.canonical_id == LLAMA_HF.lower()
        assert "meta-llama/llama-a, nousresearch/llama-b" in llama.identity_note

    def test_the_default_vendor_names_bare_ids(self, fake_upstream):
        deepseek = make_provider("deepseek", fake_upstream.url("deepseek"))
        fake_upstream.reply(
            "GET", "/deepseek/models", json_body={"data": [{"id": "deepseek-chat"}]}
        )
        refresh_providers(trigger="command")
        chat = deepseek.offers.get(upstream_model_id="deepseek-chat")
        assert (chat.canonical_id, chat.identity_rule) == ("deepseek/deepseek-chat", "vendor")

    def test_without_an_openrouter_provider_the_public_list_is_the_source(self, fake_upstream):
        make_provider("deepinfra", fake_upstream.url("deepinfra"))
        openrouter_catalog(fake_upstream)
        deepinfra_catalog(fake_upstream)
        with override_settings(KEYAOS_IDENTITY_SOURCE_URL=fake_upstream.url("openrouter/models")):
            run = refresh_providers(trigger="command")
        assert offer("deepinfra", LLAMA_HF).canonical_id == LLAMA
        source = run.results.get(provider_slug=IDENTITY_SOURCE_SLUG)
        assert (source.offers_seen, source.error) == (4, "")

    def test_a_failing_public_list_keeps_the_published_ids_and_says_so(self, fake_upstream):
        make_provider("deepinfra", fake_upstream.url("deepinfra"))
        PublishedIdentity.objects.create(native_id=LLAMA_HF.lower(), canonical_id=LLAMA)
        deepinfra_catalog(fake_upstream)
        fake_upstream.reply("GET", "/openrouter/models", status=500, json_body={"error": "down"})
        with override_settings(KEYAOS_IDENTITY_SOURCE_URL=fake_upstream.url("openrouter/models")):
            run = refresh_providers(trigger="command")
        assert offer("deepinfra", LLAMA_HF).canonical_id == LLAMA
        assert "HTTP 500" in run.results.get(provider_slug=IDENTITY_SOURCE_SLUG).error

    def test_the_source_can_be_turned_off(self, fake_upstream):
        make_provider("deepinfra", fake_upstream.url("deepinfra"))
        deepinfra_catalog(fake_upstream)
        with override_settings(KEYAOS_IDENTITY_SOURCE_URL=""):
            run = refresh_providers(trigger="command")
        assert not fake_upstream.received("/openrouter/models")
        assert not run.results.filter(provider_slug=IDENTITY_SOURCE_SLUG).exists()
        assert offer("deepinfra", LLAMA_HF).identity_rule == "lowercase"

    def test_an_operators_mapping_comes_first_and_rekeys_at_once(self, fake_upstream):
        make_provider("openrouter", fake_upstream.url("openrouter"))
        deepinfra = make_provider("deepinfra", fake_upstream.url("deepinfra"))
        openrouter_catalog(fake_upstream)
        deepinfra_catalog(fake_upstream)
        refresh_providers(trigger="command")
        mapping = ModelAlias.objects.create(
            provider=deepinfra, upstream_model_id=LLAMA_HF, canonical_id="Meta-Llama/Other"
        )
        llama = offer("deepinfra", LLAMA_HF)
        assert (llama.canonical_id, llama.identity_rule) == ("meta-llama/other", "mapping")
        mapping.delete()
        assert offer("deepinfra", LLAMA_HF).canonical_id == LLAMA

    def test_a_canonical_id_typed_in_the_admin_becomes_a_mapping(self, fake_upstream, admin_client):
        deepinfra = make_provider("deepinfra", fake_upstream.url("deepinfra"))
        deepinfra_catalog(fake_upstream)
        refresh_providers(trigger="command")
        mistral = offer("deepinfra", "mistralai/Mistral-Small-24B-Instruct-2501")
        page = admin_client.get(f"/admin/providers/modeloffer/{mistral.pk}/change/")
        form = page.context["adminform"].form
        data = {k: v for k, v in form.initial.items() if v is not None and k != "price_tiers"}
        data |= {"canonical_id": "mistralai/mistral-small-3", "price_tiers": "{}"}
        data |= {"price_history-TOTAL_FORMS": "0", "price_history-INITIAL_FORMS": "0"}
        response = admin_client.post(f"/admin/providers/modeloffer/{mistral.pk}/change/", data)
        assert response.status_code == 302, response.context["adminform"].form.errors
        mistral.refresh_from_db()
        assert (mistral.canonical_id, mistral.identity_rule) == (
            "mistralai/mistral-small-3",
            "mapping",
        )
        assert deepinfra.aliases.get().canonical_id == "mistralai/mistral-small-3"
        listing = admin_client.get("/admin/providers/modeloffer/").content.decode()
        assert "Operator&#x27;s mapping" in listing or "Operator's mapping" in listing


@pytest.fixture
def pooled(gateway, fake_upstream):
    openrouter = make_provider("openrouter", fake_upstream.url("openrouter"))
    deepinfra = make_provider("deepinfra", fake_upstream.url("deepinfra"))
    openrouter_catalog(fake_upstream)
    deepinfra_catalog(fake_upstream)
    refresh_providers(trigger="command")
    make_key(openrouter, "sk-or-v1-" + "o" * 40, label="or")
    make_key(deepinfra, "di-" + "d" * 40, label="di")
    for prefix in ("openrouter", "deepinfra"):
        fake_upstream.reply(
            "POST", f"/{prefix}/chat/completions", json_body=chat_completion("m", prefix)
        )
    _, client_key = make_client_key()
    gateway.reload()
    return deepinfra, openai.OpenAI(base_url=gateway.url, api_key=client_key, max_retries=0)


def ask(client, model: str, **extra):
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], **extra
    )


def test_models_lists_the_pooled_model_once(pooled):
    _, client = pooled
    ids = [model.id for model in client.models.list().data]
    assert ids.count(LLAMA) == 1
    assert not any(model_id.lower() == LLAMA_HF.lower() for model_id in ids)
    entry = client.models.retrieve(LLAMA)
    assert entry.providers == ["deepinfra", "openrouter"]
    assert entry.pricing["provider"] == "deepinfra"


@pytest.mark.parametrize("requested", [LLAMA, LLAMA_HF, LLAMA_HF.lower()])
def test_the_cheaper_provider_serves_it_with_its_native_id(pooled, fake_upstream, requested):
    _, client = pooled
    raw = ask(client, requested)
    assert raw.headers["x-keyaos-provider"] == "deepinfra"
    assert fake_upstream.received("/deepinfra/chat/completions")[-1].json()["model"] == LLAMA_HF


def test_a_client_that_pins_a_provider_gets_that_provider(pooled, fake_upstream):
    _, client = pooled
    raw = ask(client, LLAMA_HF, extra_body={"provider": {"only": ["openrouter"]}})
    assert raw.headers["x-keyaos-provider"] == "openrouter"
    assert fake_upstream.received("/openrouter/chat/completions")[-1].json()["model"] == LLAMA


def test_an_operators_mapping_changes_routing_within_the_snapshot_poll(pooled):
    deepinfra, client = pooled
    ModelAlias.objects.create(
        provider=deepinfra, upstream_model_id=LLAMA_HF, canonical_id="meta-llama/elsewhere"
    )
    deadline = time.monotonic() + 15
    while ask(client, LLAMA).headers["x-keyaos-provider"] != "openrouter":
        assert time.monotonic() < deadline, "the mapping never reached routing"
        time.sleep(0.05)
    raw = ask(client, "meta-llama/elsewhere")
    assert raw.headers["x-keyaos-provider"] == "deepinfra"

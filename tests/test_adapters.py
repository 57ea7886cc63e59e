"""The provider adapters read each documented answer shape in the right unit and currency."""

from __future__ import annotations

from decimal import Decimal

import pytest

from providers.adapters import (
    BalanceError,
    CatalogError,
    check_key,
    fetch_balance,
    fetch_catalog,
)
from providers.models import Provider
from providers.presets import PRESETS
from tests.payloads import (
    deepinfra_model,
    deepseek_balance,
    deepseek_balance_info,
    deepseek_models,
    openrouter_credits,
    openrouter_model,
    upstream_error,
    zenmux_model,
    zenmux_tier,
    zenmux_tiers,
)

SECRET = "sk-or-v1-test-0123456789abcdef"


def provider_for(fake_upstream, preset: str, prefix: str | None = None, **fields) -> Provider:
    values = PRESETS[preset].provider_fields() | fields
    values["base_url"] = fake_upstream.url(prefix or preset)
    return Provider(slug=preset, **values)


OPENROUTER_MODELS = {
    "data": [
        openrouter_model(
            "google/gemini-2.5-pro",
            name="Google: Gemini 2.5 Pro",
            context_length=1048576,
            modality="text+image->text",
            prompt="0.00000125",
            completion="0.00001",
            cache_read="0.00000031",
            input_cache_write="0.000001625",
            image="0.00516",
            request="0",
        ),
        openrouter_model(
            "deepseek/deepseek-chat",
            name="DeepSeek: DeepSeek V3",
            context_length=163840,
            prompt="0.0000003",
            completion="0.00000085",
            cache_read=None,
        ),
        openrouter_model(
            "openrouter/auto",
            name="Auto Router",
            context_length=2000000,
            prompt="-1",
            completion="-1",
            cache_read=None,
        ),
    ]
}
OPENROUTER_EMBEDDINGS = {
    "data": [
        openrouter_model(
            "openai/text-embedding-3-small",
            name="OpenAI: Text Embedding 3 Small",
            context_length=8192,
            prompt="0.00000002",
            completion="0",
            cache_read=None,
        )
    ]
}
DEEPINFRA_MODELS = {
    "object": "list",
    "data": [
        deepinfra_model(
            "Qwen/Qwen3-Max",
            1.2,
            6,
            cache_read=0.24,
            context_length=262144,
            description="Qwen3 Max",
            max_tokens=65536,
            tags=["prompt_cache"],
        )
        | {"owned_by": "deepinfra"},
        deepinfra_model("BAAI/bge-m3", 0.01, None, context_length=8192, tags=[]),
        {"id": "someone/private-finetune", "object": "model", "metadata": None},
    ],
}
ZENMUX_MODELS = {
    "data": [
        zenmux_model(
            "google/gemini-2.5-pro",
            display_name="Gemini 2.5 Pro",
            prompt=zenmux_tiers(1.25, 2.5),
            completion=zenmux_tiers(10, 15),
            cache_read=zenmux_tiers(0.31, 0.625),
        )
    ]
}
DEEPSEEK_MODELS = deepseek_models("deepseek-chat", "deepseek-reasoner")


def by_id(entries):
    return {entry.upstream_model_id: entry for entry in entries}


class TestOpenRouterCatalog:
    def test_it_turns_per_token_price_strings_into_exact_prices_per_million(self, fake_upstream):
        fake_upstream.reply("GET", "/openrouter/models", json_body=OPENROUTER_MODELS)
        fake_upstream.reply("GET", "/openrouter/embeddings/models", json_body=OPENROUTER_EMBEDDINGS)

        entries = by_id(fetch_catalog(provider_for(fake_upstream, "openrouter")))

        gemini = entries["google/gemini-2.5-pro"]
        assert gemini.input_price_per_mtok == Decimal("1.25")
        assert gemini.output_price_per_mtok == Decimal("10")
        assert gemini.cached_input_price_per_mtok == Decimal("0.31")
        assert gemini.display_name == "Google: Gemini 2.5 Pro"
        assert gemini.context_length == 1048576
        assert gemini.kind == "chat"
        deepseek = entries["deepseek/deepseek-chat"]
        assert deepseek.price_tuple() == (Decimal("0.3"), Decimal("0.85"), None)

    def test_it_lists_embedding_models_from_their_own_endpoint(self, fake_upstream):
        fake_upstream.reply("GET", "/openrouter/models", json_body=OPENROUTER_MODELS)
        fake_upstream.reply("GET", "/openrouter/embeddings/models", json_body=OPENROUTER_EMBEDDINGS)

        entries = by_id(fetch_catalog(provider_for(fake_upstream, "openrouter")))

        embedding = entries["openai/text-embedding-3-small"]
        assert embedding.kind == "embedding"
        assert embedding.input_price_per_mtok == Decimal("0.02")
        assert len(entries) == 4

    def test_it_treats_a_negative_price_as_unknown(self, fake_upstream):
        fake_upstream.reply("GET", "/openrouter/models", json_body=OPENROUTER_MODELS)
        fake_upstream.reply("GET", "/openrouter/embeddings/models", json_body={"data": []})

        entries = by_id(fetch_catalog(provider_for(fake_upstream, "openrouter")))

        assert entries["openrouter/auto"].price_tuple() == (None, None, None)

    def test_it_refuses_to_read_usd_prices_into_a_provider_in_another_currency(self, fake_upstream):
        provider = provider_for(fake_upstream, "openrouter", currency="CNY")

        with pytest.raises(CatalogError, match="USD"):
            fetch_catalog(provider)


class TestDeepInfraCatalog:
    def test_it_reads_prices_per_million_from_metadata_pricing(self, fake_upstream):
        fake_upstream.reply("GET", "/deepinfra/models", json_body=DEEPINFRA_MODELS)

        entries = by_id(fetch_catalog(provider_for(fake_upstream, "deepinfra")))

        qwen = entries["Qwen/Qwen3-Max"]
        assert qwen.price_tuple() == (Decimal("1.2"), Decimal("6"), Decimal("0.24"))
        assert qwen.context_length == 262144
        assert qwen.kind == "chat"

    def test_it_marks_a_model_priced_for_input_only_as_an_embedding(self, fake_upstream):
        fake_upstream.reply("GET", "/deepinfra/models", json_body=DEEPINFRA_MODELS)

        entries = by_id(fetch_catalog(provider_for(fake_upstream, "deepinfra")))

        assert entries["BAAI/bge-m3"].kind == "embedding"
        assert entries["BAAI/bge-m3"].input_price_per_mtok == Decimal("0.01")

    def test_it_keeps_a_model_without_metadata_unpriced(self, fake_upstream):
        fake_upstream.reply("GET", "/deepinfra/models", json_body=DEEPINFRA_MODELS)

        entries = by_id(fetch_catalog(provider_for(fake_upstream, "deepinfra")))

        private = entries["someone/private-finetune"]
        assert not private.has_prices
        assert private.kind == "chat"


class TestZenMuxCatalog:
    def test_it_takes_the_first_tier_as_the_base_price_and_keeps_every_tier(self, fake_upstream):
        fake_upstream.reply("GET", "/zenmux/models", json_body=ZENMUX_MODELS)

        [entry] = fetch_catalog(provider_for(fake_upstream, "zenmux"))

        assert entry.price_tuple() == (Decimal("1.25"), Decimal("10"), Decimal("0.31"))
        assert entry.display_name == "Gemini 2.5 Pro"
        assert [t["value"] for t in entry.price_tiers["prompt"]] == ["1.25", "2.5"]
        assert entry.price_tiers["completion"][1]["conditions"]["prompt_tokens"]["gte"] == 200
        assert entry.price_tiers["input_cache_read"][1]["value"] == "0.625"

    def test_it_rejects_a_price_unit_it_does_not_know(self, fake_upstream):
        model = ZENMUX_MODELS["data"][0] | {
            "pricings": {"prompt": [zenmux_tier(1.25, 0) | {"unit": "perKTokens"}]}
        }
        fake_upstream.reply("GET", "/zenmux/models", json_body={"data": [model]})

        with pytest.raises(CatalogError, match="perKTokens"):
            fetch_catalog(provider_for(fake_upstream, "zenmux"))

    def test_it_rejects_tiers_in_another_currency_than_the_providers(self, fake_upstream):
        fake_upstream.reply("GET", "/zenmux/models", json_body=ZENMUX_MODELS)

        with pytest.raises(CatalogError, match="CNY"):
            fetch_catalog(provider_for(fake_upstream, "zenmux", currency="CNY"))


class TestOpenAIListCatalog:
    def test_it_reads_ids_only_with_the_key_and_no_prices(self, fake_upstream):
        fake_upstream.reply("GET", "/deepseek/models", json_body=DEEPSEEK_MODELS)

        entries = fetch_catalog(provider_for(fake_upstream, "deepseek"), secret=SECRET)

        assert [e.upstream_model_id for e in entries] == ["deepseek-chat", "deepseek-reasoner"]
        assert all(not entry.has_prices for entry in entries)
        assert fake_upstream.received("/deepseek/models")[0].bearer == SECRET


class TestMalformedCatalogs:
    @pytest.mark.parametrize(
        "reply",
        [
            {"status": 500, "json_body": upstream_error("upstream exploded")},
            {"body": b"<html><body>Access denied</body></html>", "content_type": "text/html"},
            {"body": b'{"data": [', "content_type": "application/json"},
            {"json_body": {"models": []}},
            {"json_body": {"data": [{"name": "no id"}]}},
            {"json_body": {"data": ["just-a-string"]}},
            {"json_body": {"data": [{"id": "x", "metadata": {"pricing": {"input_tokens": "a"}}}]}},
            {"json_body": {"data": [{"id": "x", "metadata": {"pricing": [1, 2]}}]}},
            {"json_body": {"data": [{"id": "x", "metadata": {"pricing": {"input_tokens": True}}}]}},
        ],
        ids=[
            "http-500",
            "html-page",
            "truncated-json",
            "no-data",
            "no-id",
            "item-not-object",
            "price-not-number",
            "pricing-not-object",
            "price-boolean",
        ],
    )
    def test_it_raises_a_catalog_error_for_anything_it_cannot_read(self, fake_upstream, reply):
        fake_upstream.reply("GET", "/deepinfra/models", **reply)

        with pytest.raises(CatalogError):
            fetch_catalog(provider_for(fake_upstream, "deepinfra"))

    def test_it_gives_up_after_the_fetch_timeout(self, fake_upstream, settings):
        settings.KEYAOS_FETCH_TIMEOUT_S = 0.2
        fake_upstream.reply("GET", "/deepinfra/models", json_body=DEEPINFRA_MODELS, delay_s=1.5)

        with pytest.raises(CatalogError, match="no answer within 0.2 s"):
            fetch_catalog(provider_for(fake_upstream, "deepinfra"))

    def test_its_errors_never_contain_the_secret(self, fake_upstream):
        fake_upstream.reply(
            "GET",
            "/deepseek/models",
            status=401,
            json_body=upstream_error(f"Incorrect API key provided: {SECRET}"),
        )

        with pytest.raises(CatalogError) as caught:
            fetch_catalog(provider_for(fake_upstream, "deepseek"), secret=SECRET)

        assert "HTTP 401" in str(caught.value)
        assert SECRET not in str(caught.value)
        assert caught.value.status_code == 401


class TestBalances:
    def test_it_reads_openrouter_credits_minus_usage_in_usd(self, fake_upstream):
        fake_upstream.reply(
            "GET",
            "/openrouter/credits",
            json_body=openrouter_credits(15.5, 2.25),
        )

        balance = fetch_balance(provider_for(fake_upstream, "openrouter"), SECRET)

        assert balance == Decimal("13.25")
        assert fake_upstream.received("/openrouter/credits")[0].bearer == SECRET

    def test_it_picks_the_deepseek_balance_in_the_providers_currency(self, fake_upstream):
        fake_upstream.reply(
            "GET",
            "/deepseek/user/balance",
            json_body=deepseek_balance(
                deepseek_balance_info("USD", "1.00"),
                deepseek_balance_info("CNY", "110.50", granted="10.00"),
            ),
        )

        balance = fetch_balance(provider_for(fake_upstream, "deepseek"), SECRET)

        assert balance == Decimal("110.50")

    def test_it_refuses_a_deepseek_balance_without_an_entry_in_the_providers_currency(
        self, fake_upstream
    ):
        fake_upstream.reply(
            "GET",
            "/deepseek/user/balance",
            json_body=deepseek_balance(deepseek_balance_info("USD", "5")),
        )

        with pytest.raises(BalanceError, match="no balance in CNY"):
            fetch_balance(provider_for(fake_upstream, "deepseek"), SECRET)

    def test_it_has_no_balance_for_a_provider_without_a_balance_endpoint(self, fake_upstream):
        assert fetch_balance(provider_for(fake_upstream, "zenmux"), SECRET) is None
        assert fake_upstream.requests == []

    def test_it_raises_a_balance_error_when_the_endpoint_fails(self, fake_upstream):
        fake_upstream.reply("GET", "/openrouter/credits", status=401, json_body={"error": "no"})

        with pytest.raises(BalanceError, match="HTTP 401"):
            fetch_balance(provider_for(fake_upstream, "openrouter"), SECRET)


class TestKeyChecks:
    def test_openrouter_keys_are_checked_with_get_key(self, fake_upstream):
        fake_upstream.reply("GET", "/openrouter/key", json_body={"data": {"label": "x"}})

        result = check_key(provider_for(fake_upstream, "openrouter"), SECRET)

        assert result.ok
        assert result.status_code == 200
        assert fake_upstream.received("/openrouter/key")[0].bearer == SECRET

    def test_a_chat_check_sends_a_one_token_completion_with_the_check_model(self, fake_upstream):
        fake_upstream.reply("POST", "/zenmux/chat/completions", json_body={"choices": []})

        result = check_key(provider_for(fake_upstream, "zenmux"), SECRET)

        assert result.ok
        body = fake_upstream.received("/zenmux/chat/completions")[0].json()
        assert body["model"] == "openai/gpt-4o-mini"
        assert body["max_tokens"] == 1
        assert len(body["messages"]) == 1

    def test_a_models_check_reports_a_rejected_key_without_its_secret(self, fake_upstream):
        fake_upstream.reply(
            "GET", "/deepseek/models", status=401, json_body=upstream_error(f"bad {SECRET}")
        )

        result = check_key(provider_for(fake_upstream, "deepseek"), SECRET)

        assert not result.ok
        assert result.status_code == 401
        assert SECRET not in result.message

    def test_a_200_html_page_is_not_an_accepted_key(self, fake_upstream):
        fake_upstream.reply(
            "GET", "/deepseek/models", body=b"<html>captive portal</html>", content_type="text/html"
        )

        result = check_key(provider_for(fake_upstream, "deepseek"), SECRET)

        assert not result.ok
        assert "HTML" in result.message

    def test_an_unreachable_provider_fails_the_check_without_a_status(
        self, fake_upstream, settings
    ):
        settings.KEYAOS_FETCH_TIMEOUT_S = 0.2
        fake_upstream.reply("GET", "/deepseek/models", json_body=DEEPSEEK_MODELS, delay_s=1.5)

        result = check_key(provider_for(fake_upstream, "deepseek"), SECRET)

        assert not result.ok
        assert result.status_code is None

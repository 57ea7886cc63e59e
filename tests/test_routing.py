"""The dispatcher: cheapest usable key first, across prices, currencies and multipliers."""

from __future__ import annotations

import asyncio
from collections import Counter
from decimal import Decimal

import openai
import pytest
from django.core.management import call_command

from billing.models import CurrencyRate
from routing.dispatcher import ProviderPreferences, rank_candidates, resolve_model
from routing.health import HealthBoard
from routing.snapshot import build_snapshot
from tests.factories import make_client_key, make_key, make_offer, make_provider
from tests.payloads import chat_completion

MODEL = "deepseek/deepseek-chat"


@pytest.fixture
def market(db):
    """Four ways to buy deepseek-chat, in two currencies, with discounted and free credits."""
    CurrencyRate.objects.update_or_create(
        currency="CNY", defaults={"usd_per_unit": Decimal("0.14")}
    )
    openrouter = make_provider("openrouter", "http://127.0.0.1:9/or")
    deepseek = make_provider("deepseek", "http://127.0.0.1:9/ds")
    deepinfra = make_provider("deepinfra", "http://127.0.0.1:9/di")
    make_offer(openrouter, MODEL, input="0.30", output="1.20")  # USD
    make_offer(deepseek, "deepseek-chat", input="2", output="3", cached_input="0.2")  # CNY
    make_offer(deepinfra, "deepseek-ai/DeepSeek-V3", canonical_id=MODEL, input="0.5", output="1.0")
    keys = {
        "openrouter": make_key(openrouter, "sk-or-v1-" + "1" * 40, label="or"),
        "deepseek": make_key(deepseek, "sk-" + "2" * 40, label="ds"),
        "deepinfra": make_key(deepinfra, "di-" + "3" * 40, label="di", multiplier=Decimal("0.5")),
    }
    return keys


def ranking(snapshot, *, prompt=1000, output=1000, preferences=None):
    decision = rank_candidates(
        snapshot,
        MODEL,
        board=HealthBoard(),
        prompt_tokens=prompt,
        output_tokens=output,
        preferences=preferences,
    )
    return decision


def test_candidates_are_ranked_by_estimated_usd_cost_with_currency_and_multiplier(market):
    decision = ranking(build_snapshot())
    names = [c.key.name for c in decision.candidates]
    # deepinfra: (0.5+1.0)/1000 x 0.5 = 0.00075; openrouter: 0.0015;
    # deepseek: (2+3)/1000 CNY x 0.14 = 0.0007 USD
    assert names == ["ds", "di", "or"]
    costs = [c.estimated_cost_usd for c in decision.candidates]
    assert costs == [Decimal("0.0007"), Decimal("0.00075"), Decimal("0.0015")]


def test_a_free_key_wins_and_a_changed_rate_changes_the_order(market):
    market["openrouter"].multiplier = Decimal("0")
    market["openrouter"].save()
    assert ranking(build_snapshot()).candidates[0].key.name == "or"
    market["openrouter"].multiplier = Decimal("1")
    market["openrouter"].save()
    CurrencyRate.objects.filter(currency="CNY").update(usd_per_unit=Decimal("1"))
    assert [c.key.name for c in ranking(build_snapshot()).candidates][-1] == "ds"


def test_unusable_keys_are_excluded_with_their_reason(market):
    market["deepseek"].health = "invalid"
    market["deepseek"].last_error = "401 bad key"
    market["deepseek"].save()
    market["deepinfra"].balance = Decimal("0")
    market["deepinfra"].save()
    decision = ranking(build_snapshot())
    assert [c.key.name for c in decision.candidates] == ["or"]
    reasons = {e.key_name: e.reason for e in decision.excluded}
    assert reasons["ds"].startswith("invalid")
    assert reasons["di"] == "balance is zero"


def test_provider_preferences_narrow_and_order_the_candidates(market):
    snapshot = build_snapshot()
    only = ranking(snapshot, preferences=ProviderPreferences(only=frozenset({"openrouter"})))
    assert [c.key.name for c in only.candidates] == ["or"]
    ignore = ranking(snapshot, preferences=ProviderPreferences(ignore=frozenset({"deepseek"})))
    assert [c.key.name for c in ignore.candidates] == ["di", "or"]
    order = ranking(snapshot, preferences=ProviderPreferences(order=("openrouter",)))
    assert order.candidates[0].key.name == "or"


def test_native_and_bare_ids_resolve_to_the_canonical_model(market):
    snapshot = build_snapshot()
    assert resolve_model(snapshot, MODEL) == MODEL
    assert resolve_model(snapshot, "DeepSeek-AI/DeepSeek-V3") == MODEL
    assert resolve_model(snapshot, "deepseek-chat") == MODEL


def test_equal_costs_spread_across_keys(market):
    provider = market["openrouter"].provider
    make_key(provider, "sk-or-v1-" + "9" * 40, label="or2")
    snapshot = build_snapshot()
    only = ProviderPreferences(only=frozenset({"openrouter"}))
    firsts = Counter(ranking(snapshot, preferences=only).candidates[0].key.name for _ in range(400))
    assert set(firsts) == {"or", "or2"}
    assert min(firsts.values()) > 120


def test_routing_a_request_runs_no_database_query(market, django_assert_num_queries):
    snapshot = build_snapshot()
    with django_assert_num_queries(0):
        resolve_model(snapshot, "deepseek-chat")
        decision = ranking(snapshot)
    assert decision.candidates


def test_the_route_command_explains_a_decision(market, capsys):
    market["deepseek"].health = "exhausted"
    market["deepseek"].save()
    call_command("route", "deepseek-chat", "--prompt-tokens", "1000", "--max-tokens", "1000")
    out = capsys.readouterr().out
    assert "deepseek/deepseek-chat" in out
    assert "1. deepinfra" in out and "2. openrouter" in out
    assert "exhausted" in out
    assert "2" * 40 not in out


@pytest.mark.django_db(transaction=True)
def test_the_cheapest_provider_serves_through_the_gateway(gateway, fake_upstream):
    CurrencyRate.objects.update_or_create(
        currency="CNY", defaults={"usd_per_unit": Decimal("0.14")}
    )
    expensive = make_provider("openrouter", fake_upstream.url("or"))
    cheap_cny = make_provider("deepseek", fake_upstream.url("ds"))
    make_offer(expensive, MODEL, input="0.30", output="1.20")
    make_offer(cheap_cny, "deepseek-chat", input="2", output="3")
    make_key(expensive, "sk-or-v1-" + "1" * 40)
    make_key(cheap_cny, "sk-" + "2" * 40)
    fake_upstream.reply("POST", "/ds/chat/completions", json_body=chat_completion("deepseek-chat"))
    _, client_key = make_client_key()
    gateway.reload()
    client = openai.OpenAI(base_url=gateway.url, api_key=client_key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=100
    )
    assert raw.headers["x-keyaos-provider"] == "deepseek"
    assert fake_upstream.received("/ds/chat/completions")[0].json()["model"] == "deepseek-chat"


def test_a_change_reaches_the_gateway_within_a_second_without_a_reload(gateway, fake_upstream):
    provider = make_provider("openrouter", fake_upstream.url("or"))
    make_key(provider, "sk-or-v1-" + "1" * 40)
    _, client_key = make_client_key()
    make_offer(provider, "openai/gpt-4o", input="1", output="2")

    async def wait_for_model():
        from routing.runtime import runtime

        for _ in range(100):
            if "openai/gpt-4o" in runtime.snapshot.offers:
                return True
            await asyncio.sleep(0.01)
        return False

    assert gateway.run(wait_for_model())

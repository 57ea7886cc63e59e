"""Exact costs for each provider's usage shape, through the gateway, and the balances they debit."""

from __future__ import annotations

from decimal import Decimal

import pytest

from billing.models import CurrencyRate, LedgerEntry
from tests.factories import make_client_key, make_key, make_offer, make_provider, post_chat
from tests.payloads import chat_chunks, chat_completion


@pytest.fixture
def client_key(gateway):
    _, plain = make_client_key()
    return plain


def only_entry(gateway) -> LedgerEntry:
    gateway.flush_ledger()
    return LedgerEntry.objects.get()


def test_openrouter_reported_cost_is_billed_as_is_and_the_multiplier_applies_once(
    gateway, fake_upstream, client_key
):
    provider = make_provider("openrouter", fake_upstream.url("openrouter/api/v1"))
    make_offer(provider, "openai/gpt-4o-mini", input="0.15", output="0.6")
    key = make_key(
        provider, "sk-or-v1-" + "a" * 40, multiplier=Decimal("0.95"), balance=Decimal("10")
    )
    gateway.reload()
    fake_upstream.reply(
        "POST",
        "/openrouter/api/v1/chat/completions",
        json_body=chat_completion(
            "openai/gpt-4o-mini", prompt_tokens=12, completion_tokens=3, cost=0.0000036
        ),
    )

    assert post_chat(gateway, client_key, "openai/gpt-4o-mini").status_code == 200

    entry = only_entry(gateway)
    assert entry.cost_source == "reported"
    assert (entry.cost, entry.currency) == (Decimal("0.0000036"), "USD")
    assert entry.list_cost_usd == Decimal("0.0000036")
    assert entry.cost_usd == Decimal("0.00000342")  # 0.0000036 x 0.95, once
    key.refresh_from_db()
    assert key.balance == Decimal("9.9999964")  # the list cost, not the multiplied one


def test_openrouter_streamed_cost_is_exact(gateway, fake_upstream, client_key):
    provider = make_provider("openrouter", fake_upstream.url("openrouter/api/v1"))
    make_offer(provider, "openai/gpt-4o-mini", input="0.15", output="0.6")
    key = make_key(provider, "sk-or-v1-" + "a" * 40, balance=Decimal("1"))
    gateway.reload()
    usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12, "cost": 0.00000181}
    fake_upstream.stream(
        "/openrouter/api/v1/chat/completions",
        chat_chunks("openai/gpt-4o-mini", ["a", "b", "c"], usage),
    )

    post_chat(gateway, client_key, "openai/gpt-4o-mini", stream=True).read()

    entry = only_entry(gateway)
    assert (entry.usage_source, entry.cost_source) == ("reported", "reported")
    assert entry.cost == entry.cost_usd == Decimal("0.00000181")
    key.refresh_from_db()
    assert key.balance == Decimal("0.99999819")


def test_deepinfra_estimated_cost_is_preferred_over_the_stored_prices(
    gateway, fake_upstream, client_key
):
    provider = make_provider("deepinfra", fake_upstream.url("deepinfra/v1/openai"))
    make_offer(provider, "meta-llama/Llama-3.3-70B-Instruct", input="0.23", output="0.40")
    key = make_key(provider, "di-" + "d" * 30, balance=Decimal("5"))
    gateway.reload()
    fake_upstream.reply(
        "POST",
        "/deepinfra/v1/openai/chat/completions",
        body=(
            b'{"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": '
            b'{"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}], "usage": '
            b'{"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120, '
            b'"estimated_cost": 0.0000311}}'
        ),
    )

    assert post_chat(gateway, client_key, "meta-llama/Llama-3.3-70B-Instruct").status_code == 200

    entry = only_entry(gateway)
    assert entry.cost_source == "reported"
    # the stored prices would say 100 x 0.23 + 20 x 0.40 per 1M = 0.000031
    assert entry.cost == entry.cost_usd == entry.list_cost_usd == Decimal("0.0000311")
    key.refresh_from_db()
    assert key.balance == Decimal("4.9999689")


def test_zenmux_cost_is_computed_with_cached_tokens_at_the_cached_price(
    gateway, fake_upstream, client_key
):
    provider = make_provider("zenmux", fake_upstream.url("zenmux/api/v1"))
    make_offer(provider, "openai/gpt-4.1", input="2", output="8", cached_input="0.5")
    key = make_key(
        provider, "sk-ai-v1-" + "z" * 40, multiplier=Decimal("0.5"), balance=Decimal("20")
    )
    gateway.reload()
    fake_upstream.reply(
        "POST",
        "/zenmux/api/v1/chat/completions",
        json_body=chat_completion(
            "openai/gpt-4.1",
            prompt_tokens=1000,
            completion_tokens=100,
            total_tokens=1100,
            prompt_tokens_details={"cached_tokens": 400},
        ),
    )

    assert post_chat(gateway, client_key, "openai/gpt-4.1").status_code == 200

    entry = only_entry(gateway)
    assert entry.cost_source == "computed"
    assert (entry.prompt_tokens, entry.cached_tokens, entry.completion_tokens) == (1000, 400, 100)
    # 600 x 2 + 400 x 0.5 + 100 x 8 = 2200 USD per 1M tokens
    assert entry.cost == entry.list_cost_usd == Decimal("0.0022")
    assert entry.cost_usd == Decimal("0.0011")
    key.refresh_from_db()
    assert key.balance == Decimal("19.9978")


def test_deepseek_is_billed_in_cny_with_hit_and_miss_tokens_and_converted_at_the_stored_rate(
    gateway, fake_upstream, client_key
):
    CurrencyRate.objects.update_or_create(
        currency="CNY", defaults={"usd_per_unit": Decimal("0.139")}
    )
    provider = make_provider("deepseek", fake_upstream.url("deepseek"))
    assert provider.currency == "CNY"
    make_offer(provider, "deepseek-chat", input="2", output="8", cached_input="0.5")
    key = make_key(provider, "sk-" + "e" * 32, multiplier=Decimal("0.9"), balance=Decimal("100"))
    gateway.reload()
    fake_upstream.reply(
        "POST",
        "/deepseek/chat/completions",
        json_body=chat_completion(
            "deepseek-chat",
            prompt_tokens=1500,
            completion_tokens=200,
            total_tokens=1700,
            prompt_cache_hit_tokens=1000,
            prompt_cache_miss_tokens=500,
        ),
    )

    assert post_chat(gateway, client_key, "deepseek-chat").status_code == 200

    entry = only_entry(gateway)
    # 500 x 2 + 1000 x 0.5 + 200 x 8 = 3100 CNY per 1M tokens
    assert (entry.cost, entry.currency, entry.cost_source) == (Decimal("0.0031"), "CNY", "computed")
    assert entry.usd_per_unit == Decimal("0.139")
    assert entry.list_cost_usd == Decimal("0.0004309")  # 0.0031 x 0.139
    assert entry.cost_usd == Decimal("0.00038781")  # 0.0004309 x 0.9
    key.refresh_from_db()
    assert key.balance == Decimal("99.9969")  # debited in CNY

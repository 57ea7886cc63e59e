"""Upstream balances: debited per request, exhausted at zero, reconciled (with drift) at refresh."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest

from providers.models import BalanceReading, UpstreamKey
from providers.refresh import refresh_providers, store_balance
from tests.factories import make_key, make_provider, make_world
from tests.payloads import chat_completion, openrouter_credits, openrouter_model, serve_openrouter

MODEL = "openai/gpt-4o-mini"
PREFIX = "openrouter/api/v1"


@pytest.fixture
def openrouter(gateway, fake_upstream):
    world = make_world(
        fake_upstream,
        gateway,
        prefix=PREFIX,
        model=MODEL,
        key_fields={
            "balance": Decimal("0.000005"),
            "balance_source": UpstreamKey.BalanceSource.AUTO,
        },
    )
    key, client_key = world.key, world.client_key
    fake_upstream.reply(
        "POST",
        f"/{PREFIX}/chat/completions",
        json_body=chat_completion(MODEL, prompt_tokens=12, completion_tokens=3, cost=0.0000036),
    )
    serve_openrouter(
        fake_upstream,
        openrouter_model(MODEL, prompt="0.00000015", completion="0.0000006", cache_read=None),
        prefix=PREFIX,
    )
    return key, client_key


def chat(gateway, client_key: str) -> httpx.Response:
    return httpx.post(
        gateway.url + "/chat/completions",
        # A short answer: routing wants the key's balance to cover the request's estimate.
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
        headers={"Authorization": f"Bearer {client_key}"},
        timeout=10,
    )


def test_an_exhausted_key_leaves_routing_and_returns_after_a_refresh_shows_credit(
    openrouter, gateway, fake_upstream
):
    key, client_key = openrouter

    assert [chat(gateway, client_key).status_code for _ in range(2)] == [200, 200]
    gateway.flush_ledger()
    key.refresh_from_db()
    assert key.balance == Decimal("-0.0000022")
    assert key.health == UpstreamKey.Health.EXHAUSTED
    gateway.reload()
    refused = chat(gateway, client_key)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "no_available_key"

    fake_upstream.reply(
        "GET",
        f"/{PREFIX}/credits",
        json_body=openrouter_credits(10, 1.5),
    )
    refresh_providers(trigger="command")
    gateway.reload()

    key.refresh_from_db()
    assert (key.balance, key.health) == (Decimal("8.5"), UpstreamKey.Health.OK)
    assert chat(gateway, client_key).status_code == 200
    reading = BalanceReading.objects.get(key=key)
    assert reading.provider_balance == Decimal("8.5")
    assert reading.local_balance == Decimal("-0.0000022")
    assert reading.drift == Decimal("8.5000022")


@pytest.mark.django_db
def test_a_balance_reading_records_the_drift_from_the_local_count():
    provider = make_provider("openrouter", "http://127.0.0.1:9/api/v1")
    key = make_key(provider, "sk-or-v1-" + "y" * 40, balance=Decimal("4.25"))

    store_balance(key.pk, Decimal("4.2"))
    store_balance(key.pk, Decimal("4.2"))

    first, second = BalanceReading.objects.order_by("id")
    assert (first.local_balance, first.drift) == (Decimal("4.25"), Decimal("-0.05"))
    assert second.drift == Decimal("0")

"""Budgets hold through failover, dear upstreams and ``n``: however many requests run at once, a
key spends at most its budget plus one request's actual cost."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import httpx
from django.db.models import Max, Sum

from billing.models import ApiKey, LedgerEntry
from tests.factories import make_key, make_offer, make_provider
from tests.payloads import chat_completion

MODEL = "openai/gpt-4o-mini"
USAGE = {"prompt_tokens": 5, "completion_tokens": 50, "total_tokens": 55}


def limited_key(gateway, budget: str) -> tuple[ApiKey, str]:
    api_key, plain = ApiKey.create_key(name="budgeted", budget_usd=Decimal(budget))
    gateway.reload()
    return api_key, plain


async def burst(url: str, plain: str, count: int, **extra) -> list[httpx.Response]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50}
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=count), timeout=60) as client:
        return await asyncio.gather(
            *(
                client.post(
                    url + "/chat/completions",
                    json={**body, **extra},
                    headers={"Authorization": f"Bearer {plain}"},
                )
                for _ in range(count)
            )
        )


def spent_and_largest_cost(gateway, api_key: ApiKey) -> tuple[Decimal, Decimal]:
    gateway.flush_ledger()
    rows = LedgerEntry.objects.filter(api_key=api_key)
    totals = rows.aggregate(spent=Sum("cost_usd"), largest=Max("cost_usd"))
    return totals["spent"] or Decimal(0), totals["largest"] or Decimal(0)


def assert_only_budget_refusals(responses: list[httpx.Response]) -> None:
    for response in responses:
        if response.status_code != 200:
            assert response.status_code == 429, response.text
            assert response.json()["error"]["code"] == "budget_exceeded"


def test_fifty_parallel_requests_failing_over_to_a_dearer_key_stay_within_the_bound(
    gateway, fake_upstream
):
    cheap = make_provider("cheap", fake_upstream.url("cheap"))
    make_offer(cheap, MODEL, canonical_id=MODEL, input="1", output="2")
    make_key(cheap, "sk-cheap-" + "c" * 30)
    dear = make_provider("dear", fake_upstream.url("dear"))
    make_offer(dear, MODEL, canonical_id=MODEL, input="10", output="20")
    make_key(dear, "sk-dear-" + "d" * 30)
    fake_upstream.reply("POST", "/cheap/chat/completions", status=503, delay_s=0.05)
    fake_upstream.reply(
        "POST", "/dear/chat/completions", json_body=chat_completion(MODEL, **USAGE), delay_s=0.2
    )
    budget = Decimal("0.005")  # the dear key's answer costs 0.00105 USD
    api_key, plain = limited_key(gateway, str(budget))

    responses = asyncio.run(burst(gateway.url, plain, 50))

    assert_only_budget_refusals(responses)
    spent, largest = spent_and_largest_cost(gateway, api_key)
    assert largest == Decimal("0.00105")
    assert spent <= budget + largest
    assert fake_upstream.received("/dear/chat/completions")  # failover did happen


def test_an_upstream_billing_ten_times_list_stays_within_the_bound_after_calibration(
    gateway, fake_upstream
):
    provider = make_provider("openrouter", fake_upstream.url("or"))
    make_offer(provider, MODEL, input="1", output="2")
    make_key(provider, "sk-or-v1-" + "t" * 40)
    # list price of this usage: 0.000105 USD; the upstream reports ten times that
    fake_upstream.reply(
        "POST",
        "/or/chat/completions",
        json_body=chat_completion(MODEL, **USAGE, cost=0.00105),
        delay_s=0.2,
    )
    budget = Decimal("0.01")
    api_key, plain = limited_key(gateway, str(budget))
    asyncio.run(burst(gateway.url, plain, 1))  # one answer teaches the gateway the ratio

    responses = asyncio.run(burst(gateway.url, plain, 50))

    assert_only_budget_refusals(responses)
    spent, largest = spent_and_largest_cost(gateway, api_key)
    assert largest == Decimal("0.00105")
    assert spent <= budget + largest
    assert sum(r.status_code == 200 for r in responses) >= 5  # the budget is used, not locked


def test_n_choices_are_reserved_n_times(gateway, fake_upstream):
    provider = make_provider("openrouter", fake_upstream.url("or"))
    make_offer(provider, MODEL, input="1", output="2")
    make_key(provider, "sk-or-v1-" + "n" * 40)
    four_choices = {"prompt_tokens": 5, "completion_tokens": 200, "total_tokens": 205}
    fake_upstream.reply(
        "POST",
        "/or/chat/completions",
        json_body=chat_completion(MODEL, **four_choices),
        delay_s=0.2,
    )
    budget = Decimal("0.002")  # each answer: 5 x 1 + 200 x 2 per 1M = 0.000405 USD
    api_key, plain = limited_key(gateway, str(budget))

    responses = asyncio.run(burst(gateway.url, plain, 20, n=4))

    assert_only_budget_refusals(responses)
    spent, largest = spent_and_largest_cost(gateway, api_key)
    assert largest == Decimal("0.000405")
    assert spent <= budget + largest
    assert fake_upstream.received("/or/chat/completions")[0].json()["n"] == 4

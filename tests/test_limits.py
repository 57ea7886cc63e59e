"""Client key limits on /v1: expiry, models, IPs, requests and tokens per minute, budgets."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from decimal import Decimal

import httpx
import pytest
from django.db.models import Sum
from django.utils import timezone

from billing.limits import KeyLimits
from billing.models import ApiKey, LedgerEntry, budget_period_start
from tests.factories import make_offer, make_world
from tests.payloads import chat_chunks, chat_completion

MODEL = "openai/gpt-4o-mini"
PATH = "/openrouter/api/v1/chat/completions"


@pytest.fixture
def upstream(gateway, fake_upstream):
    world = make_world(
        fake_upstream,
        model=MODEL,
        input="1",
        output="2",
        reply=chat_completion(MODEL, prompt_tokens=5, completion_tokens=50, total_tokens=55),
    )
    make_offer(world.provider, "anthropic/claude-sonnet-4", input="3", output="15")
    return fake_upstream


def client_key(gateway, **limits) -> tuple[ApiKey, str]:
    api_key, plain = ApiKey.create_key(name="limited", **limits)
    gateway.reload()
    return api_key, plain


def chat(gateway, plain: str, model: str = MODEL, **body) -> httpx.Response:
    return httpx.post(
        gateway.url + "/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "Hi"}], **body},
        headers={"Authorization": f"Bearer {plain}"},
        timeout=10,
    )


def error_of(response: httpx.Response) -> dict:
    return response.json()["error"]


def fresh_minute() -> None:
    """Start a test well inside a minute, so per-minute windows do not roll over midway."""
    second = time.time() % 60
    if second > 50:
        time.sleep(60.5 - second)


def test_keys_without_limits_carry_none_into_the_snapshot(db):
    api_key, _ = ApiKey.create_key(name="free", budget_period="month")

    assert KeyLimits.of(api_key) is None


def test_an_expired_key_is_refused_with_401_and_recorded(gateway, upstream):
    api_key, plain = client_key(gateway, expires_at=timezone.now() - timedelta(minutes=1))

    response = chat(gateway, plain)

    assert response.status_code == 401
    assert error_of(response)["code"] == "expired_api_key"
    assert upstream.received(PATH) == []
    gateway.flush_ledger()
    entry = LedgerEntry.objects.get()
    assert (entry.api_key_id, entry.outcome, entry.status_code) == (api_key.pk, "client_error", 401)


def test_an_expired_key_cannot_list_models(gateway, upstream):
    _, plain = client_key(gateway, expires_at=timezone.now() - timedelta(seconds=1))

    response = httpx.get(gateway.url + "/models", headers={"Authorization": f"Bearer {plain}"})

    assert response.status_code == 401


def test_a_key_that_expires_later_works(gateway, upstream):
    _, plain = client_key(gateway, expires_at=timezone.now() + timedelta(days=1))

    assert chat(gateway, plain).status_code == 200


def test_model_patterns_match_canonical_and_requested_ids_ignoring_case(gateway, upstream):
    _, plain = client_key(gateway, allowed_models="OpenAI/*\n*-nano")

    assert chat(gateway, plain).status_code == 200
    assert chat(gateway, plain, "gpt-4o-mini").status_code == 200  # bare id, canonical matches
    refused = chat(gateway, plain, "anthropic/claude-sonnet-4")

    assert refused.status_code == 403
    assert error_of(refused)["code"] == "model_not_allowed"
    models = httpx.get(gateway.url + "/models", headers={"Authorization": f"Bearer {plain}"})
    assert [entry["id"] for entry in models.json()["data"]] == [MODEL]


def test_a_client_outside_the_allowed_networks_is_refused(gateway, upstream):
    _, plain = client_key(gateway, allowed_ips="10.0.0.0/8, 192.168.1.7")

    response = chat(gateway, plain)

    assert response.status_code == 403
    assert error_of(response)["code"] == "ip_not_allowed"
    assert upstream.received(PATH) == []


def test_a_client_inside_the_allowed_networks_is_served(gateway, upstream):
    _, plain = client_key(gateway, allowed_ips="10.0.0.0/8\n127.0.0.0/8")

    assert chat(gateway, plain).status_code == 200


def test_requests_per_minute_hold(gateway, upstream):
    fresh_minute()
    _, plain = client_key(gateway, rpm_limit=3)

    statuses = [chat(gateway, plain).status_code for _ in range(5)]

    assert statuses == [200, 200, 200, 429, 429]
    refused = chat(gateway, plain)
    assert error_of(refused)["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert len(upstream.received(PATH)) == 3


def test_tokens_per_minute_hold(gateway, upstream):
    fresh_minute()
    _, plain = client_key(gateway, tpm_limit=150)  # each answer uses 55 tokens

    statuses = [chat(gateway, plain).status_code for _ in range(4)]

    assert statuses == [200, 200, 200, 429]
    assert len(upstream.received(PATH)) == 3


async def burst(url: str, plain: str, count: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        return await asyncio.gather(
            *(
                client.post(
                    url + "/chat/completions",
                    json={
                        "model": MODEL,
                        "messages": [{"role": "user", "content": "Hi"}],
                        "max_tokens": 50,
                    },
                    headers={"Authorization": f"Bearer {plain}"},
                )
                for _ in range(count)
            )
        )


def test_a_burst_of_50_parallel_requests_ends_within_one_reservation_of_the_budget(
    gateway, upstream
):
    upstream.reply(
        "POST",
        PATH,
        json_body=chat_completion(MODEL, prompt_tokens=5, completion_tokens=50, total_tokens=55),
        delay_s=0.3,
    )
    budget = Decimal("0.001")
    api_key, plain = client_key(gateway, budget_usd=budget)
    # the reservation: 5 prompt tokens x 1 + 50 max tokens x 2 USD per 1M = 0.000105 USD
    reservation = Decimal("0.000105")

    responses = asyncio.run(burst(gateway.url, plain, 50))

    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert (len(served), len(refused)) == (10, 40)  # 10 x 0.000105 crosses 0.001
    assert {error_of(r)["code"] for r in refused} == {"budget_exceeded"}
    assert {error_of(r)["type"] for r in refused} == {"insufficient_quota"}
    gateway.flush_ledger()
    spent = LedgerEntry.objects.filter(status_code=200).aggregate(t=Sum("cost_usd"))["t"]
    assert spent == len(served) * reservation
    assert budget - reservation <= spent <= budget + reservation
    api_key.refresh_from_db()
    assert api_key.spent_usd == spent
    assert chat(gateway, plain, max_tokens=50).status_code == 429


def test_a_budget_counter_starts_from_the_spend_persisted_on_the_key(gateway, upstream):
    api_key, plain = client_key(gateway, budget_usd=Decimal("1"), budget_period="day")
    today = budget_period_start("day", timezone.now())
    ApiKey.objects.filter(pk=api_key.pk).update(
        period_spent_usd=Decimal("1"), period_started_at=today
    )

    response = chat(gateway, plain)

    assert response.status_code == 429
    assert "this day" in error_of(response)["message"]


def test_a_daily_budget_spent_yesterday_is_available_again_today(gateway, upstream):
    api_key, plain = client_key(gateway, budget_usd=Decimal("1"), budget_period="day")
    yesterday = budget_period_start("day", timezone.now() - timedelta(days=1))
    ApiKey.objects.filter(pk=api_key.pk).update(
        spent_usd=Decimal("1"), period_spent_usd=Decimal("1"), period_started_at=yesterday
    )

    assert chat(gateway, plain, max_tokens=50).status_code == 200

    gateway.flush_ledger()
    api_key.refresh_from_db()
    assert api_key.period_started_at == budget_period_start("day", timezone.now())
    assert api_key.period_spent_usd == Decimal("0.000105")
    assert api_key.spent_usd == Decimal("1.000105")


def test_a_disconnected_stream_is_charged_to_the_budget_as_an_estimate(gateway, upstream):
    api_key, plain = client_key(gateway, budget_usd=Decimal("1"))
    words = [f"word{i}" for i in range(50)]
    upstream.stream(PATH, chat_chunks(MODEL, words, None), gap_s=0.05)
    with httpx.stream(
        "POST",
        gateway.url + "/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True},
        headers={"Authorization": f"Bearer {plain}"},
        timeout=10,
    ) as response:
        for chunk in response.iter_raw():
            if b"word3" in chunk:
                break

    entry = gateway.recorded_entry()
    assert (entry.outcome, entry.usage_source) == ("disconnected", "estimated")
    assert entry.cost_usd > 0
    api_key.refresh_from_db()
    assert api_key.spent_usd == entry.cost_usd

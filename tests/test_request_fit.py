"""Request fit: an offer that cannot serve a request is no candidate, and a request no offer can
serve is answered with what the client should do, not with a 503 that SDKs retry."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import httpx
import openai
import pytest
from django.core.management import call_command

from billing.models import LedgerEntry
from tests.factories import make_client_key, make_key, make_offer, make_provider
from tests.fake_upstream import Reply
from tests.payloads import chat_completion

MODEL = "qwen/qwen3-32b"
EMBEDDING = "openai/text-embedding-3-small"
SMALL = "/small/v1/chat/completions"
LARGE = "/large/v1/chat/completions"


@pytest.fixture
def pool(gateway, fake_upstream):
    small = make_provider("small", fake_upstream.url("small/v1"))
    large = make_provider("large", fake_upstream.url("large/v1"))
    make_offer(small, MODEL, input="0.1", output="0.2", context_length=4096)
    make_offer(large, MODEL, input="1", output="2", context_length=32768)
    make_offer(large, EMBEDDING, input="0.02", output="0", kind="embedding")
    small_key = make_key(small, "sk-small-" + "s" * 30, label="small-key")
    large_key = make_key(large, "sk-large-" + "l" * 30, label="large-key")
    for path in (SMALL, LARGE):
        fake_upstream.reply("POST", path, json_body=chat_completion(MODEL, path))
    _, client_key = make_client_key()
    gateway.reload()
    # The SDK's own retries stay on: a client error must not be retried into three rows.
    client = openai.OpenAI(base_url=gateway.url, api_key=client_key, max_retries=2)
    return small_key, large_key, client


def ask(client, *, max_tokens: int = 100, **extra):
    return client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=max_tokens, **extra
    )


def test_an_offer_whose_context_is_too_small_is_no_candidate(pool, fake_upstream):
    *_, client = pool
    assert ask(client, max_tokens=100).headers["x-keyaos-provider"] == "small"
    raw = ask(client, max_tokens=8000)
    assert raw.headers["x-keyaos-provider"] == "large"
    assert raw.headers["x-keyaos-attempts"] == "1"
    assert len(fake_upstream.received(SMALL)) == 1


def test_route_says_why_an_offer_does_not_fit(pool, capsys):
    call_command("route", MODEL, "--prompt-tokens", "1000", "--max-tokens", "8000")
    out = capsys.readouterr().out
    assert "small key - model qwen/qwen3-32b: context length 4096 < 9000 tokens" in out
    assert "1. large key large-key" in out
    assert "context 32768, fits" in out


def test_when_no_offer_fits_the_client_gets_context_length_exceeded_once(pool, gateway):
    *_, client = pool
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, max_tokens=40000)
    error = refused.value.body
    assert error["code"] == "context_length_exceeded"
    assert "32768" in error["message"] and "max_tokens" in error["message"]
    gateway.flush_ledger()
    entry = LedgerEntry.objects.get()
    assert (entry.status_code, entry.outcome, entry.attempts) == (400, "client_error", 0)


def test_a_chat_request_for_an_embedding_model_is_told_where_to_go(pool, gateway):
    *_, client = pool
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=EMBEDDING, messages=[{"role": "user", "content": "Hi"}]
        )
    assert refused.value.body["code"] == "wrong_model_kind"
    assert "/v1/embeddings" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as reverse:
        client.embeddings.create(model=MODEL, input="Hi")
    assert reverse.value.body["code"] == "wrong_model_kind"
    assert "/v1/chat/completions" in reverse.value.body["message"]
    gateway.flush_ledger()
    assert LedgerEntry.objects.filter(outcome="client_error", status_code=400).count() == 2
    assert LedgerEntry.objects.count() == 2


def test_a_provider_preference_that_matches_no_offer_is_the_clients_error(pool, gateway):
    *_, client = pool
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, extra_body={"provider": {"only": ["nowhere"]}})
    body = refused.value.body
    assert body["code"] == "no_matching_provider"
    assert "large, small" in body["message"]
    assert body["param"] == "provider"
    gateway.flush_ledger()
    assert LedgerEntry.objects.count() == 1


def test_every_key_cooling_after_429s_gives_429_with_the_first_cooldowns_end(
    pool, gateway, fake_upstream
):
    *_, client = pool
    fake_upstream.reply("POST", SMALL, status=429, json_body={}, headers={"Retry-After": "40"})
    fake_upstream.reply("POST", LARGE, status=429, json_body={}, headers={"Retry-After": "90"})
    plain = openai.OpenAI(base_url=gateway.url, api_key=client.api_key, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        ask(plain)
    started = time.time()
    with httpx.Client() as http:
        answer = http.post(
            f"{gateway.url}/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]},
            headers={"Authorization": f"Bearer {client.api_key}"},
        )
    assert answer.status_code == 429
    assert answer.json()["error"]["code"] == "rate_limited"
    assert 38 <= int(answer.headers["Retry-After"]) <= 41 + (time.time() - started)
    assert len(fake_upstream.received(SMALL)) == 1  # the second request tried no key


def test_a_key_whose_balance_would_not_cover_its_requests_in_flight_is_skipped(
    gateway, fake_upstream
):
    cheap = make_provider("cheap", fake_upstream.url("cheap/v1"))
    dear = make_provider("dear", fake_upstream.url("dear/v1"))
    make_offer(cheap, MODEL, input="1", output="1")
    make_offer(dear, MODEL, input="2", output="2")
    # Each request below is estimated at (about 5 + 1000 tokens) x 1 USD / 1M ~ 0.001 USD.
    make_key(cheap, "sk-cheap-" + "c" * 30, label="one-cent", balance=Decimal("0.0025"))
    make_key(dear, "sk-dear-" + "d" * 30, label="dear")
    slow = Reply(json_body=chat_completion(MODEL), delay_s=1.0)
    fake_upstream.handle("POST", "/cheap/v1/chat/completions", lambda _: slow)
    fake_upstream.handle("POST", "/dear/v1/chat/completions", lambda _: slow)
    _, client_key = make_client_key()
    gateway.reload()

    async def burst():
        async with httpx.AsyncClient(timeout=30) as http:
            return await asyncio.gather(
                *(
                    http.post(
                        f"{gateway.url}/chat/completions",
                        json={
                            "model": MODEL,
                            "messages": [{"role": "user", "content": "Hi"}],
                            "max_tokens": 1000,
                        },
                        headers={"Authorization": f"Bearer {client_key}"},
                    )
                    for _ in range(12)
                )
            )

    answers = asyncio.run(burst())
    assert [answer.status_code for answer in answers] == [200] * 12
    served_by = [answer.headers["x-keyaos-key"] for answer in answers]
    assert served_by.count("one-cent") == 2
    assert served_by.count("dear") == 10

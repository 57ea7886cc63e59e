"""``/health``, ``/ready`` and ``/metrics`` on the served gateway, over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from billing.models import LedgerEntry
from routing.runtime import runtime
from tests.factories import make_client_key, make_key, make_offer, make_provider
from tests.fake_upstream import Reply, free_port
from tests.payloads import chat_completion, upstream_error

UPSTREAM_SECRET = "sk-or-v1-" + "s" * 40
CHAT_PATH = "/openrouter/api/v1/chat/completions"


def base(gateway) -> str:
    return gateway.url.removesuffix("/v1")


@pytest.fixture
def setup(gateway, fake_upstream):
    provider = make_provider("openrouter", fake_upstream.url("openrouter/api/v1"))
    make_offer(provider, "openai/gpt-4o-mini", input="1", output="2")
    make_key(provider, UPSTREAM_SECRET, label="main")
    _, client_key = make_client_key("probe-client")
    gateway.reload()
    client = openai.OpenAI(base_url=gateway.url, api_key=client_key, max_retries=0)
    return client


def samples(text: str) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def ask(client: openai.OpenAI, model: str = "openai/gpt-4o-mini"):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}])


def scrape(gateway, **headers) -> dict[tuple[str, tuple], float]:
    response = httpx.get(base(gateway) + "/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


def total(found: dict, name: str, **labels: str) -> float:
    return sum(
        value
        for (sample, sample_labels), value in found.items()
        if sample == name and labels.items() <= dict(sample_labels).items()
    )


def test_health_answers_without_a_key_and_leaves_no_ledger_row(gateway):
    response = httpx.get(base(gateway) + "/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    gateway.flush_ledger()
    assert LedgerEntry.objects.count() == 0


def test_ready_answers_200_when_database_cache_snapshot_and_ledger_answer(gateway):
    response = httpx.get(base(gateway) + "/ready")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready" and body["failing"] == {}
    assert body["snapshot_age_s"] < 5
    gateway.flush_ledger()
    assert LedgerEntry.objects.count() == 0


def test_ready_names_the_cache_when_it_does_not_answer(gateway, settings):
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{free_port()}/0",
        }
    }
    response = httpx.get(base(gateway) + "/ready", timeout=10)
    assert response.status_code == 503
    body = response.json()
    assert list(body["failing"]) == ["cache"]
    assert "ConnectionError" in body["failing"]["cache"]


def test_ready_answers_503_at_once_while_draining(gateway):
    runtime.draining = True
    try:
        response = httpx.get(base(gateway) + "/ready")
    finally:
        runtime.draining = False
    assert response.status_code == 503
    assert response.json()["failing"] == {"draining": "the process is stopping"}


def test_ready_shows_upstream_keys_that_cannot_be_decrypted_as_degraded(gateway, fake_upstream):
    provider = make_provider("openrouter", fake_upstream.url("openrouter/api/v1"))
    key = make_key(provider, UPSTREAM_SECRET, label="lost")
    type(key).objects.filter(pk=key.pk).update(secret_encrypted="gAAAAA-not-a-token")
    gateway.reload()
    response = httpx.get(base(gateway) + "/ready")
    assert response.status_code == 200
    assert "lost" in response.json()["degraded"][0]
    assert UPSTREAM_SECRET not in response.text


def test_the_request_counter_grows_by_exactly_the_requests_sent(setup, gateway, fake_upstream):
    client = setup
    fake_upstream.reply(
        "POST",
        CHAT_PATH,
        json_body=chat_completion("openai/gpt-4o-mini", prompt_tokens=10, completion_tokens=5),
    )
    before = scrape(gateway)
    for _ in range(7):
        ask(client)
    httpx.get(base(gateway) + "/health")
    httpx.get(base(gateway) + "/ready")
    after = scrape(gateway)

    name = "keyaos_requests_total"
    labels = {"endpoint": "chat/completions", "status": "200", "outcome": "ok"}
    assert total(after, name, **labels) - total(before, name, **labels) == 7
    assert total(after, name) - total(before, name) == 7
    attempts = "keyaos_upstream_attempts_total"
    ok = {"provider": "openrouter", "key": "main", "result": "ok"}
    assert total(after, attempts, **ok) - total(before, attempts, **ok) == 7
    tokens = "keyaos_tokens_total"
    prompt = {"provider": "openrouter", "type": "prompt"}
    assert total(after, tokens, **prompt) - total(before, tokens, **prompt) == 70
    cost = "keyaos_cost_total"
    usd = {"provider": "openrouter", "currency": "USD"}
    assert total(after, cost, **usd) - total(before, cost, **usd) == pytest.approx(7 * 20e-6)
    duration = "keyaos_request_duration_seconds_count"
    assert total(after, duration) - total(before, duration) == 7
    assert after[("keyaos_upstream_key_up", (("key", "main"), ("provider", "openrouter")))] == 1


def test_failed_attempts_are_counted_by_failure_class(setup, gateway, fake_upstream):
    client = setup
    fake_upstream.reply(
        "POST",
        CHAT_PATH,
        status=429,
        json_body=upstream_error("slow down"),
        headers={"Retry-After": "30"},
    )
    before = scrape(gateway)
    with pytest.raises(openai.RateLimitError):
        ask(client)
    gateway.flush_ledger()
    after = scrape(gateway)
    limited = {"provider": "openrouter", "key": "main", "result": "rate_limited"}
    name = "keyaos_upstream_attempts_total"
    assert total(after, name, **limited) - total(before, name, **limited) == 1
    requests = {"status": "429", "outcome": "upstream_error"}
    name = "keyaos_requests_total"
    assert total(after, name, **requests) - total(before, name, **requests) == 1
    health = (("health", "cooling_down"), ("key", "main"), ("provider", "openrouter"))
    assert after[("keyaos_upstream_key_health", health)] == 1


def test_many_requests_in_flight_with_failures_are_each_counted_once(setup, gateway, fake_upstream):
    client = setup
    calls = {"n": 0}

    def answer(_request):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            return Reply(status=400, json_body=upstream_error("bad request"))
        return Reply(json_body=chat_completion("openai/gpt-4o-mini"), delay_s=0.05)

    fake_upstream.handle("POST", CHAT_PATH, answer)
    async_client = openai.AsyncOpenAI(base_url=gateway.url, api_key=client.api_key, max_retries=0)
    before = scrape(gateway)

    async def one():
        with contextlib.suppress(openai.BadRequestError):
            await async_client.chat.completions.create(
                model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}]
            )

    async def all_of_them():
        await asyncio.gather(*(one() for _ in range(30)))

    asyncio.run(all_of_them())
    gateway.flush_ledger()
    after = scrape(gateway)
    name = "keyaos_requests_total"
    assert total(after, name) - total(before, name) == 30
    assert total(after, name, status="400") - total(before, name, status="400") == 10
    assert after[("keyaos_requests_in_flight", ())] == 0


class _Tally:
    """Stands for a labelled metric child: what ``_Pending`` finally applies to it."""

    def __init__(self) -> None:
        self.total = 0.0

    def inc(self, amount: float) -> None:
        self.total += amount


def test_counts_left_when_an_event_loop_ends_are_applied_and_counting_goes_on_in_the_next():
    """The gateway's loop can end before the flush timer fires (a restart in one process, each
    test's loop): the next loop's first count applies the old ones and starts a timer of its
    own, instead of waiting for a timer that will never fire."""
    from routing.observe import FLUSH_S, _Pending

    pending, tally = _Pending(), _Tally()

    async def count(wait_s: float) -> None:
        pending.inc(tally)
        await asyncio.sleep(wait_s)

    asyncio.run(count(0))
    assert tally.total == 0  # not yet due
    asyncio.run(count(FLUSH_S + 0.3))

    assert tally.total == 2


def test_metrics_need_the_token_when_one_is_set(gateway, settings):
    settings.KEYAOS_METRICS_TOKEN = "metrics-token-123"
    assert httpx.get(base(gateway) + "/metrics").status_code == 403
    wrong = httpx.get(base(gateway) + "/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403
    scrape(gateway, Authorization="Bearer metrics-token-123")


def test_metrics_without_a_token_answer_loopback_clients_only(gateway):
    # uvicorn trusts X-Forwarded-For from loopback (a proxy on this machine): the client is then
    # the address the proxy names.
    forwarded = httpx.get(base(gateway) + "/metrics", headers={"X-Forwarded-For": "203.0.113.9"})
    assert forwarded.status_code == 403
    scrape(gateway)


def test_metrics_carry_no_secret_and_no_client_model_name(setup, gateway, fake_upstream):
    client = setup
    fake_upstream.reply(
        "POST",
        CHAT_PATH,
        status=401,
        json_body=upstream_error(f"bad key {UPSTREAM_SECRET}"),
    )
    with pytest.raises(openai.APIStatusError):
        ask(client)
    with pytest.raises(openai.NotFoundError):
        ask(client, "made-up-model-xyz")
    gateway.flush_ledger()
    text = httpx.get(base(gateway) + "/metrics").text
    assert UPSTREAM_SECRET not in text and client.api_key not in text
    assert "made-up-model-xyz" not in text
    assert "req_" not in text

"""Key health under concurrent load, over real HTTP: a blip is not an outage.

Each test drives the served gateway with many requests in flight against fake upstreams whose
answers change with time or at random, and counts what the clients got.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import httpx
import pytest

from providers.models import UpstreamKey
from routing.runtime import runtime
from tests.factories import make_client_key, make_key, make_offer, make_provider
from tests.fake_upstream import Reply
from tests.payloads import chat_completion

MODEL = "acme/chat-1"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
OK_REPLY = Reply(json_body=chat_completion(MODEL, "fine"))
DOWN_REPLY = Reply(status=503, json_body={"error": {"message": "overloaded"}})


def world(gateway, fake_upstream, keys_per_provider: int, providers: int = 1):
    """Providers ``p0``, ``p1``..., each with keys; returns the client key and upstream paths."""
    paths, keys = [], []
    for index in range(providers):
        slug = f"p{index}"
        provider = make_provider(slug, fake_upstream.url(f"{slug}/v1"), read_timeout_s=5.0)
        make_offer(provider, "chat-1", canonical_id=MODEL, input="1", output="2")
        for number in range(keys_per_provider):
            keys.append(
                make_key(provider, f"sk-{slug}-{number}-" + "x" * 24, label=f"{slug}-{number}")
            )
        paths.append(f"/{slug}/v1/chat/completions")
    _, client_key = make_client_key()
    gateway.reload()
    return client_key, paths, keys


async def load(url: str, client_key: str, *, concurrency: int, duration_s: float, enough=None):
    """``concurrency`` clients asking one after another for ``duration_s`` (or, with
    ``enough(results)``, until it holds, at most 30 s): a list of (started, status)."""
    results: list[tuple[float, int]] = []
    started_at = time.monotonic()

    def done() -> bool:
        now = time.monotonic()
        if enough is None:
            return now >= started_at + duration_s
        return now >= started_at + 30 or (now >= started_at + duration_s and enough(results))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {client_key}"}, limits=limits, timeout=30
    ) as client:

        async def one_client():
            while not done():
                started = time.monotonic()
                response = await client.post("/chat/completions", json=BODY)
                results.append((started, response.status_code))

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return results


def served_share(results, since: float = 0.0) -> tuple[float, int]:
    counted = [status for started, status in results if started >= since]
    return sum(status == 200 for status in counted) / max(len(counted), 1), len(counted)


def cooldowns_set(keys):
    """Every cooldown the gateway's board holds or last closed, for these keys."""
    board = runtime.board
    found = []
    for key in keys:
        for table in (board.cooldowns, board.closed):
            if key.pk in table:
                found.append(table[key.pk])
    return found


@pytest.mark.slow
def test_twenty_requests_meeting_a_short_burst_cool_the_key_at_most_twice_the_base(
    gateway, fake_upstream, settings
):
    settings.KEYAOS_TRANSIENT_COOLDOWN_S = 5
    client_key, [path], keys = world(gateway, fake_upstream, keys_per_provider=1)
    burst = {}

    def answer(_request):
        """The first twenty requests all fail, each held to the end of a 0.2 s burst."""
        now = time.monotonic()
        start = burst.setdefault("start", now)
        burst["refused"] = burst.get("refused", 0) + 1
        if burst["refused"] > 20:
            return OK_REPLY
        return Reply(
            status=503, json_body={"error": {"message": "burst"}}, delay_s=start + 0.2 - now
        )

    def enough(results) -> bool:
        return "start" in burst and served_share(results, since=burst["start"] + 0.7)[1] >= 40

    fake_upstream.handle("POST", path, answer)
    results = asyncio.run(
        load(gateway.url, client_key, concurrency=20, duration_s=1.5, enough=enough)
    )
    gateway.flush_ledger()
    assert burst.get("refused", 0) >= 20, "fewer than twenty requests met the burst"
    cooldowns = cooldowns_set(keys)  # none at all when the burst stayed under the trip ratio
    assert all(c.seconds <= 2 * 5 + 0.01 and c.trips <= 2 for c in cooldowns), cooldowns
    key = UpstreamKey.objects.get(pk=keys[0].pk)
    if key.cooldown_until is not None:
        assert (key.cooldown_until - key.last_error_at).total_seconds() <= 2 * 5 + 0.01
    share, counted = served_share(results, since=burst["start"] + 0.7)
    assert counted >= 40 and share == 1.0, "the only key stayed out of routing after the burst"


@pytest.mark.slow
def test_a_blip_on_every_key_is_not_an_outage(gateway, fake_upstream):
    client_key, paths, _ = world(gateway, fake_upstream, keys_per_provider=2, providers=2)
    blip = {}

    def answer(_request):
        now = time.monotonic()
        start = blip.setdefault("start", now + 0.4)
        if start <= now < start + 0.3:  # held to the blip's end: every request in flight meets it
            blip["refused"] = blip.get("refused", 0) + 1
            return Reply(
                status=503, json_body={"error": {"message": "blip"}}, delay_s=start + 0.3 - now
            )
        return OK_REPLY

    for path in paths:
        fake_upstream.handle("POST", path, answer)

    def enough(results) -> bool:  # a machine shared with other work may serve slowly
        return "start" in blip and served_share(results, since=blip["start"] + 2.3)[1] >= 60

    results = asyncio.run(
        load(gateway.url, client_key, concurrency=20, duration_s=3.5, enough=enough)
    )
    gateway.flush_ledger()
    assert blip.get("refused", 0) >= 10, "the blip was not met"
    after, counted = served_share(results, since=blip["start"] + 0.3 + 2.0)
    assert counted >= 60, f"only {counted} requests after the blip in the time allowed"
    assert after >= 0.99, f"{after:.1%} of {counted} requests served after the blip"


@pytest.mark.slow
def test_a_twenty_percent_error_rate_over_three_keys_serves_nearly_everything(
    gateway, fake_upstream
):
    client_key, paths, _ = world(gateway, fake_upstream, keys_per_provider=1, providers=3)
    chance = random.Random(11)

    def answer(_request):
        return DOWN_REPLY if chance.random() < 0.2 else OK_REPLY

    for path in paths:
        fake_upstream.handle("POST", path, answer)
    results = asyncio.run(
        load(
            gateway.url,
            client_key,
            concurrency=20,
            duration_s=2.5,
            enough=lambda results: len(results) >= 300,
        )
    )
    gateway.flush_ledger()
    share, counted = served_share(results)
    assert counted >= 300
    assert share >= 0.97, f"{share:.1%} of {counted} requests served"


def test_a_success_and_a_failure_racing_on_one_key_leave_no_failed_background_work(
    gateway, fake_upstream, settings, caplog
):
    settings.KEYAOS_TRIP_MIN_FAILURES = 1
    settings.KEYAOS_TRIP_FAILURE_RATIO = 0.0
    settings.KEYAOS_TRANSIENT_COOLDOWN_S = 0.05
    client_key, [path], keys = world(gateway, fake_upstream, keys_per_provider=1)
    flip = iter(range(10**6))
    fake_upstream.handle("POST", path, lambda _r: DOWN_REPLY if next(flip) % 2 else OK_REPLY)
    with caplog.at_level(logging.ERROR):
        results = asyncio.run(load(gateway.url, client_key, concurrency=20, duration_s=1.0))
        gateway.flush_ledger()
    assert {status for _, status in results} >= {200}
    assert not [r for r in caplog.records if "background work" in r.getMessage()]
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]

"""Client key limits with Redis: shared counters, and a Redis outage that degrades, never fails.

Each test starts its own redis-server on a free port (never the shared one), stops and restarts
it as the scenario needs, and removes it afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import time
from collections import Counter
from decimal import Decimal

import httpx
import pytest

from billing.counters import BUDGET_REFUSED, Admission, Counters
from billing.limits import KeyLimits, LimitExceeded, admit, cover, release, settle
from billing.models import ApiKey, LedgerEntry
from tests.factories import make_world
from tests.fake_upstream import free_port
from tests.payloads import chat_completion

MODEL = "openai/gpt-4o-mini"
PATH = "/openrouter/api/v1/chat/completions"

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")


class OwnRedis:
    """A redis-server of this test's own, without persistence: a restart starts empty."""

    def __init__(self, directory) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            probe = subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True
            )
            if probe.stdout.strip() == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def counter(self, key: str) -> str:
        """A limit counter's value (the ``n`` of its hash; "" when there is none)."""
        result = subprocess.run(
            ["redis-cli", "-p", str(self.port), "hget", key, "n"], capture_output=True, text=True
        )
        return result.stdout.strip()


@pytest.fixture
def own_redis(tmp_path):
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_gateway(gateway, fake_upstream, own_redis):
    """The gateway counting limits in the test's own Redis."""

    async def use_own_redis():
        from routing.runtime import runtime

        await runtime.counters.close()
        runtime.counters = Counters(own_redis.url, timeout_s=0.5, retry_s=0.5)

    gateway.run(use_own_redis())
    make_world(
        fake_upstream,
        model=MODEL,
        input="1",
        output="2",
        reply=chat_completion(MODEL, prompt_tokens=5, completion_tokens=50, total_tokens=55),
    )
    yield gateway
    gateway.reset_health()


def limited_key(gateway, **limits) -> str:
    _, plain = ApiKey.create_key(name="limited", **limits)
    gateway.reload()
    return plain


def counter_state():
    from routing.runtime import runtime

    return runtime.counters.state()


def test_the_counters_live_in_redis(redis_gateway, own_redis):
    plain = limited_key(redis_gateway, budget_usd=Decimal("1"), rpm_limit=1000)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50}

    response = httpx.post(
        redis_gateway.url + "/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {plain}"},
    )

    assert response.status_code == 200
    redis_gateway.flush_ledger()
    api_key = ApiKey.objects.get(name="limited")
    # 5 prompt tokens x 1 + 50 completion tokens x 2 USD per 1M = 0.000105 USD = 105,000 nano-USD
    assert own_redis.counter(f"keyaos:limits:budget:{api_key.pk}:all") == "105000"
    assert counter_state().backend == "redis"


def test_two_gateway_processes_share_budget_counters(own_redis):
    limits = KeyLimits(key_id=42, budget_usd=Decimal("0.01"), rpm_limit=5)

    async def load_spent(*_args):
        return Decimal("0")

    async def two_processes():
        first_process, second_process = Counters(own_redis.url), Counters(own_redis.url)
        ask = {"estimated_tokens": 10, "load_spent": load_spent}
        first = await admit(first_process, limits, estimated_cost_usd=Decimal("0.006"), **ask)
        await settle(first_process, first, cost_usd=Decimal("0.006"), tokens=10)
        second = await admit(second_process, limits, estimated_cost_usd=Decimal("0.006"), **ask)
        with pytest.raises(LimitExceeded) as refused:
            await admit(first_process, limits, estimated_cost_usd=Decimal("0.001"), **ask)
        assert own_redis.counter("keyaos:limits:budget:42:all") == "12000000"  # nano-dollars
        await settle(second_process, second, cost_usd=Decimal("0.002"), tokens=10)
        await first_process.close()
        await second_process.close()
        return refused.value

    refusal = asyncio.run(two_processes())

    assert refusal.code == "budget_exceeded"
    assert own_redis.counter("keyaos:limits:budget:42:all") == "8000000"


async def _load(url: str, plain: str, until: float, workers: int) -> list[httpx.Response]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50}
    responses: list[httpx.Response] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < until:
            responses.append(
                await client.post(
                    url + "/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {plain}"},
                )
            )
            await asyncio.sleep(0.01)

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(workers)))
    return responses


@pytest.mark.slow
def test_redis_stopped_for_10_s_under_load_gives_no_5xx(redis_gateway, own_redis, caplog):
    plain = limited_key(redis_gateway, budget_usd=Decimal("100"), rpm_limit=100_000)
    from routing.runtime import runtime

    outage_s = 10
    states, reasons = [], []

    async def scenario():
        started = time.monotonic()
        load = asyncio.create_task(
            _load(redis_gateway.url, plain, started + outage_s + 5, workers=8)
        )
        await asyncio.sleep(2)
        await asyncio.to_thread(own_redis.stop)
        await asyncio.sleep(outage_s / 2)
        states.append(counter_state())
        reasons.append(runtime.counters.fallback_reason())
        await asyncio.sleep(outage_s / 2)
        await asyncio.to_thread(own_redis.start)
        await asyncio.sleep(2.5)
        states.append(counter_state())
        reasons.append(runtime.counters.fallback_reason())
        return await load

    with caplog.at_level(logging.WARNING, logger="keyaos.limits"):
        responses = asyncio.run(scenario())

    statuses = Counter(response.status_code for response in responses)
    assert statuses == {200: len(responses)}, statuses
    assert all(response.headers.get("x-request-id") for response in responses)
    assert len(responses) > 100
    during, after = states
    assert (during.backend, during.degraded) == ("local", True)
    assert during.error.startswith("ConnectionError")
    assert (after.backend, after.degraded) == ("redis", False)
    assert reasons[0].startswith("Redis unreachable since ") and reasons[1] is None
    unreachable = [r for r in caplog.records if "Redis is unreachable" in r.getMessage()]
    assert len(unreachable) == 1
    redis_gateway.flush_ledger()
    assert LedgerEntry.objects.filter(status_code=200).count() == len(responses)


@pytest.mark.parametrize("store", ["local", "redis"])
def test_a_reservation_grows_to_a_dearer_attempt_only_while_it_fits(own_redis, store):
    limits = KeyLimits(key_id=7, budget_usd=Decimal("0.01"))

    async def load_spent(*_args):
        return Decimal("0.004")

    async def failover():
        counters = Counters(own_redis.url if store == "redis" else "")
        ask = {"estimated_tokens": 10, "load_spent": load_spent}
        first = await admit(counters, limits, estimated_cost_usd=Decimal("0.001"), **ask)
        second = await admit(counters, limits, estimated_cost_usd=Decimal("0.001"), **ask)
        await cover(counters, first, Decimal("0.003"))  # 0.004 + 0.003 + 0.001 fits in 0.01
        with pytest.raises(LimitExceeded) as refused:
            await cover(counters, second, Decimal("0.004"))  # 0.008 + 0.003 would not
        reserved = (first.reserved_nanos, second.reserved_nanos)
        await settle(counters, first, cost_usd=Decimal("0.0025"), tokens=10)
        await release(counters, second)
        total = await counters.admit(
            Admission(window_ttl_s=120, budget_key="budget:7:all", budget_nanos=0)
        )
        await counters.close()
        return refused.value, reserved, total

    refusal, reserved, total = asyncio.run(failover())

    assert refusal.code == "budget_exceeded"
    assert reserved == (3_000_000, 1_000_000)
    assert total.code == BUDGET_REFUSED  # the counter still exists, at 0.004 + 0.0025
    if store == "redis":
        assert own_redis.counter("keyaos:limits:budget:7:all") == "6500000"


def _script_calls(port: int) -> int:
    stats = subprocess.run(
        ["redis-cli", "-p", str(port), "info", "commandstats"], capture_output=True, text=True
    ).stdout
    return sum(
        int(line.split("calls=")[1].split(",")[0])
        for line in stats.splitlines()
        if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:"))
    )


async def _nothing_spent(*_args):
    return Decimal("0")


async def _served(counters: Counters, limits: KeyLimits, *, cost_usd: Decimal):
    """One request estimated at 0.001 USD, admitted and settled at ``cost_usd``."""
    reservation = await admit(
        counters,
        limits,
        estimated_cost_usd=Decimal("0.001"),
        estimated_tokens=1,
        load_spent=_nothing_spent,
    )
    await settle(counters, reservation, cost_usd=cost_usd, tokens=1)
    return reservation


def test_most_admissions_come_from_a_lease_and_what_is_left_goes_back(own_redis):
    limits = KeyLimits(key_id=3, budget_usd=Decimal("10"), rpm_limit=100_000, tpm_limit=10**9)
    ask = {"estimated_tokens": 20, "load_spent": _nothing_spent}

    windows = {int(time.time()) // 60}

    async def hundred_requests():
        counters = Counters(own_redis.url)
        before = _script_calls(own_redis.port)
        for _ in range(100):
            reservation = await admit(counters, limits, estimated_cost_usd=Decimal("0.001"), **ask)
            await settle(counters, reservation, cost_usd=Decimal("0.0004"), tokens=30)
        calls = _script_calls(own_redis.port) - before
        windows.add(int(time.time()) // 60)  # two when a minute began meanwhile
        held = counters.leased("budget:3:all")
        while_leased = own_redis.counter("keyaos:limits:budget:3:all")
        await counters.close()  # gives the leases back
        return calls, held, while_leased

    calls, held, while_leased = asyncio.run(hundred_requests())

    assert calls <= 10, calls  # admissions and settlements, against 200 without leases
    assert held > 0
    assert int(while_leased) == 100 * 400_000 + held  # a lease is counted in Redis meanwhile
    assert own_redis.counter("keyaos:limits:budget:3:all") == str(100 * 400_000)
    tokens = [own_redis.counter(f"keyaos:limits:tpm:3:{window}") for window in windows]
    assert sum(int(count or 0) for count in tokens) == 100 * 30


def test_processes_admitting_at_once_never_pass_the_budget_by_more_than_one_request(own_redis):
    """Three processes, 300 requests in flight at once with reservations of 1 to 9 units and
    answers that cost what was reserved: admitted spend stays within budget + one reservation,
    and Redis ends at exactly what was spent."""
    budget_units, unit = 400, Decimal("0.00001")
    limits = KeyLimits(key_id=5, budget_usd=budget_units * unit)

    async def crowd():
        processes = [Counters(own_redis.url) for _ in range(3)]

        async def one_request(number: int) -> int:
            counters = processes[number % 3]
            cost = unit * (1 + number % 9)
            try:
                reservation = await admit(
                    counters,
                    limits,
                    estimated_cost_usd=cost,
                    estimated_tokens=1,
                    load_spent=_nothing_spent,
                )
            except LimitExceeded:
                return 0
            await asyncio.sleep(0.001 * (number % 7))
            await settle(counters, reservation, cost_usd=cost, tokens=1)
            return 1 + number % 9

        spent = []
        for _ in range(3):  # waves: later ones meet leases and settled room
            spent += await asyncio.gather(*(one_request(n) for n in range(300)))
        for counters in processes:
            await counters.close()
        return sum(spent)

    spent_units = asyncio.run(crowd())

    assert budget_units - 9 <= spent_units <= budget_units + 9
    assert own_redis.counter("keyaos:limits:budget:5:all") == str(spent_units * 10_000)


def test_a_lease_from_before_redis_restarted_is_not_given_back_to_the_new_counter(own_redis):
    limits = KeyLimits(key_id=9, budget_usd=Decimal("10"))
    ask = {"estimated_tokens": 1, "load_spent": _nothing_spent}

    async def restart_midway():
        counters = Counters(own_redis.url, retry_s=0)
        first = await admit(counters, limits, estimated_cost_usd=Decimal("0.01"), **ask)
        held = counters.leased("budget:9:all")
        await asyncio.to_thread(own_redis.stop)
        await asyncio.to_thread(own_redis.start)

        async def spent_before(*_args):
            return Decimal("1")  # what the ledger had persisted by then

        other = Counters(own_redis.url)
        ask["load_spent"] = spent_before
        second = await admit(other, limits, estimated_cost_usd=Decimal("0.02"), **ask)
        await settle(counters, first, cost_usd=Decimal("0.005"), tokens=1)
        await counters.close()  # its lease and settlement belong to the counter Redis lost
        await settle(other, second, cost_usd=Decimal("0.02"), tokens=1)
        await other.close()
        return held

    held = asyncio.run(restart_midway())

    assert held > 0
    assert own_redis.counter("keyaos:limits:budget:9:all") == str(1_020_000_000)


def test_a_redis_that_stops_answering_and_comes_back_ends_at_exactly_what_was_spent(own_redis):
    """Leases held when Redis stops answering (paused, its data kept), requests counted locally
    meanwhile, and requests after it is back: the counter ends at the spend of all of them."""
    limits = KeyLimits(key_id=11, budget_usd=Decimal("10"), rpm_limit=100_000)
    ask = {"estimated_tokens": 10, "load_spent": _nothing_spent}

    async def requests(counters: Counters, count: int, *, until_local: bool = False) -> list:
        shared = []
        for _ in range(count):
            reservation = await admit(counters, limits, estimated_cost_usd=Decimal("0.001"), **ask)
            await settle(counters, reservation, cost_usd=Decimal("0.0003"), tokens=10)
            shared.append(reservation.shared)
            if until_local and not reservation.shared:
                break
        return shared

    async def outage():
        counters = Counters(own_redis.url, timeout_s=0.2, retry_s=0.3)
        before = await requests(counters, 20)
        held = counters.leased("budget:11:all")
        subprocess.run(["redis-cli", "-p", str(own_redis.port), "client", "pause", "1500"])
        # the leases serve on; the first request they cannot hold falls back to this process
        during = await requests(counters, 10_000, until_local=True)
        during += await requests(counters, 20)
        await asyncio.sleep(2)
        after = await requests(counters, 20)
        state = counters.state()
        await counters.close()
        return before, held, during, after, state

    before, held, during, after, state = asyncio.run(outage())

    assert all(before) and held > 0
    assert not any(during[-21:])  # counted here meanwhile
    assert after[-1] and state.backend == "redis"
    total = len(before) + len(during) + len(after)
    assert own_redis.counter("keyaos:limits:budget:11:all") == str(total * 300_000)


def test_a_counter_written_before_generations_is_carried_over_with_its_value_and_expiry(own_redis):
    key = "keyaos:limits:budget:13:all"
    cli = ["redis-cli", "-p", str(own_redis.port)]
    subprocess.run([*cli, "set", key, "4000000", "ex", "5000"], capture_output=True)
    limits = KeyLimits(key_id=13, budget_usd=Decimal("0.01"))

    async def one_request():
        counters = Counters(own_redis.url)
        reservation = await _served(counters, limits, cost_usd=Decimal("0.0005"))
        await counters.close()
        return reservation

    reservation = asyncio.run(one_request())

    assert reservation.shared and reservation.budget_generation
    assert own_redis.counter(key) == "4500000"
    ttl = subprocess.run([*cli, "ttl", key], capture_output=True, text=True).stdout
    assert 4900 < int(ttl) <= 5000


def test_what_is_left_of_a_lease_goes_back_to_redis_within_two_seconds(own_redis):
    limits = KeyLimits(key_id=15, budget_usd=Decimal("10"))

    async def one_request_then_wait():
        counters = Counters(own_redis.url)
        await _served(counters, limits, cost_usd=Decimal("0.0004"))
        held = counters.leased("budget:15:all")
        while_held = own_redis.counter("keyaos:limits:budget:15:all")
        await asyncio.sleep(2.1)
        after = own_redis.counter("keyaos:limits:budget:15:all")
        left = counters.leased("budget:15:all")
        await counters.close()
        return held, while_held, after, left

    held, while_held, after, left = asyncio.run(one_request_then_wait())

    assert held > 0 and int(while_held) == 400_000 + held
    assert (after, left) == ("400000", 0)  # given back without a close

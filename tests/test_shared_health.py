"""Cooldowns are shared through the cache: with Redis, every gateway process sees them."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import pytest

from providers.upstream import Failure
from routing.health import HealthBoard
from routing.snapshot import KeyInfo
from tests.served import redis_answers


def key(key_id: int = 1, cooldown_until: datetime | None = None) -> KeyInfo:
    return KeyInfo(
        id=key_id,
        provider_id=1,
        name="k",
        masked="sk-...1234",
        secret="sk-secret",
        multiplier=1,
        balance=None,
        health="ok",
        cooldown_until=cooldown_until,
        last_error="",
    )


@pytest.mark.skipif(not redis_answers(), reason="Redis is not running on 127.0.0.1:6379")
@pytest.mark.django_db(transaction=True)
def test_a_429_seen_by_one_process_cools_the_key_in_another(settings):
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:6379/0",
            "KEY_PREFIX": f"keyaos-test-{time.monotonic_ns()}",
        }
    }
    first, second = HealthBoard(), HealthBoard()  # two gateway processes
    asyncio.run(first.record_failure(key(), Failure.RATE_LIMITED, "slow down", retry_after_s=30))
    assert second.unusable_reason(key()) is None
    asyncio.run(second.merge_shared([1]))
    reason = second.unusable_reason(key())
    assert reason is not None and reason.startswith("cooling down")


@pytest.mark.django_db(transaction=True)
def test_each_failed_probe_doubles_the_cooldown_up_to_the_cap(settings):
    settings.KEYAOS_TRANSIENT_COOLDOWN_S = 5
    settings.KEYAOS_MAX_COOLDOWN_S = 12
    settings.KEYAOS_TRIP_MIN_FAILURES = 1
    board = HealthBoard()
    waits = []
    for _ in range(3):
        cooldown = board.cooldowns.get(7)
        if cooldown is not None:  # let the cooldown end: the next attempt is the half-open probe
            board.cooldowns[7] = cooldown = type(cooldown)(
                time.time() - 0.01, cooldown.set_at - 100, cooldown.trips, False
            )
        started = board.begin(key(7))
        assert started is not None
        asyncio.run(board.record_failure(key(7), Failure.TRANSIENT, "500", started=started))
        waits.append(round(board.cooldowns[7].seconds))
    assert waits == [5, 10, 12]

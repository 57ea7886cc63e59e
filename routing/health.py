"""Key health seen by the gateway: a circuit breaker per key, cooldowns shared through the cache.

A key is *closed* (takes traffic) until it is failing: in the last ``KEYAOS_HEALTH_WINDOW_S``
at least ``KEYAOS_TRIP_MIN_FAILURES`` of its attempts failed transiently, and they are at least
``KEYAOS_TRIP_FAILURE_RATIO`` of its attempts. Then it *trips*: out of routing for a cooldown of
``KEYAOS_TRANSIENT_COOLDOWN_S``. When the cooldown ends it is *half-open*: one request (the
probe) goes to it while the others go elsewhere; the probe's success closes it, its failure trips it
again for twice as long (up to ``KEYAOS_MAX_COOLDOWN_S``). Escalation counts episodes, not
attempts: a failure of an attempt that started before the current cooldown was set, or while it
ran, never lengthens it. A 429 cools the key at once, for ``Retry-After`` (a *stated* cooldown)
or ``KEYAOS_RATE_LIMIT_COOLDOWN_S``.

A cooldown that is not stated may be lifted: when no candidate is left, the failover loop tries
such keys anyway (``lifts_at`` orders them), and any success of an attempt started after the
cooldown was set closes the key. Invalid and exhausted keys are never lifted.

Cooldowns live in the Django cache (Redis when configured), so every gateway process honours them;
each process keeps a local copy, merged from the cache by the snapshot poller, so the request path
reads memory only. The failure window and the probe are per process.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import astuple, dataclass
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.core.cache import cache

from keyaos.lib.db import db_task
from providers.models import UpstreamKey, unusable_reason
from providers.upstream import Failure, health_after
from routing.snapshot import KeyInfo

logger = logging.getLogger("keyaos.health")

COOLDOWN_KEY = "cooldown:{}"
# A probe that has not ended after this long (its client went away unseen) no longer holds the key.
PROBE_TIMEOUT_S = 60.0
OK = UpstreamKey.Health.OK


@dataclass(frozen=True)
class Cooldown:
    until: float  # epoch seconds
    set_at: float  # epoch seconds; attempts started before it tell nothing new
    trips: int  # 0 for a rate limit, n for the n-th trip of one failing episode
    stated: bool  # the upstream said how long (429 with Retry-After): never lifted

    @property
    def seconds(self) -> float:
        return self.until - self.set_at

    def escalates(self, now: float) -> bool:
        """A trip soon after this one ended belongs to the same episode."""
        return now < self.until + 2 * self.seconds

    @classmethod
    def from_cache(cls, value) -> Cooldown | None:
        try:
            until, set_at, trips, stated = value
            return cls(float(until), float(set_at), int(trips), bool(stated))
        except (TypeError, ValueError):
            return None


class _Window:
    """Attempts and transient failures per second over the last ``KEYAOS_HEALTH_WINDOW_S``."""

    __slots__ = ("buckets", "since")

    def __init__(self, since: float) -> None:
        self.since = since  # attempts started earlier do not count
        self.buckets: deque[list[int]] = deque()

    def add(self, now: float, failed: bool) -> None:
        second = int(now)
        buckets = self.buckets
        if buckets and buckets[-1][0] == second:
            bucket = buckets[-1]
        else:
            bucket = [second, 0, 0]
            buckets.append(bucket)
            oldest = second - settings.KEYAOS_HEALTH_WINDOW_S
            while buckets[0][0] <= oldest:
                buckets.popleft()
        bucket[1] += 1
        if failed:
            bucket[2] += 1

    def failing(self) -> bool:
        attempts = sum(bucket[1] for bucket in self.buckets)
        failures = sum(bucket[2] for bucket in self.buckets)
        return (
            failures >= settings.KEYAOS_TRIP_MIN_FAILURES
            and failures >= settings.KEYAOS_TRIP_FAILURE_RATIO * attempts
        )


class HealthBoard:
    def __init__(self) -> None:
        self.cooldowns: dict[int, Cooldown] = {}  # key id -> its cooldown, running or half-open
        self.closed: dict[int, Cooldown] = {}  # key id -> the last cooldown that ended in success
        self.marked: dict[int, str] = {}  # key id -> health set here, until the snapshot shows it
        self.windows: dict[int, _Window] = {}
        self.probes: dict[int, float] = {}  # key id -> start of the half-open probe in flight

    # Routing

    def unusable_reason(self, key: KeyInfo, now: float | None = None) -> str | None:
        health = self.marked.get(key.id, key.health)
        cooldown = self.cooldowns.get(key.id)
        usable = health == OK and (key.balance is None or key.balance > 0)
        cooling = probing = False
        if cooldown is not None:
            now = time.time() if now is None else now
            cooling = cooldown.until > now
            probing = not cooling and self._probe_in_flight(key.id, now)
        if usable and not cooling and not probing:
            return None
        return unusable_reason(
            health=health,
            last_error=key.last_error,
            cooldown_until=datetime.fromtimestamp(cooldown.until, UTC) if cooling else None,
            balance=key.balance,
            probing=probing,
        )

    def lifts_at(self, key: KeyInfo, now: float | None = None) -> float | None:
        """When an excluded key's exclusion ends, if it may be lifted as a last resort."""
        cooldown = self.cooldowns.get(key.id)
        if cooldown is None or self.marked.get(key.id, key.health) != OK:
            return None
        if key.balance is not None and key.balance <= 0:
            return None
        now = time.time() if now is None else now
        if cooldown.stated and cooldown.until > now:
            return None
        return cooldown.until

    def begin(self, key: KeyInfo, *, last_resort: bool = False) -> float | None:
        """An attempt on ``key`` starts now: its start time, or None when the key should be
        skipped (it tripped since the ranking, or its half-open probe is taken)."""
        now = time.time()
        cooldown = self.cooldowns.get(key.id)
        if cooldown is None or last_resort:
            return now
        if cooldown.until > now or self._probe_in_flight(key.id, now):
            return None
        self.probes[key.id] = now
        return now

    def abandon(self, key: KeyInfo, started: float) -> None:
        """The attempt ended without telling anything (cancelled): free its probe."""
        if self.probes.get(key.id) == started:
            del self.probes[key.id]

    def _probe_in_flight(self, key_id: int, now: float) -> bool:
        started = self.probes.get(key_id)
        return started is not None and started > now - PROBE_TIMEOUT_S

    # Outcomes

    def record_success(self, key: KeyInfo, started: float | None = None) -> Cooldown | None:
        """Count a good answer; returns the cooldown it ended, to share (``share_close``)."""
        now = time.time()
        started = now if started is None else started
        window = self.windows.get(key.id)
        if window is None:
            window = self.windows[key.id] = _Window(0.0)
        if started >= window.since:
            window.add(now, failed=False)
        cooldown = self.cooldowns.get(key.id)
        if cooldown is None or started < cooldown.set_at:
            return None
        self.abandon(key, started)
        del self.cooldowns[key.id]
        self.closed[key.id] = cooldown
        self.windows[key.id] = _Window(now)
        if cooldown.trips:
            logger.info("upstream key %s (%s) is healthy again", key.name, key.id)
        return cooldown

    async def record_failure(
        self,
        key: KeyInfo,
        failure: Failure,
        message: str,
        retry_after_s: float | None = None,
        started: float | None = None,
    ) -> None:
        """Take the key out of this process's routing now, then tell the others."""
        outcome = self.note_failure(key, failure, retry_after_s, started=started)
        if outcome is not None:
            await self.share_failure(key, outcome, message)

    def note_failure(
        self,
        key: KeyInfo,
        failure: Failure,
        retry_after_s: float | None = None,
        *,
        started: float | None = None,
    ) -> Failure | Cooldown | None:
        """Update local state at once; returns what to share: a failure class to persist, a new
        cooldown, or None."""
        now = time.time()
        started = now if started is None else started
        if failure == Failure.CLIENT:
            self.abandon(key, started)
            return None
        if failure in (Failure.INVALID, Failure.EXHAUSTED):
            self.abandon(key, started)
            health = health_after(failure)
            if self.marked.get(key.id, key.health) == health:
                return None  # known already: one write and one log line per key, not per request
            self.marked[key.id] = health
            return failure
        current = self.cooldowns.get(key.id)
        if failure == Failure.RATE_LIMITED:
            return self._rate_limited(key, now, started, current, retry_after_s)
        if current is not None:
            if started < current.until:
                return None  # began before the cooldown or while it ran: same episode
            self.abandon(key, started)
            return self._trip(key, now, current, "its half-open probe failed")
        window = self.windows.get(key.id)
        if window is None:
            window = self.windows[key.id] = _Window(0.0)
        if started < window.since:
            return None
        window.add(now, failed=True)
        if not window.failing():
            return None
        return self._trip(key, now, self.closed.get(key.id), "it is failing")

    def _rate_limited(
        self,
        key: KeyInfo,
        now: float,
        started: float,
        current: Cooldown | None,
        retry_after_s: float | None,
    ) -> Cooldown | None:
        if current is not None and started < current.set_at:
            return None
        self.abandon(key, started)
        stated = retry_after_s is not None
        seconds = retry_after_s if stated else settings.KEYAOS_RATE_LIMIT_COOLDOWN_S
        until = now + min(seconds, settings.KEYAOS_MAX_COOLDOWN_S)
        trips = 0
        if current is not None:
            until, trips = max(until, current.until), current.trips
            stated = stated or (current.stated and current.until > now)
        cooldown = self.cooldowns[key.id] = Cooldown(until, now, trips, stated)
        return cooldown

    def _trip(self, key: KeyInfo, now: float, previous: Cooldown | None, why: str) -> Cooldown:
        trips = previous.trips + 1 if previous is not None and previous.escalates(now) else 1
        seconds = min(
            settings.KEYAOS_TRANSIENT_COOLDOWN_S * 2 ** (trips - 1), settings.KEYAOS_MAX_COOLDOWN_S
        )
        cooldown = self.cooldowns[key.id] = Cooldown(now + seconds, now, trips, False)
        self.windows[key.id] = _Window(now)
        logger.warning(
            "upstream key %s (%s) leaves routing for %.0f s: %s (trip %d)",
            key.name,
            key.id,
            seconds,
            why,
            trips,
        )
        return cooldown

    # Sharing between processes (I/O: run off the request path)

    async def share_failure(self, key: KeyInfo, outcome: Failure | Cooldown, message: str) -> None:
        """Persist a hard failure, or share a cooldown through the cache."""
        if isinstance(outcome, Failure):
            await db_task(persist_health)(key.id, health_after(outcome), message)
            return
        await cache.aset(
            COOLDOWN_KEY.format(key.id), astuple(outcome), timeout=_cache_timeout(outcome)
        )
        await db_task(persist_cooldown)(key.id, outcome.seconds, message)

    async def share_close(self, key: KeyInfo, ended: Cooldown) -> None:
        """The key serves again: drop the shared cooldown, unless a newer one replaced it."""
        name = COOLDOWN_KEY.format(key.id)
        shared = Cooldown.from_cache(await cache.aget(name))
        if shared is not None and shared.set_at <= ended.set_at:
            await cache.adelete(name)
        await db_task(persist_close)(key.id, ended.until)

    async def merge_shared(self, key_ids: list[int]) -> None:
        if key_ids:
            self.merge(await cache.aget_many([COOLDOWN_KEY.format(i) for i in key_ids]))

    def merge(self, shared: dict[str, object]) -> None:
        """Adopt cooldowns other processes set after the ones known here."""
        for name, value in shared.items():
            cooldown = Cooldown.from_cache(value)
            if cooldown is None:
                continue
            key_id = int(name.rsplit(":", 1)[1])
            known = self.cooldowns.get(key_id) or self.closed.get(key_id)
            if known is None or cooldown.set_at > known.set_at:
                self.cooldowns[key_id] = cooldown
                self.windows[key_id] = _Window(cooldown.set_at)

    def adopt(self, keys: dict[int, list[KeyInfo]]) -> None:
        """A rebuilt snapshot: drop local marks it now carries, and take persisted cooldowns of
        keys this process knows nothing about (after a restart without a shared cache)."""
        now = time.time()
        seen = {}
        for provider_keys in keys.values():
            for key in provider_keys:
                seen[key.id] = key.health
                if key.cooldown_until is None or key.id in self.cooldowns:
                    continue
                until = key.cooldown_until.timestamp()
                if until > now and key.id not in self.closed:
                    self.cooldowns[key.id] = Cooldown(until, now, 1, False)
        for key_id, health in list(self.marked.items()):
            if seen.get(key_id) == health:
                del self.marked[key_id]


def _cache_timeout(cooldown: Cooldown) -> int:
    """Kept past its end for as long as a new trip would escalate from it."""
    return int(cooldown.until - time.time() + 2 * cooldown.seconds) + 1


def persist_health(key_id: int, health: str, message: str) -> None:
    UpstreamKey.objects.filter(pk=key_id).mark(health, message)
    logger.warning("upstream key %s marked %s: %s", key_id, health, message)


def persist_cooldown(key_id: int, seconds: float, message: str) -> None:
    UpstreamKey.objects.filter(pk=key_id).cool_down(seconds, message)


def persist_close(key_id: int, until: float) -> None:
    ended = datetime.fromtimestamp(until, UTC) + timedelta(seconds=1)
    UpstreamKey.objects.filter(pk=key_id).end_cooldown(ended_by=ended)

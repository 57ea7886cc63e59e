"""Where the client-key limit counters live: Redis, shared by every gateway process, or this one.

Each operation is one round trip: a small Lua script checks and changes every counter of a request
at once, and the settlements of 10 ms go together in one. When Redis cannot be reached the
counters fall back to this process's own (one warning in the log, and ``state()`` says so for
``/ready``); every ``KEYAOS_REDIS_RETRY_S`` one request tries
Redis again, and the first that succeeds switches every request back. What could not be written to
Redis meanwhile (a settlement, the spend of requests admitted locally) is added to the counters
that still exist there once it is back; a counter Redis lost is seeded again from the database.

Without ``REDIS_URL`` only this process's counters exist, as they always did.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

logger = logging.getLogger("keyaos.limits")

ADMITTED, RPM_REFUSED, TPM_REFUSED, NEEDS_SEED, BUDGET_REFUSED = range(5)
KEY_PREFIX = "keyaos:limits:"
_SWEEP_S = 60.0
SETTLE_BATCH_S = 0.01


@dataclass(frozen=True)
class Admission:
    """One request's counters and limits; a limit of 0 (or a budget below 0) is not checked."""

    window_ttl_s: int
    rpm_key: str = ""
    rpm_limit: int = 0
    tpm_key: str = ""
    tpm_limit: int = 0
    tokens: int = 0
    budget_key: str = ""
    budget_nanos: int = -1
    reserve_nanos: int = 0
    budget_ttl_s: int = 0  # 0: no expiry (a lifetime budget)
    seed_nanos: int | None = None  # the persisted spend, when the budget counter is missing


@dataclass(frozen=True)
class CounterState:
    """What ``/ready`` shows: which counters serve and, when degraded, since when and why."""

    backend: str  # "redis" or "local"
    degraded: bool = False
    since: float | None = None  # wall-clock time the fallback started
    error: str = ""


class LocalCounters:
    """This process's counters: a dict touched only from the event loop, so each call is atomic."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[int, float | None]] = {}
        self._swept = time.monotonic()

    def get(self, key: str) -> int | None:
        item = self._values.get(key)
        if item is None:
            return None
        if item[1] is not None and item[1] <= time.monotonic():
            del self._values[key]
            return None
        return item[0]

    def _set(self, key: str, value: int, ttl_s: float | None) -> None:
        self._values[key] = (value, None if not ttl_s else time.monotonic() + ttl_s)

    def _add(self, key: str, delta: int, ttl_s: float | None) -> int:
        current = self.get(key)
        if current is None:
            self._set(key, delta, ttl_s)
            return delta
        self._values[key] = (current + delta, self._values[key][1])
        return current + delta

    def admit(self, ask: Admission) -> int:
        self._sweep()
        if ask.budget_nanos >= 0 and self.get(ask.budget_key) is None and ask.seed_nanos is None:
            return NEEDS_SEED
        if ask.rpm_limit and self._add(ask.rpm_key, 1, ask.window_ttl_s) > ask.rpm_limit:
            return RPM_REFUSED
        if ask.tpm_limit and (self.get(ask.tpm_key) or 0) >= ask.tpm_limit:
            return TPM_REFUSED
        if ask.budget_nanos >= 0:
            total = self.get(ask.budget_key)
            if total is None:
                total = ask.seed_nanos or 0
                self._set(ask.budget_key, total, ask.budget_ttl_s)
            if total >= ask.budget_nanos:
                return BUDGET_REFUSED
            self._add(ask.budget_key, ask.reserve_nanos, None)
        if ask.tpm_limit:
            self._add(ask.tpm_key, ask.tokens, ask.window_ttl_s)
        return ADMITTED

    def top_up(self, key: str, delta: int, budget_nanos: int) -> bool:
        total = self.get(key)
        if total is None:
            return True  # expired mid-request: the next admission seeds it again
        if total + delta > budget_nanos:
            return False
        self._add(key, delta, None)
        return True

    def adjust(self, deltas: dict[str, int]) -> None:
        for key, delta in deltas.items():
            if delta and self.get(key) is not None:
                self._add(key, delta, None)

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._swept < _SWEEP_S:
            return
        self._swept = now
        for key in [k for k, (_, ends) in self._values.items() if ends is not None and ends <= now]:
            del self._values[key]


_ADMIT = """
local window_ttl, rpm_limit, tpm_limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local budget, budget_ttl, seed = tonumber(ARGV[5]), tonumber(ARGV[7]), ARGV[8]
if budget >= 0 and seed == '' and redis.call('EXISTS', KEYS[3]) == 0 then return 3 end
if rpm_limit > 0 then
  local count = redis.call('INCR', KEYS[1])
  if count == 1 then redis.call('EXPIRE', KEYS[1], window_ttl) end
  if count > rpm_limit then return 1 end
end
if tpm_limit > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= tpm_limit then return 2 end
if budget >= 0 then
  local total = redis.call('GET', KEYS[3])
  if not total then
    total = seed
    if budget_ttl > 0 then
      redis.call('SET', KEYS[3], seed, 'EX', budget_ttl)
    else
      redis.call('SET', KEYS[3], seed)
    end
  end
  if tonumber(total) >= budget then return 4 end
  redis.call('INCRBY', KEYS[3], ARGV[6])
end
if tpm_limit > 0 then
  redis.call('INCRBY', KEYS[2], ARGV[4])
  if redis.call('TTL', KEYS[2]) < 0 then redis.call('EXPIRE', KEYS[2], window_ttl) end
end
return 0
"""

_TOP_UP = """
local total = redis.call('GET', KEYS[1])
if not total then return 1 end
if tonumber(total) + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return 0 end
redis.call('INCRBY', KEYS[1], ARGV[1])
return 1
"""

_ADJUST = """
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then redis.call('INCRBY', key, ARGV[i]) end
end
return 0
"""


class RedisCounters:
    """The counters in Redis through redis-py's asyncio client: no thread hop, one script a call."""

    def __init__(self, url: str, *, timeout_s: float) -> None:
        self.client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # One immediate retry reconnects a pooled connection that a Redis restart closed.
            retry=Retry(NoBackoff(), 1),
        )
        self._admit = self.client.register_script(_ADMIT)
        self._top_up = self.client.register_script(_TOP_UP)
        self._adjust = self.client.register_script(_ADJUST)

    async def admit(self, ask: Admission) -> int:
        keys = [KEY_PREFIX + (k or "-") for k in (ask.rpm_key, ask.tpm_key, ask.budget_key)]
        seed = "" if ask.seed_nanos is None else str(ask.seed_nanos)
        args = [
            ask.window_ttl_s,
            ask.rpm_limit,
            ask.tpm_limit,
            ask.tokens,
            ask.budget_nanos,
            ask.reserve_nanos,
            ask.budget_ttl_s,
            seed,
        ]
        return int(await self._admit(keys=keys, args=args))

    async def top_up(self, key: str, delta: int, budget_nanos: int) -> bool:
        return bool(await self._top_up(keys=[KEY_PREFIX + key], args=[delta, budget_nanos]))

    async def adjust(self, deltas: dict[str, int]) -> None:
        changes = [(KEY_PREFIX + key, delta) for key, delta in deltas.items() if delta]
        if changes:
            await self._adjust(keys=[k for k, _ in changes], args=[d for _, d in changes])

    async def close(self) -> None:
        await self.client.aclose()


class Counters:
    """Redis when configured and reachable, this process's counters otherwise.

    Each call answers which store served it (``shared``): a reservation settles where it was made.
    """

    def __init__(self, redis_url: str = "", *, timeout_s: float = 0.5, retry_s: float = 2.0):
        self.local = LocalCounters()
        self.redis = RedisCounters(redis_url, timeout_s=timeout_s) if redis_url else None
        self.retry_s = retry_s
        self._retry_at = 0.0
        self._down_since: float | None = None
        self._error = ""
        self._pending: dict[str, int] = defaultdict(int)
        self._settling: dict[str, int] = defaultdict(int)
        self._settle_batch: asyncio.Future | None = None
        self._sending: set[asyncio.Future] = set()  # batches on their way (kept referenced)

    def state(self) -> CounterState:
        if self.redis is None:
            return CounterState(backend="local")
        if self._down_since is None:
            return CounterState(backend="redis")
        return CounterState(
            backend="local", degraded=True, since=self._down_since, error=self._error
        )

    def fallback_reason(self) -> str | None:
        """Why the limits run on this process's counters although Redis is configured, or None."""
        if self.redis is None or self._down_since is None:
            return None
        since = datetime.fromtimestamp(self._down_since, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return (
            f"Redis unreachable since {since} ({self._error}); "
            "client key limits use this process's counters"
        )

    async def admit(self, ask: Admission) -> tuple[int, bool]:
        if await self._redis_usable():
            try:
                return await self.redis.admit(ask), True
            except (RedisError, OSError) as error:
                self._failed(error)
        return self.local.admit(ask), False

    async def top_up(self, key: str, delta: int, budget_nanos: int, *, shared: bool) -> bool:
        if shared and await self._redis_usable():
            try:
                return await self.redis.top_up(key, delta, budget_nanos)
            except (RedisError, OSError) as error:
                self._failed(error)
            self._pending[key] += delta
            return True  # held in Redis, which cannot say more now; settled when it is back
        if shared:
            self._pending[key] += delta
            return True
        return self.local.top_up(key, delta, budget_nanos)

    async def adjust(self, deltas: dict[str, int], *, shared: bool, spent: dict[str, int]) -> None:
        """``queue_adjust``, returning once the settlements are sent (or kept for when Redis is
        back)."""
        batch = self.queue_adjust(deltas, shared=shared, spent=spent)
        if batch is not None:
            await asyncio.shield(batch)

    def queue_adjust(
        self, deltas: dict[str, int], *, shared: bool, spent: dict[str, int]
    ) -> asyncio.Future | None:
        """Apply ``deltas`` where the reservation was made. ``spent`` is what the request really
        cost per counter: when the request was counted locally while Redis was away, Redis gets
        it too, so its counters include what was spent meanwhile.

        Redis gets the settlements of ``SETTLE_BATCH_S`` together, summed per counter, in one
        script: a round trip per request was a third of a limited request's CPU. Returns the
        batch that will send them (None when there is nothing for Redis)."""
        if not shared:
            self.local.adjust(deltas)
            if self.redis is None:
                return None
            deltas = spent
        for key, delta in deltas.items():
            self._settling[key] += delta
        if self._settle_batch is None:
            batch = self._settle_batch = asyncio.ensure_future(self._send_settlements())
            self._sending.add(batch)
            batch.add_done_callback(self._sent)
        return self._settle_batch

    def _sent(self, batch: asyncio.Future) -> None:
        self._sending.discard(batch)
        if not batch.cancelled() and batch.exception() is not None:
            logger.error("limit counters: a settlement batch failed", exc_info=batch.exception())

    async def _send_settlements(self) -> None:
        await asyncio.sleep(SETTLE_BATCH_S)
        deltas, self._settling = self._settling, defaultdict(int)
        self._settle_batch = None
        if await self._redis_usable():
            try:
                await self.redis.adjust(deltas)
                return
            except (RedisError, OSError) as error:
                self._failed(error)
        for key, delta in deltas.items():
            self._pending[key] += delta

    async def flush(self) -> None:
        """Wait for the settlements queued so far to be sent (or kept for when Redis is back)."""
        while self._sending:
            await asyncio.wait(set(self._sending))

    async def close(self) -> None:
        await self.flush()
        if self.redis is not None:
            await self.redis.close()

    async def _redis_usable(self) -> bool:
        if self.redis is None:
            return False
        if self._down_since is None:
            return True
        now = time.monotonic()
        if now < self._retry_at:
            return False
        self._retry_at = now + self.retry_s  # one request probes; the others stay local
        try:
            if self._pending:
                pending, self._pending = dict(self._pending), defaultdict(int)
                try:
                    await self.redis.adjust(pending)
                except BaseException:
                    for key, delta in pending.items():
                        self._pending[key] += delta
                    raise
            else:
                await self.redis.client.ping()
        except (RedisError, OSError) as error:
            self._error = _describe(error)
            return False
        logger.warning(
            "Redis is reachable again: client key limits are shared again (local counters "
            "served for %.0f s).",
            time.time() - self._down_since,
        )
        self._down_since = None
        return True

    def _failed(self, error: BaseException) -> None:
        self._retry_at = time.monotonic() + self.retry_s
        self._error = _describe(error)
        if self._down_since is not None:
            return
        self._down_since = time.time()
        logger.warning(
            "Redis is unreachable (%s): client key limits use this process's counters until it "
            "is back (retried every %.0f s); several gateway processes no longer share them.",
            self._error,
            self.retry_s,
        )


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:200]

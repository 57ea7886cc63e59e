"""Where the client-key limit counters live: Redis, shared by every gateway process, or this one.

A Redis counter is a hash: its value ``n`` and its generation ``g``, set when the counter is
created, so a settlement or a lease given back after Redis lost the counter (a restart) does not
change the new one that was seeded from the database. An admission that goes to Redis is one
round trip: a small Lua script checks and changes every counter of the request at once and
leases this process a share of the room left (``Counters``), from which the next requests are
admitted in memory; the settlements of 10 ms go together in one script. When Redis cannot be
reached the counters fall back to this process's own (one warning in the log, and ``state()``
says so for ``/ready``); every ``KEYAOS_REDIS_RETRY_S`` one request tries Redis again, and the
first that succeeds switches every request back. What could not be written to Redis meanwhile
(a settlement, a lease given back, the spend of requests admitted locally) is added to the
counters that still exist there once it is back; a counter Redis lost is seeded again from the
database.

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
LEASE_S = 1.0
LEASE_REQUESTS = 32
LEASE_MAX_REQUESTS = 2048


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


_OPEN = """
local fresh
local function open(key, initial, ttl)
  if redis.call('TYPE', key).ok == 'string' then  -- a counter written before generations
    initial, ttl = redis.call('GET', key), redis.call('TTL', key)
    redis.call('DEL', key)
  else
    local item = redis.call('HMGET', key, 'n', 'g')
    if item[1] then return tonumber(item[1]), item[2] end
  end
  if not fresh then
    local now = redis.call('TIME')
    fresh = now[1] .. '.' .. now[2]
  end
  redis.call('HSET', key, 'n', initial, 'g', fresh)
  if ttl > 0 then redis.call('EXPIRE', key, ttl) end
  return tonumber(initial), fresh
end
local function lease(key, room, unit, most)
  local grant = math.min(most, math.floor(room / 8))
  if grant < unit or grant <= 0 then return 0 end
  redis.call('HINCRBY', key, 'n', string.format('%d', grant))
  return grant
end
"""

_ADMIT = (
    _OPEN
    + """
local window_ttl, rpm_limit, tpm_limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, budget, reserve = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local budget_ttl, seed, lease_requests = tonumber(ARGV[7]), ARGV[8], tonumber(ARGV[9])
local tokens_unit, budget_unit = tonumber(ARGV[10]), tonumber(ARGV[11])
if budget >= 0 and seed == '' and redis.call('EXISTS', KEYS[3]) == 0 then return {3} end
local answer = {0, '', 0, '', 0, '', 0}
if rpm_limit > 0 then
  local count, gen = open(KEYS[1], 0, window_ttl)
  count = redis.call('HINCRBY', KEYS[1], 'n', 1)
  if count > rpm_limit then return {1} end
  answer[2], answer[3] = gen, lease(KEYS[1], rpm_limit - count, 1, lease_requests)
end
local used, tokens_gen = 0, ''
if tpm_limit > 0 then
  used, tokens_gen = open(KEYS[2], 0, window_ttl)
  answer[4] = tokens_gen
  if used >= tpm_limit then answer[1] = 2 return answer end
end
if budget >= 0 then
  local total, gen = open(KEYS[3], seed, budget_ttl)
  answer[6] = gen
  if total >= budget then answer[1] = 4 return answer end
  redis.call('HINCRBY', KEYS[3], 'n', ARGV[6])
  answer[7] = lease(KEYS[3], budget - total - reserve, budget_unit, budget_unit * lease_requests)
end
if tpm_limit > 0 then
  redis.call('HINCRBY', KEYS[2], 'n', ARGV[4])
  answer[5] = lease(KEYS[2], tpm_limit - used - tokens, tokens_unit, tokens_unit * lease_requests)
end
return answer
"""
)

_TOP_UP = """
if redis.call('TYPE', KEYS[1]).ok ~= 'hash' then return 1 end
local item = redis.call('HMGET', KEYS[1], 'n', 'g')
if not item[1] or item[2] ~= ARGV[3] then return 1 end
if tonumber(item[1]) + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], 'n', ARGV[1])
return 1
"""

_ADJUST = """
for i, key in ipairs(KEYS) do
  local gen = redis.call('TYPE', key).ok == 'hash' and redis.call('HGET', key, 'g')
  if gen and (ARGV[2 * i] == '' or ARGV[2 * i] == gen) then
    redis.call('HINCRBY', key, 'n', ARGV[2 * i - 1])
  end
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

    async def admit(
        self, ask: Admission, lease_requests: int, tokens_unit: int, budget_unit: int
    ) -> list:
        """``*_unit``: what one request is expected to take of that counter (a lease holds
        ``lease_requests`` of them). The script's answer: ``[verdict]``, or ``[verdict, rpm
        generation, rpm lease, tpm generation, tpm lease, budget generation, budget lease]``."""
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
            lease_requests,
            tokens_unit,
            budget_unit,
        ]
        return await self._admit(keys=keys, args=args)

    async def top_up(self, key: str, generation: str, delta: int, budget_nanos: int) -> bool:
        args = [delta, budget_nanos, generation]
        return bool(await self._top_up(keys=[KEY_PREFIX + key], args=args))

    async def adjust(self, deltas: dict[tuple[str, str], int]) -> None:
        """Add each delta to its counter if that counter is still the incarnation the delta
        belongs to (a generation of "" matches any)."""
        changes = [(key, generation, d) for (key, generation), d in deltas.items() if d]
        if changes:
            await self._adjust(
                keys=[KEY_PREFIX + key for key, _, _ in changes],
                args=[part for _, generation, d in changes for part in (d, generation)],
            )

    async def close(self) -> None:
        await self.client.aclose()


@dataclass(slots=True)
class Verdict:
    """What the counters answered an admission, and what its settlement needs: where it was
    counted, and the incarnation (generation) of each Redis counter it changed."""

    code: int
    shared: bool = False
    tokens_generation: str = ""
    budget_generation: str = ""
    tokens_reserved: bool = True  # False: the settlement adds the tokens used, all of them


@dataclass(slots=True)
class _Lease:
    """Room a Redis counter holds for this process: requests are admitted from it without a
    round trip, and what is left goes back to Redis when it ends."""

    generation: str
    left: int
    ends: float  # monotonic
    per_request: int = 0  # what the last request settled on it really took
    size: int = LEASE_REQUESTS  # requests' worth asked for at the last grant
    granted: float = 0.0  # monotonic time of the last grant


def _covers(lease: _Lease | None, amount: int, now: float) -> bool:
    return lease is not None and lease.left >= amount and lease.left > 0 and lease.ends > now


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Counters:
    """Redis when configured and reachable, this process's counters otherwise.

    Each admission answers which store served it (``Verdict.shared``): a reservation settles
    where it was made. With Redis, an admission that finds room also leases a share of it for
    this process (``LEASE_REQUESTS`` requests' worth, growing to ``LEASE_MAX_REQUESTS`` while
    leases run out fast, and at most an eighth of what is left, per counter), so most requests
    are admitted from leases, in memory; settlements come out of the lease while it lasts, and
    what is left of a lease goes back after ``LEASE_S``. A lease is counted in Redis from the
    start: other processes see less room, never more, and the budget bound holds (a lease never
    reaches past the budget).
    """

    def __init__(self, redis_url: str = "", *, timeout_s: float = 0.5, retry_s: float = 2.0):
        self.local = LocalCounters()
        self.redis = RedisCounters(redis_url, timeout_s=timeout_s) if redis_url else None
        self.retry_s = retry_s
        self._retry_at = 0.0
        self._down_since: float | None = None
        self._error = ""
        self._leases: dict[str, _Lease] = {}
        self._refills: dict[tuple, asyncio.Future] = {}  # counters -> the admission asking Redis
        self._lease_timer: asyncio.TimerHandle | None = None
        self._lease_loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[tuple[str, str], int] = defaultdict(int)
        self._settling: dict[tuple[str, str], int] = defaultdict(int)
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

    def leased(self, key: str) -> int:
        """What this process holds leased of a counter and has not handed out."""
        lease = self._leases.get(key)
        return 0 if lease is None else lease.left

    async def admit(self, ask: Admission) -> Verdict:
        counters = (ask.rpm_key, ask.tpm_key, ask.budget_key)
        if self._down_since is None and self.redis is not None:
            verdict = await self._admit_leased_or_wait(ask, counters)
            if verdict is not None:
                return verdict
        if await self._redis_usable():
            refill = self._refills[counters] = asyncio.get_running_loop().create_future()
            code = None
            try:
                size = self._lease_size(ask)
                answer = await self.redis.admit(ask, size, *self._lease_units(ask))
            except (RedisError, OSError) as error:
                self._failed(error)
            else:
                verdict = self._answered(ask, answer, size)
                code = verdict.code
                return verdict
            finally:
                if self._refills.get(counters) is refill:
                    del self._refills[counters]
                refill.set_result(code)
        return Verdict(self.local.admit(ask))

    async def _admit_leased_or_wait(self, ask: Admission, counters: tuple) -> Verdict | None:
        """Admit from the leases, waiting for the one request of these counters that is asking
        Redis, if any, to bring a new lease; None when this request must ask Redis itself.

        One at a time: requests that ask Redis at once queue on its client's connection pool,
        one a turn of the event loop, which under load is a queue of half a second."""
        while True:
            verdict = self._admit_leased(ask)
            if verdict is not None:
                return verdict
            refill = self._refills.get(counters)
            if refill is None:
                return None
            code = await asyncio.shield(refill)
            if code is None:  # it failed or was cancelled: ask Redis (or fall back) in turn
                return None
            if code == NEEDS_SEED and ask.seed_nanos is not None:
                continue  # this request brings the seed
            if code != ADMITTED:  # what Redis answers these counters now, unless a lease has room
                return self._admit_leased(ask) or Verdict(code, shared=True)

    def _admit_leased(self, ask: Admission) -> Verdict | None:
        """Admit from this process's leases when they cover every counter of the request."""
        leases, now = self._leases, time.monotonic()
        rpm = tpm = budget = None
        if ask.rpm_limit:
            rpm = leases.get(ask.rpm_key)
            if not _covers(rpm, 1, now):
                return None
        if ask.tpm_limit:
            tpm = leases.get(ask.tpm_key)
            if not _covers(tpm, ask.tokens, now):
                return None
        if ask.budget_nanos >= 0:
            budget = leases.get(ask.budget_key)
            if not _covers(budget, ask.reserve_nanos, now):
                return None
        verdict = Verdict(ADMITTED, shared=True)
        if rpm is not None:
            rpm.left -= 1
        if tpm is not None:
            tpm.left -= ask.tokens
            verdict.tokens_generation = tpm.generation
        if budget is not None:
            budget.left -= ask.reserve_nanos
            verdict.budget_generation = budget.generation
        return verdict

    def _lease_size(self, ask: Admission) -> int:
        """How many requests' worth to lease: four times the last lease when it ran out within
        ``LEASE_S / 8`` of its grant (a lease per round trip would hold the requests back:
        they ask Redis one at a time), back to ``LEASE_REQUESTS`` once a lease has ended."""
        size, now = LEASE_REQUESTS, time.monotonic()
        for key in (ask.rpm_key, ask.tpm_key, ask.budget_key):
            lease = self._leases.get(key)
            if lease is not None:
                fast = now - lease.granted < LEASE_S / 8
                size = max(size, lease.size * 4 if fast else lease.size)
        return min(size, LEASE_MAX_REQUESTS)

    def _lease_units(self, ask: Admission) -> tuple[int, int]:
        """What a request of this key takes of its tokens and budget counters: its reservation,
        or what the last one settled if more (tokens are reserved for the prompt alone)."""
        tokens = self._leases.get(ask.tpm_key)
        budget = self._leases.get(ask.budget_key)
        return (
            max(ask.tokens, 1, tokens.per_request if tokens else 0),
            max(ask.reserve_nanos, 1, budget.per_request if budget else 0),
        )

    def _answered(self, ask: Admission, answer: list, size: int) -> Verdict:
        code = int(answer[0])
        if len(answer) == 1:
            return Verdict(code, shared=True)
        rpm_generation, tokens_generation, budget_generation = map(_text, answer[1:6:2])
        now = time.monotonic()
        for key, generation, grant in (
            (ask.rpm_key, rpm_generation, answer[2]),
            (ask.tpm_key, tokens_generation, answer[4]),
            (ask.budget_key, budget_generation, answer[6]),
        ):
            if grant:
                self._lease(key, generation, int(grant), now, size)
        verdict = Verdict(code, True, tokens_generation, budget_generation)
        if code == BUDGET_REFUSED:
            # A lease this process was granted while this request was on its way has the room.
            lease = self._leases.get(ask.budget_key)
            if _covers(lease, ask.reserve_nanos, now) and lease.generation == budget_generation:
                lease.left -= ask.reserve_nanos
                verdict.code, verdict.tokens_reserved = ADMITTED, False
        return verdict

    def _lease(self, key: str, generation: str, grant: int, now: float, size: int) -> None:
        lease = self._leases.get(key)
        if lease is None or lease.generation != generation:
            per_request = 0 if lease is None else lease.per_request
            lease = self._leases[key] = _Lease(generation, 0, now, per_request)
        lease.left += grant
        lease.ends = now + LEASE_S
        lease.size, lease.granted = size, now
        if self._lease_timer is None or self._lease_loop.is_closed():
            self._lease_loop = asyncio.get_running_loop()
            self._lease_timer = self._lease_loop.call_later(LEASE_S, self._end_leases)

    def _end_leases(self, *, every: bool = False) -> None:
        """Give back to Redis what is left of the leases that ended (``every``: of all)."""
        self._lease_timer = None
        now = time.monotonic()
        for key, lease in list(self._leases.items()):
            if every or lease.ends <= now:
                del self._leases[key]
                if lease.left:
                    self._queue(key, lease.generation, -lease.left)
        if self._leases:
            self._lease_loop = asyncio.get_running_loop()
            self._lease_timer = self._lease_loop.call_later(LEASE_S, self._end_leases)

    async def top_up(
        self, key: str, generation: str, delta: int, budget_nanos: int, *, shared: bool
    ) -> bool:
        if not shared:
            return self.local.top_up(key, delta, budget_nanos)
        lease = self._leases.get(key)
        if lease is not None and lease.generation == generation and lease.left >= delta:
            lease.left -= delta
            return True
        if await self._redis_usable():
            try:
                return await self.redis.top_up(key, generation, delta, budget_nanos)
            except (RedisError, OSError) as error:
                self._failed(error)
        self._pending[key, generation] += delta
        return True  # held in Redis, which cannot say more now; settled when it is back

    def queue_adjust(
        self, changes: list[tuple[str, str, int, int]], *, shared: bool
    ) -> asyncio.Future | None:
        """Settle ``changes``, each ``(counter, generation, delta, spent)``, where the
        reservation was made. ``spent`` is what the request really cost on that counter: when
        the request was counted locally while Redis was away, Redis gets it too, so its
        counters include what was spent meanwhile.

        A delta comes out of (or goes back to) this process's lease on the counter when there
        is one; the rest goes to Redis with the settlements of ``SETTLE_BATCH_S``, summed per
        counter, in one script. Returns the batch that will send them (None when there is
        nothing for Redis)."""
        if not shared:
            self.local.adjust({key: delta for key, _, delta, _ in changes})
            if self.redis is None:
                return None
            changes = [(key, "", spent, spent) for key, _, _, spent in changes]
        for key, generation, delta, spent in changes:
            delta = self._absorb(key, generation, delta, spent)
            if delta:
                self._queue(key, generation, delta)
        return self._settle_batch

    def _absorb(self, key: str, generation: str, delta: int, spent: int) -> int:
        """Settle ``delta`` out of this process's lease on the counter; returns what Redis must
        still get. A request that used more than the lease has left uses the lease up: what
        Redis counts is then all real, and the next admission asks it for room."""
        lease = self._leases.get(key)
        if lease is None or lease.generation != generation:
            return delta
        lease.per_request = spent
        taken = delta if delta < lease.left else lease.left
        lease.left -= taken
        return delta - taken

    def _queue(self, key: str, generation: str, delta: int) -> None:
        self._settling[key, generation] += delta
        if self._settle_batch is None:
            batch = self._settle_batch = asyncio.ensure_future(self._send_settlements())
            self._sending.add(batch)
            batch.add_done_callback(self._sent)

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
        """Give the leases back and wait for them and the settlements queued so far to be sent
        (or kept for when Redis is back)."""
        if self._leases:
            if self._lease_timer is not None:
                self._lease_timer.cancel()
            self._end_leases(every=True)
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
        for key, lease in self._leases.items():  # held in Redis: given back when it is back
            self._pending[key, lease.generation] -= lease.left
        self._leases.clear()
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

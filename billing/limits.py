"""Client key limits on ``/v1``: expiry, allowed models and IPs, per-minute rates and budgets.

The checks read the routing snapshot (``KeyLimits``) and the Django cache only. Counters are
integers in the cache (nano-dollars for money), changed with atomic ``incr``/``add``, so several
gateway processes share them when the cache is Redis. A budget counter holds what the key spent
in its period plus what requests in flight have reserved: a request reserves its estimated cost
when it starts and settles the real cost when it ends, so a burst of parallel requests overspends
by at most what is reserved in flight. A missing counter (first use, evicted, Redis restarted)
starts from the spend persisted on the key.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, Decimal

from django.core.cache import DEFAULT_CACHE_ALIAS, cache, caches
from django.core.cache.backends.locmem import LocMemCache
from django.utils import timezone

from billing.models import ApiKey, budget_period_start
from keyaos.lib.errors import GatewayError

NANOS_PER_USD = Decimal(1_000_000_000)
WINDOW_S = 60
LIFETIME = ApiKey.BudgetPeriod.LIFETIME
DAY = ApiKey.BudgetPeriod.DAY
MONTH = ApiKey.BudgetPeriod.MONTH

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class LimitExceeded(GatewayError):
    """A request the key's limits refuse."""


@dataclass(frozen=True)
class KeyLimits:
    """What the snapshot knows of a key's limits; ``None`` on a key stands for "no limits"."""

    key_id: int
    expires_at: datetime | None = None
    budget_usd: Decimal | None = None
    budget_period: str = LIFETIME
    allowed_models: tuple[str, ...] = ()
    allowed_networks: tuple[Network, ...] = ()
    rpm_limit: int | None = None
    tpm_limit: int | None = None

    @classmethod
    def of(cls, api_key: ApiKey) -> KeyLimits | None:
        limits = cls(
            key_id=api_key.pk,
            expires_at=api_key.expires_at,
            budget_usd=api_key.budget_usd,
            budget_period=api_key.budget_period,
            allowed_models=tuple(p.lower() for p in split_list(api_key.allowed_models)),
            allowed_networks=tuple(parse_networks(api_key.allowed_ips, strict=False)),
            rpm_limit=api_key.rpm_limit,
            tpm_limit=api_key.tpm_limit,
        )
        unlimited = cls(key_id=api_key.pk, budget_period=limits.budget_period)
        return None if limits == unlimited else limits

    @property
    def metered(self) -> bool:
        """True when requests need counters in the cache."""
        return bool(self.budget_usd is not None or self.rpm_limit or self.tpm_limit)

    def check_access(self, client_ip: str | None, now: datetime | None = None) -> None:
        now = now or timezone.now()
        if self.expires_at is not None and self.expires_at <= now:
            raise LimitExceeded(
                401,
                f"This API key expired at {self.expires_at:%Y-%m-%d %H:%M} UTC.",
                code="expired_api_key",
            )
        if self.allowed_networks and not ip_allowed(client_ip, self.allowed_networks):
            raise LimitExceeded(
                403,
                f"This API key may not be used from {client_ip or 'an unknown address'}.",
                code="ip_not_allowed",
            )

    def allows_model(self, *model_ids: str) -> bool:
        if not self.allowed_models:
            return True
        return any(
            fnmatch.fnmatchcase(model_id.lower(), pattern)
            for model_id in model_ids
            for pattern in self.allowed_models
        )

    def check_model(self, *model_ids: str) -> None:
        if self.allows_model(*model_ids):
            return
        raise LimitExceeded(
            403,
            f"This API key may not use the model {model_ids[0]!r}.",
            code="model_not_allowed",
        )


def split_list(value: str) -> list[str]:
    return [item.strip() for item in value.replace(",", "\n").splitlines() if item.strip()]


def parse_networks(value: str, *, strict: bool = True) -> list[Network]:
    """CIDRs (or single addresses) from a comma- or line-separated list.

    ``strict`` raises ValueError on a bad entry (forms, the command); the snapshot skips it.
    """
    networks = []
    for item in split_list(value):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            if strict:
                raise ValueError(f"{item!r} is not an IP address or CIDR range.") from None
    return networks


def ip_allowed(client_ip: str | None, networks: tuple[Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(client_ip or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def next_period_start(period: str, when: datetime) -> datetime | None:
    start = budget_period_start(period, when)
    if start is None:
        return None
    if period == DAY:
        return start + timedelta(days=1)
    return (start + timedelta(days=32)).replace(day=1)


def to_nanos(amount_usd: Decimal) -> int:
    return int((amount_usd * NANOS_PER_USD).to_integral_value(ROUND_CEILING))


@dataclass
class Reservation:
    """What one admitted request holds in the counters until it settles."""

    limits: KeyLimits
    budget_key: str | None = None
    reserved_nanos: int = 0
    tokens_key: str | None = None
    reserved_tokens: int = 0
    settled: bool = False


SpentLoader = Callable[[int, str, datetime | None], Awaitable[Decimal]]


def persisted_spend(key_id: int, period: str, start: datetime | None) -> Decimal:
    """What the key spent in the period holding ``start``, as last written by the ledger. Sync."""
    row = (
        ApiKey.objects.filter(pk=key_id)
        .values("spent_usd", "period_spent_usd", "period_started_at")
        .first()
    )
    if row is None:
        return Decimal(0)
    if start is None:
        return row["spent_usd"]
    return row["period_spent_usd"] if row["period_started_at"] == start else Decimal(0)


async def admit(
    limits: KeyLimits,
    *,
    estimated_cost_usd: Decimal,
    estimated_tokens: int,
    load_spent: SpentLoader,
    now: float | None = None,
) -> Reservation:
    """Count a request against the key's rates and budget, or raise LimitExceeded (429).

    ``load_spent(key_id, period, period_start)`` reads the persisted spend; it is called only when
    the budget counter is missing from the cache.
    """
    now = time.time() if now is None else now
    window = int(now) // WINDOW_S
    retry_after = WINDOW_S - int(now) % WINDOW_S
    reservation = Reservation(limits)
    if limits.rpm_limit:
        count = await _incr(f"limits:rpm:{limits.key_id}:{window}", 1, WINDOW_S * 2)
        if count > limits.rpm_limit:
            raise _rate_limited(f"{limits.rpm_limit} requests per minute", retry_after)
    if limits.tpm_limit:
        tokens_key = f"limits:tpm:{limits.key_id}:{window}"
        used = await _incr(tokens_key, estimated_tokens, WINDOW_S * 2)
        if used - estimated_tokens >= limits.tpm_limit:
            await _adjust(tokens_key, -estimated_tokens)
            raise _rate_limited(f"{limits.tpm_limit} tokens per minute", retry_after)
        reservation.tokens_key, reservation.reserved_tokens = tokens_key, estimated_tokens
    if limits.budget_usd is not None:
        try:
            await _reserve_budget(limits, reservation, estimated_cost_usd, load_spent)
        except LimitExceeded:
            await release(reservation)
            raise
    return reservation


async def settle(reservation: Reservation, *, cost_usd: Decimal, tokens: int) -> None:
    """Replace what the request reserved by what it really cost and used. Runs once."""
    if reservation.settled:
        return
    reservation.settled = True
    if reservation.budget_key is not None:
        await _adjust(reservation.budget_key, to_nanos(cost_usd) - reservation.reserved_nanos)
    if reservation.tokens_key is not None:
        await _adjust(reservation.tokens_key, tokens - reservation.reserved_tokens)


async def release(reservation: Reservation) -> None:
    """Give back what a refused request reserved."""
    await settle(reservation, cost_usd=Decimal(0), tokens=0)


async def _reserve_budget(
    limits: KeyLimits,
    reservation: Reservation,
    estimated_cost_usd: Decimal,
    load_spent: SpentLoader,
) -> None:
    current = timezone.now()
    start = budget_period_start(limits.budget_period, current)
    budget_key = f"limits:budget:{limits.key_id}:{start.date().isoformat() if start else 'all'}"
    reserve = max(to_nanos(estimated_cost_usd), 0)
    if await _get(budget_key) is None:
        spent = await load_spent(limits.key_id, limits.budget_period, start)
        ends = next_period_start(limits.budget_period, current)
        timeout = None if ends is None else (ends - current).total_seconds() + 3600
        await _add(budget_key, to_nanos(spent), timeout)
    total = await _incr(budget_key, reserve, None)
    budget = to_nanos(limits.budget_usd)
    if total - reserve >= budget:
        await _adjust(budget_key, -reserve)
        period = "" if start is None else f" this {limits.budget_period}"
        raise LimitExceeded(
            429,
            f"This API key has used its budget of {limits.budget_usd.normalize():f} USD{period}.",
            code="budget_exceeded",
            type="insufficient_quota",
        )
    reservation.budget_key, reservation.reserved_nanos = budget_key, reserve


def _rate_limited(limit: str, retry_after_s: int) -> LimitExceeded:
    return LimitExceeded(
        429,
        f"Rate limit reached for this API key ({limit}). Retry in {retry_after_s}s.",
        code="rate_limit_exceeded",
        type="rate_limit_error",
        retry_after_s=retry_after_s,
    )


# Local memory is a dict under a lock: calling it directly saves a thread hop per operation.
# Any other backend does I/O and goes through Django's async cache API.


def _local() -> bool:
    return isinstance(caches[DEFAULT_CACHE_ALIAS], LocMemCache)


async def _get(key: str) -> int | None:
    return cache.get(key) if _local() else await cache.aget(key)


async def _add(key: str, value: int, timeout: float | None) -> bool:
    return cache.add(key, value, timeout) if _local() else await cache.aadd(key, value, timeout)


async def _incr(key: str, delta: int, timeout: float | None) -> int:
    """Add ``delta`` to a counter, creating it at ``delta`` when missing; atomic either way."""
    for _ in range(3):
        try:
            return cache.incr(key, delta) if _local() else await cache.aincr(key, delta)
        except ValueError:
            if await _add(key, delta, timeout):
                return delta
    return cache.incr(key, delta) if _local() else await cache.aincr(key, delta)


async def _adjust(key: str, delta: int) -> None:
    if delta == 0:
        return
    try:
        if _local():
            cache.incr(key, delta)
        else:
            await cache.aincr(key, delta)
    except ValueError:
        pass  # the counter expired or was evicted; it restarts from the persisted spend

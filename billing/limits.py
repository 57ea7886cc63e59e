"""Client key limits on ``/v1``: expiry, allowed models and IPs, per-minute rates and budgets.

The checks read the routing snapshot (``KeyLimits``) and the counters (``billing.counters``: Redis
when configured, so several gateway processes share them, else this process's). Counters are
integers (nano-dollars for money). A budget counter holds what the key spent in its period plus
what requests in flight have reserved: a request is admitted while that total is below the budget
and reserves its estimate; before an attempt at a dearer candidate the reservation grows to that
candidate's estimate only if the total stays within the budget (``cover``); the request settles
its real cost when it ends. With Redis the total also holds what gateway processes have leased
and not yet handed out (``billing.counters``), never more than the room left. So the total passes
the budget by at most one request's reservation, however many run at once. A missing counter
(first use, expired, Redis restarted) starts from the spend persisted on the key.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from typing import Any

from django.utils import timezone

from billing.counters import (
    BUDGET_REFUSED,
    NEEDS_SEED,
    RPM_REFUSED,
    TPM_REFUSED,
    Admission,
    Counters,
)
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
        """True when requests need counters."""
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
    shared: bool = False  # held in Redis rather than this process's counters
    budget_key: str | None = None
    budget_generation: str = ""  # the incarnation of the Redis counter it is held in
    reserved_nanos: int = 0
    tokens_key: str | None = None
    tokens_generation: str = ""
    reserved_tokens: int = 0
    settled: bool = False


SpentLoader = Callable[[int, str, datetime | None], Awaitable[Decimal]]


async def admit(
    counters: Counters,
    limits: KeyLimits,
    *,
    estimated_cost_usd: Decimal,
    estimated_tokens: int,
    load_spent: SpentLoader,
    now: float | None = None,
) -> Reservation:
    """Count a request against the key's rates and budget, or raise LimitExceeded (429).

    One round trip to the counters; ``load_spent(key_id, period, period_start)`` reads the
    persisted spend, only when the budget counter is missing (then one more round trip).
    """
    now = time.time() if now is None else now
    window = int(now) // WINDOW_S
    retry_after = WINDOW_S - int(now) % WINDOW_S
    fields: dict[str, Any] = {}  # one Admission built at the end (replace() costs as much)
    if limits.rpm_limit:
        fields.update(rpm_key=f"rpm:{limits.key_id}:{window}", rpm_limit=limits.rpm_limit)
    if limits.tpm_limit:
        fields.update(
            tpm_key=f"tpm:{limits.key_id}:{window}",
            tpm_limit=limits.tpm_limit,
            tokens=estimated_tokens,
        )
    start = None
    if limits.budget_usd is not None:
        current = timezone.now()
        start = budget_period_start(limits.budget_period, current)
        ends = next_period_start(limits.budget_period, current)
        fields.update(
            budget_key=f"budget:{limits.key_id}:{start.date().isoformat() if start else 'all'}",
            budget_nanos=to_nanos(limits.budget_usd),
            reserve_nanos=max(to_nanos(estimated_cost_usd), 0),
            budget_ttl_s=0 if ends is None else int((ends - current).total_seconds()) + 3600,
        )
    ask = Admission(window_ttl_s=WINDOW_S * 2, **fields)
    verdict = await counters.admit(ask)
    if verdict.code == NEEDS_SEED:
        spent = await load_spent(limits.key_id, limits.budget_period, start)
        verdict = await counters.admit(replace(ask, seed_nanos=to_nanos(spent)))
    if verdict.code == RPM_REFUSED:
        raise _rate_limited(f"{limits.rpm_limit} requests per minute", retry_after)
    if verdict.code == TPM_REFUSED:
        raise _rate_limited(f"{limits.tpm_limit} tokens per minute", retry_after)
    if verdict.code == BUDGET_REFUSED:
        raise _budget_exceeded(limits, start)
    reservation = Reservation(limits, shared=verdict.shared)
    if ask.tpm_key:
        reservation.tokens_key = ask.tpm_key
        reservation.tokens_generation = verdict.tokens_generation
        reservation.reserved_tokens = ask.tokens if verdict.tokens_reserved else 0
    if ask.budget_key:
        reservation.budget_key = ask.budget_key
        reservation.budget_generation = verdict.budget_generation
        reservation.reserved_nanos = ask.reserve_nanos
    return reservation


async def cover(counters: Counters, reservation: Reservation, estimated_cost_usd: Decimal) -> None:
    """Make the reservation cover ``estimated_cost_usd`` (an attempt at a dearer candidate), or
    raise the budget's LimitExceeded when the difference no longer fits in the budget."""
    if reservation.budget_key is None or reservation.settled:
        return
    delta = to_nanos(estimated_cost_usd) - reservation.reserved_nanos
    if delta <= 0:
        return
    limits = reservation.limits
    if not await counters.top_up(
        reservation.budget_key,
        reservation.budget_generation,
        delta,
        to_nanos(limits.budget_usd),
        shared=reservation.shared,
    ):
        start = budget_period_start(limits.budget_period, timezone.now())
        raise _budget_exceeded(limits, start)
    reservation.reserved_nanos += delta


async def settle(
    counters: Counters, reservation: Reservation, *, cost_usd: Decimal, tokens: int
) -> None:
    """Replace what the request reserved by what it really cost and used. Runs once; returns
    once the counters have it (``settle_soon`` does not wait)."""
    batch = settle_soon(counters, reservation, cost_usd=cost_usd, tokens=tokens)
    if batch is not None:
        await asyncio.shield(batch)


def settle_soon(
    counters: Counters, reservation: Reservation, *, cost_usd: Decimal, tokens: int
) -> asyncio.Future | None:
    """``settle`` for the end of a request: local counters change at once, Redis gets it with
    the next settlement batch (the returned future) without a task per request."""
    if reservation.settled:
        return None
    reservation.settled = True
    changes = []  # (counter, generation, delta, spent)
    if reservation.budget_key is not None:
        spent = to_nanos(cost_usd)
        changes.append(
            (
                reservation.budget_key,
                reservation.budget_generation,
                spent - reservation.reserved_nanos,
                spent,
            )
        )
    if reservation.tokens_key is not None:
        changes.append(
            (
                reservation.tokens_key,
                reservation.tokens_generation,
                tokens - reservation.reserved_tokens,
                tokens,
            )
        )
    if not changes:
        return None
    return counters.queue_adjust(changes, shared=reservation.shared)


async def release(counters: Counters, reservation: Reservation) -> None:
    """Give back what a refused request reserved."""
    await settle(counters, reservation, cost_usd=Decimal(0), tokens=0)


def _budget_exceeded(limits: KeyLimits, start: datetime | None) -> LimitExceeded:
    period = "" if start is None else f" this {limits.budget_period}"
    return LimitExceeded(
        429,
        f"This API key has used its budget of {limits.budget_usd.normalize():f} USD{period}.",
        code="budget_exceeded",
        type="insufficient_quota",
    )


def _rate_limited(limit: str, retry_after_s: int) -> LimitExceeded:
    return LimitExceeded(
        429,
        f"Rate limit reached for this API key ({limit}). Retry in {retry_after_s}s.",
        code="rate_limit_exceeded",
        type="rate_limit_error",
        retry_after_s=retry_after_s,
    )


class CostCalibration:
    """Per offer, how what its upstream reports as cost compares with the list price of the same
    usage, over the answers this process has seen: an upstream that bills 1.5 times list is
    estimated at 1.5 times, so a reservation covers what the request will really be charged."""

    def __init__(self) -> None:
        self._sums: dict[int, tuple[Decimal, Decimal]] = {}

    def observe(self, offer_id: int, *, reported_usd: Decimal, list_usd: Decimal) -> None:
        if reported_usd < 0 or list_usd <= 0:
            return
        reported, listed = self._sums.get(offer_id, (Decimal(0), Decimal(0)))
        self._sums[offer_id] = (reported + reported_usd, listed + list_usd)

    def ratio(self, offer_id: int) -> Decimal:
        """Reported over list cost so far; 1 before the first reported cost."""
        sums = self._sums.get(offer_id)
        if sums is None:
            return Decimal(1)
        return sums[0] / sums[1]

"""Reads of the ledger that the admin, the dashboard and the commands share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal

from django.db.models import QuerySet
from django.utils import timezone

from billing.models import USAGE_SUMS, DailyUsage, LedgerEntry

ZERO = Decimal(0)


def day_start(day: date) -> datetime:
    """Midnight of ``day`` in the current time zone."""
    return timezone.make_aware(datetime.combine(day, time.min))


@dataclass(frozen=True)
class Totals:
    requests: int = 0
    errors: int = 0
    client_errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: Decimal = ZERO
    list_cost_usd: Decimal = ZERO

    @classmethod
    def of(cls, row: dict) -> Totals:
        return cls(**{name: row[name] or getattr(cls, name) for name in USAGE_SUMS})

    def __add__(self, other: Totals) -> Totals:
        return Totals(**{name: getattr(self, name) + getattr(other, name) for name in USAGE_SUMS})

    @property
    def upstream_errors(self) -> int:
        return self.errors - self.client_errors

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def savings_usd(self) -> Decimal:
        return self.list_cost_usd - self.cost_usd


def ledger_totals(entries: QuerySet[LedgerEntry]) -> Totals:
    """The totals of some ledger rows (a filtered changelist) in one aggregate query."""
    return Totals.of(entries.usage_totals()[0])


def usage(*, since: date, group_by: Sequence[str] = (), **filters) -> dict[tuple, Totals]:
    """Usage from the start of day ``since`` on, per ``group_by`` values (``"day"``: the calendar
    day in the current time zone; field lookups like ``"provider__slug"`` work), in two queries.

    Pruned rows live on as DailyUsage totals and live rows are never rolled up, so the two add up
    without counting anything twice.
    """
    live = LedgerEntry.objects.filter(created_at__gte=day_start(since), **filters)
    rolled = DailyUsage.objects.filter(day__gte=since, **filters)
    result: dict[tuple, Totals] = {}
    for rows in (live.usage_totals(*group_by), rolled.usage_totals(*group_by)):
        for row in rows:
            group = tuple(row[name] for name in group_by)
            result[group] = result.get(group, Totals()) + Totals.of(row)
    return result


def recent_spend(days: int = 30, **owner) -> Totals:
    """The last ``days`` calendar days of ``owner`` (``api_key=`` or ``upstream_key=``)."""
    since = timezone.localdate() - timedelta(days=days)
    return usage(since=since, **owner).get((), Totals())

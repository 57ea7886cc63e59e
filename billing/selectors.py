"""Reads of the ledger that the admin and the commands share."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from django.db.models import Count, F, QuerySet, Sum
from django.utils import timezone

from billing.models import DailyUsage, LedgerEntry

ZERO = Decimal(0)


@dataclass(frozen=True)
class Totals:
    requests: int
    tokens: int
    cost_usd: Decimal
    list_cost_usd: Decimal

    @property
    def savings_usd(self) -> Decimal:
        return self.list_cost_usd - self.cost_usd


def ledger_totals(entries: QuerySet[LedgerEntry]) -> Totals:
    """Requests, tokens and costs of ``entries`` in one aggregate query."""
    row = entries.order_by().aggregate(
        requests=Count("id"),
        tokens=Sum(F("prompt_tokens") + F("completion_tokens")),
        cost_usd=Sum("cost_usd"),
        list_cost_usd=Sum("list_cost_usd"),
    )
    return Totals(
        requests=row["requests"] or 0,
        tokens=row["tokens"] or 0,
        cost_usd=row["cost_usd"] or ZERO,
        list_cost_usd=row["list_cost_usd"] or ZERO,
    )


def recent_spend(days: int = 30, **owner) -> Totals:
    """Spend of the last ``days`` days for ``owner`` (``api_key=...`` or ``upstream_key=...``).

    Pruned rows live on as DailyUsage totals and live rows are never rolled up, so the two add up
    without counting anything twice.
    """
    since = timezone.now() - timedelta(days=days)
    live = ledger_totals(LedgerEntry.objects.filter(created_at__gte=since, **owner))
    rolled = (
        DailyUsage.objects.filter(day__gte=since.date(), **owner)
        .order_by()
        .aggregate(
            requests=Sum("requests"),
            tokens=Sum(F("prompt_tokens") + F("completion_tokens")),
            cost_usd=Sum("cost_usd"),
            list_cost_usd=Sum("list_cost_usd"),
        )
    )
    return Totals(
        requests=live.requests + (rolled["requests"] or 0),
        tokens=live.tokens + (rolled["tokens"] or 0),
        cost_usd=live.cost_usd + (rolled["cost_usd"] or ZERO),
        list_cost_usd=live.list_cost_usd + (rolled["list_cost_usd"] or ZERO),
    )

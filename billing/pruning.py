"""Dropping old ledger rows while keeping their daily totals (DailyUsage)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from django.db import transaction
from django.db.models import Count, F, Q, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from billing.models import Attempt, DailyUsage, LedgerEntry

GROUP_FIELDS = ("day", "api_key_id", "provider_id", "upstream_key_id", "requested_model")
SUM_FIELDS = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "list_cost_usd",
)


@dataclass
class PruneResult:
    cutoff: datetime
    rows: int = 0
    attempts: int = 0
    days: set = field(default_factory=set)
    groups_created: int = 0
    groups_updated: int = 0


def prune_ledger(*, older_than_days: int, batch_size: int = 1000) -> PruneResult:
    """Roll rows older than ``older_than_days`` into DailyUsage (UTC days), then delete them.

    Each batch is one transaction: its totals are added and its rows deleted together, so an
    interruption leaves every row counted exactly once.
    """
    if older_than_days < 1:
        raise ValueError("older_than_days must be at least 1")
    result = PruneResult(cutoff=timezone.now() - timedelta(days=older_than_days))
    while _prune_batch(result, batch_size):
        pass
    return result


def _prune_batch(result: PruneResult, batch_size: int) -> bool:
    with transaction.atomic():
        ids = list(
            LedgerEntry.objects.filter(created_at__lt=result.cutoff)
            .order_by("id")
            .values_list("id", flat=True)[:batch_size]
        )
        if not ids:
            return False
        for group in _daily_groups(ids):
            _add_to_daily_usage(group, result)
        _, deleted = LedgerEntry.objects.filter(id__in=ids).delete()
        result.attempts += deleted.get(Attempt._meta.label, 0)
        result.rows += len(ids)
    return True


def _daily_groups(ids: list[int]):
    return (
        LedgerEntry.objects.filter(id__in=ids)
        .annotate(day=TruncDate("created_at", tzinfo=UTC))
        .order_by()
        .values(*GROUP_FIELDS)
        .annotate(
            requests=Count("id"),
            errors=Count("id", filter=~Q(outcome=LedgerEntry.Outcome.OK)),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
            cost_usd=Sum("cost_usd"),
            list_cost_usd=Sum("list_cost_usd"),
        )
    )


def _add_to_daily_usage(group: dict, result: PruneResult) -> None:
    key = {name: group[name] for name in GROUP_FIELDS}
    totals = {name: group[name] or 0 for name in SUM_FIELDS}
    result.days.add(group["day"])
    existing = DailyUsage.objects.select_for_update().filter(**key).order_by("id").first()
    if existing is None:
        DailyUsage.objects.create(**key, **totals)
        result.groups_created += 1
        return
    DailyUsage.objects.filter(pk=existing.pk).update(
        **{name: F(name) + value for name, value in totals.items()}
    )
    result.groups_updated += 1

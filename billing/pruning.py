"""Dropping old ledger rows while keeping their daily totals (DailyUsage)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from django.db import transaction
from django.utils import timezone

from billing.models import USAGE_GROUP, Attempt, DailyUsage, LedgerEntry


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
        groups = LedgerEntry.objects.filter(id__in=ids).usage_totals(*USAGE_GROUP, tz=UTC)
        existing = _existing_groups(groups)
        DailyUsage.objects.add(groups)
        result.days.update(group["day"] for group in groups)
        result.groups_updated += len(existing)
        result.groups_created += len(groups) - len(existing)
        _, deleted = LedgerEntry.objects.filter(id__in=ids).delete()
        result.attempts += deleted.get(Attempt._meta.label, 0)
        result.rows += len(ids)
    return True


def _existing_groups(groups: list[dict]) -> set[tuple]:
    """Which of ``groups`` already have a rollup row (for the counts the command prints)."""
    rows = DailyUsage.objects.filter(
        day__in={group["day"] for group in groups},
        requested_model__in={group["requested_model"] for group in groups},
    ).values_list(*USAGE_GROUP)
    wanted = {tuple(group[name] for name in USAGE_GROUP) for group in groups}
    return wanted & set(rows)

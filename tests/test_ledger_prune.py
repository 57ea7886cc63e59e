"""``manage.py prune_ledger``: old rows go, their daily totals stay exact."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db.models import Sum
from django.utils import timezone

from billing.models import Attempt, DailyUsage, LedgerEntry
from tests.factories import make_ledger_owners

pytestmark = pytest.mark.django_db


@pytest.fixture
def owners():
    return make_ledger_owners()


def entry(number: int, created_at: datetime, owners, *, model="m1", outcome="ok") -> LedgerEntry:
    provider, key, api_key = owners
    row = LedgerEntry.objects.create(
        request_id=f"req_{number}",
        created_at=created_at,
        api_key=api_key,
        provider=provider,
        upstream_key=key,
        requested_model=model,
        endpoint="chat/completions",
        outcome=outcome,
        status_code=200 if outcome == "ok" else 502,
        usage_source="reported",
        prompt_tokens=number,
        completion_tokens=2 * number,
        cost_usd=Decimal(f"0.00000{number}13"),
        list_cost_usd=Decimal(f"0.00001{number}"),
    )
    Attempt.objects.create(entry=row, number=1, provider=provider, upstream_model=model)
    return row


def prune(*args: str) -> str:
    out = StringIO()
    call_command("prune_ledger", *args, stdout=out)
    return out.getvalue()


def test_it_keeps_daily_totals_equal_to_the_pruned_rows(owners):
    old_day = (timezone.now() - timedelta(days=40)).replace(hour=10, tzinfo=UTC)
    for number in range(1, 8):
        entry(number, old_day + timedelta(minutes=number), owners, model=f"m{number % 2}")
    entry(8, old_day - timedelta(days=1), owners, outcome="upstream_error")
    recent = entry(9, timezone.now() - timedelta(days=2), owners)
    old = LedgerEntry.objects.exclude(pk=recent.pk)
    expected = old.aggregate(
        cost=Sum("cost_usd"), listed=Sum("list_cost_usd"), p=Sum("prompt_tokens")
    )

    output = prune("--older-than", "30", "--batch-size", "3")

    assert "Pruned 8 ledger rows and 8 attempts" in output
    assert list(LedgerEntry.objects.all()) == [recent]
    assert Attempt.objects.count() == 1
    totals = DailyUsage.objects.aggregate(
        cost=Sum("cost_usd"),
        listed=Sum("list_cost_usd"),
        p=Sum("prompt_tokens"),
        requests=Sum("requests"),
        errors=Sum("errors"),
    )
    assert (totals["cost"], totals["listed"], totals["p"]) == (
        expected["cost"],
        expected["listed"],
        expected["p"],
    )
    assert (totals["requests"], totals["errors"]) == (8, 1)
    # one row per (day, client key, provider, upstream key, model), whatever the batches were
    assert DailyUsage.objects.count() == 3
    m1 = DailyUsage.objects.get(day=old_day.date(), requested_model="m1")
    assert (m1.requests, m1.prompt_tokens, m1.completion_tokens) == (4, 16, 32)
    assert m1.cost_usd == Decimal("0.00000113") + Decimal("0.00000313") + Decimal(
        "0.00000513"
    ) + Decimal("0.00000713")


def test_a_second_prune_adds_to_the_same_daily_rows(owners):
    day = (timezone.now() - timedelta(days=10)).replace(hour=12, tzinfo=UTC)
    entry(1, day, owners)
    prune("--older-than", "5")
    entry(2, day + timedelta(minutes=5), owners)

    prune("--older-than", "5")

    usage = DailyUsage.objects.get()
    assert usage.requests == 2
    assert usage.cost_usd == Decimal("0.00000113") + Decimal("0.00000213")


def test_nothing_to_prune_is_said_plainly(owners):
    entry(1, timezone.now(), owners)

    assert "No ledger rows older than 1 days" in prune("--older-than", "1")
    assert LedgerEntry.objects.count() == 1


@pytest.mark.parametrize("days", ["0", "-3"])
def test_days_must_be_at_least_one(days):
    with pytest.raises(CommandError, match="at least 1"):
        prune("--older-than", days)

"""Usage totals come from one selector over live ledger rows and daily rollups; a rollup group
has exactly one row, also after the client key, provider or upstream key it counts is deleted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import IntegrityError, transaction
from django.utils import timezone

from billing.models import DailyUsage, LedgerEntry
from billing.selectors import Totals, recent_spend, usage
from tests.factories import make_ledger_owners

pytestmark = pytest.mark.django_db


@pytest.fixture
def owners():
    return make_ledger_owners()


def ledger_row(number: int, created_at: datetime, owners, *, api_key="same", outcome="ok"):
    provider, key, owner = owners
    return LedgerEntry.objects.create(
        request_id=f"req_usage_{number}",
        created_at=created_at,
        api_key=owner if api_key == "same" else api_key,
        provider=provider,
        upstream_key=key,
        requested_model="m",
        endpoint="chat/completions",
        outcome=outcome,
        status_code=200 if outcome == "ok" else 502,
        usage_source="reported",
        prompt_tokens=10,
        completion_tokens=5,
        cost_usd=Decimal("0.0000012345"),
        list_cost_usd=Decimal("0.0000020000"),
    )


def prune(days: int = 30) -> str:
    out = StringIO()
    call_command("prune_ledger", "--older-than", str(days), stdout=out)
    return out.getvalue()


def test_pruning_the_same_group_twice_adds_to_its_one_row(owners):
    old = (timezone.now() - timedelta(days=40)).replace(hour=9, tzinfo=UTC)
    ledger_row(1, old, owners)
    ledger_row(2, old + timedelta(minutes=1), owners, api_key=None, outcome="upstream_error")
    prune()
    ledger_row(3, old + timedelta(minutes=2), owners)
    ledger_row(4, old + timedelta(minutes=3), owners, api_key=None)
    assert "2 added to" in prune()

    rows = {row.api_key_id: row for row in DailyUsage.objects.all()}
    assert set(rows) == {owners[2].pk, None}
    assert rows[owners[2].pk].requests == 2 and rows[None].requests == 2
    assert rows[None].errors == 1
    assert rows[owners[2].pk].cost_usd == Decimal("0.0000024690")


def test_the_database_refuses_a_second_row_for_a_group_without_a_client_key(owners):
    provider, key, _ = owners
    group = dict(day=timezone.localdate(), api_key=None, provider=provider, upstream_key=key)
    DailyUsage.objects.create(**group, requested_model="m", requests=1)
    with pytest.raises(IntegrityError), transaction.atomic():
        DailyUsage.objects.create(**group, requested_model="m", requests=1)


def test_deleting_a_client_key_folds_its_rollups_into_the_keyless_ones(owners):
    provider, key, api_key = owners
    day = timezone.localdate() - timedelta(days=40)
    group = dict(day=day, provider=provider, upstream_key=key, requested_model="m")
    DailyUsage.objects.create(**group, api_key=api_key, requests=3, cost_usd=Decimal("0.3"))
    DailyUsage.objects.create(**group, api_key=None, requests=2, cost_usd=Decimal("0.2"))

    api_key.delete()

    (row,) = DailyUsage.objects.all()
    assert (
        row.api_key_id is None
        and row.requests == 5
        and row.cost_usd == Decimal("0.3") + Decimal("0.2")
    )


def test_deleting_a_provider_keeps_every_request_counted(owners):
    provider, _, _ = owners
    day = timezone.localdate() - timedelta(days=3)
    ledger_row(1, timezone.now(), owners)
    DailyUsage.objects.create(day=day, provider=provider, requested_model="m", requests=4)
    DailyUsage.objects.create(day=day, provider=None, requested_model="m", requests=1)

    provider.delete()  # its upstream key goes with it

    assert usage(since=day)[()].requests == 6
    assert DailyUsage.objects.get().requests == 5


def test_live_rows_and_rollups_add_up_per_group(owners):
    provider, key, api_key = owners
    today = timezone.localdate()
    ledger_row(1, timezone.now(), owners)
    ledger_row(2, timezone.now(), owners, outcome="upstream_error")
    DailyUsage.objects.create(
        day=today - timedelta(days=2),
        api_key=api_key,
        provider=provider,
        upstream_key=key,
        requested_model="m",
        requests=7,
        errors=1,
        prompt_tokens=70,
        completion_tokens=35,
        cost_usd=Decimal("0.5"),
        list_cost_usd=Decimal("0.75"),
    )
    totals = usage(since=today - timedelta(days=6), group_by=("upstream_key",))
    assert totals == {
        (key.pk,): Totals(
            requests=9,
            errors=2,
            prompt_tokens=90,
            completion_tokens=45,
            cost_usd=Decimal("0.5") + 2 * Decimal("0.0000012345"),
            list_cost_usd=Decimal("0.75") + 2 * Decimal("0.0000020000"),
        )
    }
    assert recent_spend(api_key=api_key) == totals[(key.pk,)]
    assert usage(since=today)[()].requests == 2

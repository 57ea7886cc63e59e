"""An upstream key's state machine: one queryset method per transition, one wording of why."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from providers.models import UpstreamKey, unusable_reason
from providers.upstream import Failure, health_after
from routing.health import HealthBoard
from routing.models import SnapshotVersion
from routing.snapshot import build_snapshot
from tests.factories import make_key, make_provider

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def key():
    provider = make_provider("acme", "http://127.0.0.1:9/v1")
    return make_key(provider, "sk-acme-" + "a" * 30, label="main")


def keys_of(key):
    return UpstreamKey.objects.filter(pk=key.pk)


def test_each_health_transition_tells_routing_to_rebuild(key):
    for transition in (
        lambda: keys_of(key).mark_invalid("bad key"),
        lambda: keys_of(key).reset(),
        lambda: keys_of(key).mark_exhausted("no credit"),
        lambda: keys_of(key).recover(),
    ):
        before = SnapshotVersion.current()
        assert transition() == 1
        assert SnapshotVersion.current() != before


def test_a_transition_that_changes_nothing_does_not_rebuild(key):
    before = SnapshotVersion.current()
    assert keys_of(key).recover() == 0  # not exhausted: nothing to recover
    assert SnapshotVersion.current() == before


def test_a_cooldown_is_recorded_without_a_rebuild(key):
    before = SnapshotVersion.current()
    keys_of(key).cool_down(30, "503 from upstream")
    key.refresh_from_db()
    assert key.current_health == UpstreamKey.Health.COOLING
    assert key.last_error == "503 from upstream"
    assert SnapshotVersion.current() == before


def test_every_failure_maps_to_one_health():
    assert health_after(Failure.INVALID) == UpstreamKey.Health.INVALID
    assert health_after(Failure.EXHAUSTED) == UpstreamKey.Health.EXHAUSTED
    assert health_after(Failure.TRANSIENT) == UpstreamKey.Health.COOLING
    assert health_after(Failure.RATE_LIMITED) == UpstreamKey.Health.COOLING
    assert health_after(Failure.CLIENT) is None
    assert health_after(None) is None


def test_mark_with_a_cooling_health_only_records_the_error(key):
    keys_of(key).mark(health_after(Failure.TRANSIENT), "timed out")
    key.refresh_from_db()
    assert key.health == UpstreamKey.Health.OK and key.last_error == "timed out"


def test_the_model_and_the_gateway_board_give_the_same_reason(key):
    keys_of(key).mark_invalid("User not found.")
    key.refresh_from_db()
    info = build_snapshot().keys[key.provider_id][0]
    expected = "invalid: User not found."
    assert key.unusable_reason() == expected
    assert HealthBoard().unusable_reason(info) == expected
    assert unusable_reason(health=key.health, last_error=key.last_error) == expected


def test_a_cooling_key_reads_the_same_from_the_model_and_the_board(key):
    until = timezone.now() + timedelta(seconds=60)
    UpstreamKey.objects.filter(pk=key.pk).update(cooldown_until=until)
    key.refresh_from_db()
    snapshot = build_snapshot()
    board = HealthBoard()
    board.adopt(snapshot.keys)  # a persisted cooldown counts after a restart
    assert key.unusable_reason().startswith("cooling down until ")
    assert board.unusable_reason(snapshot.keys[key.provider_id][0]) == key.unusable_reason()


def test_a_zero_balance_key_cannot_serve():
    assert unusable_reason(health="ok", balance=Decimal(0)) == "balance is zero"
    assert unusable_reason(health="ok", balance=Decimal("0.5")) is None

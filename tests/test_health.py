"""The health board's circuit breaker: trips on a failing key, probes it, escalates by episode."""

from __future__ import annotations

import time

import pytest

from providers.upstream import Failure
from routing.health import Cooldown, HealthBoard
from routing.snapshot import KeyInfo


def key(key_id: int = 1, health: str = "ok") -> KeyInfo:
    return KeyInfo(
        id=key_id,
        provider_id=1,
        name=f"k{key_id}",
        masked="sk-...1234",
        secret="sk-secret",
        multiplier=1,
        balance=None,
        health=health,
        cooldown_until=None,
        last_error="",
    )


@pytest.fixture(autouse=True)
def breaker(settings):
    settings.KEYAOS_TRANSIENT_COOLDOWN_S = 5
    settings.KEYAOS_MAX_COOLDOWN_S = 300
    settings.KEYAOS_TRIP_MIN_FAILURES = 3
    settings.KEYAOS_TRIP_FAILURE_RATIO = 0.5
    settings.KEYAOS_HEALTH_WINDOW_S = 10


def fail(board: HealthBoard, k: KeyInfo, started: float | None = None, **kwargs):
    return board.note_failure(k, Failure.TRANSIENT, started=started, **kwargs)


def trip(board: HealthBoard, k: KeyInfo) -> Failure | Cooldown | None:
    """Fail the key the three times (KEYAOS_TRIP_MIN_FAILURES) that trip it; returns what the
    third failure set."""
    for _ in range(3):
        outcome = fail(board, k, board.begin(k))
    return outcome


def end_cooldown(board: HealthBoard, k: KeyInfo) -> None:
    """Pretend the key's cooldown ended a moment ago (its length unchanged)."""
    c = board.cooldowns[k.id]
    board.cooldowns[k.id] = Cooldown(
        time.time() - 0.001, c.set_at - c.until + time.time(), c.trips, c.stated
    )


def test_one_failure_on_a_busy_key_leaves_it_in_routing():
    board, k = HealthBoard(), key()
    for _ in range(20):
        board.record_success(k, board.begin(k))
    assert fail(board, k, board.begin(k)) is None
    assert board.unusable_reason(k) is None


def test_a_key_that_keeps_failing_trips_on_the_third_failure():
    board, k = HealthBoard(), key()
    assert fail(board, k, board.begin(k)) is None
    assert fail(board, k, board.begin(k)) is None
    cooldown = fail(board, k, board.begin(k))
    assert isinstance(cooldown, Cooldown) and round(cooldown.seconds) == 5
    assert board.unusable_reason(k).startswith("cooling down until")


def test_attempts_in_flight_when_the_key_tripped_do_not_lengthen_its_cooldown():
    board, k = HealthBoard(), key()
    in_flight = [board.begin(k) for _ in range(20)]
    outcomes = [fail(board, k, started) for started in in_flight]
    trips = [o for o in outcomes if isinstance(o, Cooldown)]
    assert len(trips) == 1 and round(trips[0].seconds) == 5
    assert board.cooldowns[k.id] == trips[0]


def test_last_resort_attempts_that_fail_during_the_cooldown_do_not_lengthen_it():
    board, k = HealthBoard(), key()
    trip(board, k)
    tripped = board.cooldowns[k.id]
    for _ in range(10):
        assert fail(board, k, board.begin(k, last_resort=True)) is None
    assert board.cooldowns[k.id] == tripped


def test_after_the_cooldown_one_probe_goes_through_and_its_success_closes_the_key():
    board, k = HealthBoard(), key()
    trip(board, k)
    end_cooldown(board, k)
    assert board.unusable_reason(k) is None  # half-open: routable for the probe
    probe = board.begin(k)
    assert probe is not None
    assert board.begin(k) is None  # the others go elsewhere
    assert board.unusable_reason(k).startswith("half-open")
    ended = board.record_success(k, probe)
    assert ended is not None and k.id not in board.cooldowns
    assert board.begin(k) is not None and board.begin(k) is not None


def test_a_failed_probe_trips_the_key_again_for_twice_as_long():
    board, k = HealthBoard(), key()
    trip(board, k)
    end_cooldown(board, k)
    again = fail(board, k, board.begin(k))
    assert isinstance(again, Cooldown) and round(again.seconds) == 10 and again.trips == 2


def test_a_key_that_trips_again_soon_after_closing_escalates():
    board, k = HealthBoard(), key()
    trip(board, k)
    end_cooldown(board, k)
    board.record_success(k, board.begin(k))
    outcome = trip(board, k)
    assert isinstance(outcome, Cooldown) and outcome.trips == 2


def test_a_cancelled_probe_frees_the_key_for_the_next_probe():
    board, k = HealthBoard(), key()
    trip(board, k)
    end_cooldown(board, k)
    board.abandon(k, board.begin(k))
    assert board.begin(k) is not None


def test_transient_cooldowns_may_be_lifted_as_a_last_resort():
    board, k = HealthBoard(), key()
    trip(board, k)
    assert board.lifts_at(k) == board.cooldowns[k.id].until
    assert board.begin(k, last_resort=True) is not None


def test_a_success_in_the_last_resort_pass_closes_the_key():
    board, k = HealthBoard(), key()
    trip(board, k)
    assert board.record_success(k, board.begin(k, last_resort=True)) is not None
    assert board.unusable_reason(k) is None


def test_what_the_upstream_stated_is_never_lifted():
    board = HealthBoard()
    limited, bare_429, invalid = key(1), key(2), key(3)
    board.note_failure(limited, Failure.RATE_LIMITED, 30, started=board.begin(limited))
    board.note_failure(bare_429, Failure.RATE_LIMITED, None, started=board.begin(bare_429))
    board.note_failure(invalid, Failure.INVALID, started=board.begin(invalid))
    assert board.lifts_at(limited) is None
    assert board.lifts_at(bare_429) is not None  # no Retry-After: Keyaos chose the wait
    assert board.lifts_at(invalid) is None
    assert board.unusable_reason(invalid).startswith("invalid")


def test_a_rate_limit_cools_the_key_at_once_without_escalating():
    board, k = HealthBoard(), key()
    first = board.note_failure(k, Failure.RATE_LIMITED, 30, started=board.begin(k))
    assert isinstance(first, Cooldown) and first.trips == 0 and first.stated


def test_a_newer_cooldown_from_another_process_is_adopted_an_older_one_is_not():
    here, there, k = HealthBoard(), HealthBoard(), key()
    trip(there, k)
    shared = {f"cooldown:{k.id}": list(vars(there.cooldowns[k.id]).values())}
    here.merge(shared)
    assert here.cooldowns[k.id] == there.cooldowns[k.id]
    here.record_success(k, here.begin(k, last_resort=True))  # closed here
    here.merge(shared)
    assert k.id not in here.cooldowns


def test_concurrent_refusals_of_an_invalid_key_are_persisted_once():
    board, k = HealthBoard(), key()
    outcomes = [
        board.note_failure(k, Failure.INVALID, started=started)
        for started in [board.begin(k) for _ in range(20)]
    ]
    assert outcomes.count(Failure.INVALID) == 1 and outcomes.count(None) == 19
    assert board.note_failure(key(health="invalid"), Failure.INVALID) is None

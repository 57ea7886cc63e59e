"""The dispatcher against a brute force: over thousands of random pools (prices in USD and CNY,
multipliers, health, cooldowns, balances and requests in flight, context lengths, prompt cache
state, provider preferences), the keys it picks are the argmin of the expected cost."""

from __future__ import annotations

import random
import time
from decimal import Decimal

import pytest

from billing.costs import Prices
from routing.dispatcher import InFlight, ProviderPreferences, rank_candidates
from routing.health import Cooldown, HealthBoard
from routing.sessions import SessionState
from routing.snapshot import KeyInfo, OfferInfo, ProviderInfo, Snapshot

MODEL = "vendor/model"
RATES = {"USD": Decimal(1), "CNY": Decimal("0.14"), "EUR": Decimal("1.08")}
CASES = 2000


def random_pool(rng: random.Random, now: float):
    providers = [
        ProviderInfo(
            id=number,
            slug=f"p{number}",
            name=f"P{number}",
            base_url="http://127.0.0.1:9",
            currency=rng.choice(["USD", "USD", "CNY", "GBP"]),  # GBP: no rate
            auth_style="bearer",
            read_timeout_s=60.0,
            prompt_cache_ttl_s=rng.choice([0.0, 60.0, 300.0]),
        )
        for number in range(1, rng.randint(1, 5) + 1)
    ]
    offers, keys = [], {}
    board = HealthBoard()
    in_flight = InFlight()
    key_ids = iter(range(1, 10_000))
    for provider in providers:
        for _ in range(rng.choice([1, 1, 2])):
            offers.append(random_offer(rng, provider, len(offers) + 1))
        keys[provider.id] = []
        for _ in range(rng.randint(0, 5)):
            key = random_key(rng, provider, next(key_ids), now)
            keys[provider.id].append(key)
            if rng.random() < 0.15:
                until = now + rng.choice([-5, 30])
                board.cooldowns[key.id] = Cooldown(until, now - 60, rng.choice([0, 1]), True)
            if rng.random() < 0.05:
                board.marked[key.id] = "invalid"
            if rng.random() < 0.3:
                in_flight.reserve(key.id, price(rng, 0, 3))
    snapshot = Snapshot(
        token=None,
        offers={MODEL: offers},
        native_ids={},
        keys=keys,
        rates=RATES,
        client_keys={},
        disabled_client_keys=set(),
    )
    return snapshot, board, in_flight


def random_offer(rng: random.Random, provider: ProviderInfo, number: int) -> OfferInfo:
    prices = None
    if rng.random() < 0.9:
        input_price = price(rng, 0, 20)
        cached = rng.choice([None, input_price / 10, input_price, price(rng, 0, 2)])
        prices = Prices(provider.currency, input_price, price(rng, 0, 60), cached)
    return OfferInfo(
        id=number,
        provider=provider,
        upstream_model_id=f"native-{number}",
        canonical_id=MODEL,
        identity_rule="lowercase",
        kind=rng.choice(["chat"] * 6 + ["embedding"]),
        prices=prices,
        context_length=rng.choice([None, 4096, 32768, 200_000]),
        created=0,
    )


def random_key(rng: random.Random, provider: ProviderInfo, number: int, now: float) -> KeyInfo:
    return KeyInfo(
        id=number,
        provider_id=provider.id,
        name=f"k{number}",
        masked="sk-...",
        secret="secret",
        multiplier=rng.choice([Decimal(0), Decimal("0.5"), Decimal("0.8"), Decimal(1)]),
        balance=rng.choice([None, None, Decimal(0), price(rng, 0, 2), price(rng, 0, 100)]),
        health=rng.choice(["ok"] * 8 + ["exhausted", "invalid"]),
        cooldown_until=None,
        last_error="",
    )


def price(rng: random.Random, low: int, high: int) -> Decimal:
    return Decimal(rng.randint(low * 10_000, high * 10_000)) / 10_000


def random_request(rng: random.Random, snapshot: Snapshot, now: float):
    prompt, output = rng.choice([10, 2000, 30_000, 150_000]), rng.choice([1, 1024, 8000])
    keys = [key for provider_keys in snapshot.keys.values() for key in provider_keys]
    offers = snapshot.offers[MODEL]
    session = None
    if keys and rng.random() < 0.6:
        key = rng.choice(keys)
        same_provider = [o for o in offers if o.provider.id == key.provider_id] or offers
        session = SessionState(
            key_id=key.id,
            offer_id=rng.choice(same_provider).id,
            served_at=now - rng.choice([1, 100, 1000]),
            prompt_tokens=rng.choice([0, prompt // 2, prompt, prompt * 2]),
            ttl_s=300.0,
        )
    slugs = [f"p{number}" for number in range(1, 6)]
    preferences = ProviderPreferences(
        only=frozenset(rng.sample(slugs, 2)) if rng.random() < 0.2 else frozenset(),
        ignore=frozenset(rng.sample(slugs, 1)) if rng.random() < 0.2 else frozenset(),
        order=tuple(rng.sample(slugs, 2)) if rng.random() < 0.2 else (),
    )
    kind = rng.choice(["chat"] * 5 + ["embedding"])
    return prompt, output, session, preferences, kind


def brute_force(snapshot, board, in_flight, prompt, output, session, preferences, kind, now):
    """Every (offer, key) that may serve, with its rank: written from the rules, not the code."""
    pairs = []
    for offer in snapshot.offers[MODEL]:
        provider = offer.provider
        if offer.kind != kind or offer.prices is None or provider.currency not in RATES:
            continue
        if preferences.only and provider.slug not in preferences.only:
            continue
        if provider.slug in preferences.ignore:
            continue
        if offer.context_length is not None and offer.context_length < prompt + output:
            continue
        prices = offer.prices
        for key in snapshot.keys.get(provider.id, []):
            health = board.marked.get(key.id, key.health)
            cooldown = board.cooldowns.get(key.id)
            if health != "ok" or (cooldown is not None and cooldown.until > now):
                continue
            cached = 0
            if (
                session is not None
                and session.key_id == key.id
                and session.offer_id == offer.id
                and now - session.served_at <= provider.prompt_cache_ttl_s
                and prices.cached_input_per_mtok is not None
                and prices.cached_input_per_mtok < prices.input_per_mtok
            ):
                cached = min(session.prompt_tokens, prompt)
            cached_price = prices.cached_input_per_mtok if cached else Decimal(0)
            list_cost = (
                (prompt - cached) * prices.input_per_mtok
                + cached * cached_price
                + output * prices.output_per_mtok
            ) / 1_000_000
            if key.balance is not None:
                held = in_flight.reserved.get(key.id, Decimal(0))
                if key.balance <= 0 or key.balance - held < list_cost:
                    continue
            order = (
                preferences.order.index(provider.slug)
                if provider.slug in preferences.order
                else len(preferences.order)
            )
            cost = list_cost * RATES[provider.currency] * key.multiplier
            pairs.append(((order, cost), offer.id, key.id))
    return sorted(pairs)


def rank(candidate, preferences: ProviderPreferences) -> tuple[int, Decimal]:
    order = preferences.order
    slug = candidate.provider.slug
    return (order.index(slug) if slug in order else len(order), candidate.estimated_cost_usd)


@pytest.mark.parametrize("seed", [1, 2])
def test_the_chosen_keys_are_the_brute_force_argmin_of_expected_cost(seed):
    rng = random.Random(seed)
    now = time.time()
    checked = refused = 0
    for _ in range(CASES):
        snapshot, board, in_flight = random_pool(rng, now)
        prompt, output, session, preferences, kind = random_request(rng, snapshot, now)
        expected = brute_force(
            snapshot, board, in_flight, prompt, output, session, preferences, kind, now
        )
        arguments = dict(
            board=board,
            prompt_tokens=prompt,
            output_tokens=output,
            kind=kind,
            preferences=preferences,
            session=session,
            in_flight=in_flight,
            now=now,
        )
        top = rank_candidates(snapshot, MODEL, limit=3, **arguments)
        full = rank_candidates(snapshot, MODEL, **arguments)
        if not expected:
            assert top.candidates == [] and full.candidates == []
            assert top.refusal is not None
            refused += 1
            continue
        assert [rank(c, preferences) for c in top.candidates] == [r for r, _, _ in expected[:3]]
        assert [rank(c, preferences) for c in full.candidates] == [r for r, _, _ in expected]
        assert {(c.offer.id, c.key.id) for c in full.candidates} == {
            (offer_id, key_id) for _, offer_id, key_id in expected
        }
        best_rank = expected[0][0]
        best = {(o, k) for r, o, k in expected if r == best_rank}
        assert (top.candidates[0].offer.id, top.candidates[0].key.id) in best
        checked += 1
    assert checked > CASES // 3 and refused > 50  # both kinds of outcome were exercised

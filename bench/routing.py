"""The routing decision alone, in process: how long ranking one request's candidates takes.

A synthetic pool of ``--offers`` offers and ``--keys`` upstream keys (10 providers in USD and CNY,
each model sold by 5 of them, two price multipliers per provider, some keys cooling down or out of
credit, balances with requests in flight, cached-input prices, and prompt-cache sessions on 40 %
of the requests), then ``--decisions`` decisions as the gateway makes them: the model resolved,
the first ``KEYAOS_MAX_ATTEMPTS`` candidates ranked by expected cost. Run it alone with
``python -m bench.routing``; ``make bench`` runs it as one of its measurements.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from decimal import Decimal

PROVIDERS = 10
SELLERS_PER_MODEL = 5
TARGET_US = 50.0


def build_pool(offers: int, keys: int, seed: int = 14):
    from billing.costs import Prices
    from routing.dispatcher import InFlight
    from routing.health import Cooldown, HealthBoard
    from routing.snapshot import KeyInfo, OfferInfo, ProviderInfo, Snapshot

    rng = random.Random(seed)
    providers = [
        ProviderInfo(
            id=number,
            slug=f"provider-{number}",
            name=f"Provider {number}",
            base_url="http://127.0.0.1:9/v1",
            currency="CNY" if number % 4 == 0 else "USD",
            auth_style="bearer",
            read_timeout_s=300.0,
        )
        for number in range(1, PROVIDERS + 1)
    ]
    board, in_flight, now = HealthBoard(), InFlight(), time.time()
    pool_keys: dict[int, list] = {}
    per_provider = keys // PROVIDERS
    for provider in providers:
        pool_keys[provider.id] = []
        for index in range(per_provider):
            key_id = provider.id * 10_000 + index
            balance = None if index % 3 else Decimal(rng.randint(1, 500)) / 100
            pool_keys[provider.id].append(
                KeyInfo(
                    id=key_id,
                    provider_id=provider.id,
                    name=f"key-{key_id}",
                    masked="sk-...0000",
                    secret="sk-bench",
                    multiplier=Decimal("0.8") if index % 2 else Decimal(1),
                    balance=balance,
                    health="exhausted" if index % 17 == 0 else "ok",
                    cooldown_until=None,
                    last_error="",
                )
            )
            if index % 11 == 0:
                board.cooldowns[key_id] = Cooldown(now + 60, now, 0, True)
            if balance is not None and index % 2:
                in_flight.reserve(key_id, Decimal("0.01"))
    models = max(offers // SELLERS_PER_MODEL, 1)
    catalog: dict[str, list] = {}
    offer_id = 0
    for model_number in range(models):
        model = f"vendor-{model_number % 40}/model-{model_number}"
        sellers = rng.sample(providers, SELLERS_PER_MODEL)
        catalog[model] = []
        for provider in sellers:
            offer_id += 1
            input_price = Decimal(rng.randint(5, 3000)) / 100
            cached = input_price / 10 if rng.random() < 0.6 else None
            catalog[model].append(
                OfferInfo(
                    id=offer_id,
                    provider=provider,
                    upstream_model_id=model.split("/")[1].title(),
                    canonical_id=model,
                    identity_rule="published",
                    kind="chat",
                    prices=Prices(provider.currency, input_price, input_price * 4, cached),
                    context_length=rng.choice([None, 32768, 131072, 1_000_000]),
                    created=0,
                )
            )
    snapshot = Snapshot(
        token=None,
        offers=catalog,
        native_ids={},
        keys=pool_keys,
        rates={"USD": Decimal(1), "CNY": Decimal("0.14")},
        client_keys={},
        disabled_client_keys=set(),
    )
    return snapshot, board, in_flight, rng


def requests(snapshot, rng: random.Random, count: int) -> list[tuple]:
    from routing.sessions import SessionState

    models = list(snapshot.offers)
    chosen = []
    now = time.time()
    for _ in range(count):
        model = rng.choice(models)
        prompt = rng.choice([200, 2_000, 20_000, 60_000])
        session = None
        if rng.random() < 0.4:
            offer = rng.choice(snapshot.offers[model])
            key = rng.choice(snapshot.keys[offer.provider.id])
            session = SessionState(key.id, offer.id, now - 30, prompt // 2, 300.0)
        chosen.append((model, prompt, rng.choice([256, 1024, 4096]), session))
    return chosen


def measure(offers: int, keys: int, decisions: int) -> dict:
    from django.conf import settings

    from routing.dispatcher import rank_candidates, resolve_model

    snapshot, board, in_flight, rng = build_pool(offers, keys)
    built = requests(snapshot, rng, decisions)
    limit = settings.KEYAOS_MAX_ATTEMPTS
    snapshot.key_groups  # noqa: B018  (built once per snapshot, as in the gateway)
    snapshot.key_by_id  # noqa: B018
    snapshot.bare_ids  # noqa: B018

    def decide(model: str, prompt: int, output: int, session):
        return rank_candidates(
            snapshot,
            resolve_model(snapshot, model),
            board=board,
            prompt_tokens=prompt,
            output_tokens=output,
            kind="chat",
            session=session,
            in_flight=in_flight,
            limit=limit,
        )

    gc.freeze()  # as the gateway does once its snapshot is loaded
    for request in built[: min(500, decisions)]:  # warm up
        decide(*request)
    timings = []
    found = 0
    clock = time.perf_counter_ns
    cpu_started = time.process_time_ns()
    for request in built:
        started = clock()
        decision = decide(*request)
        timings.append(clock() - started)
        found += bool(decision.candidates)
    cpu_us = (time.process_time_ns() - cpu_started) / 1000 / decisions
    timings_us = sorted(t / 1000 for t in timings)
    return {
        "offers": sum(len(o) for o in snapshot.offers.values()),
        "keys": sum(len(k) for k in snapshot.keys.values()),
        "decisions": decisions,
        "with_candidates": found,
        "mean_us": round(statistics.fmean(timings_us), 2),
        "cpu_mean_us": round(cpu_us, 2),  # CPU time: without the time other processes took
        "p50_us": round(timings_us[len(timings_us) // 2], 2),
        "p99_us": round(timings_us[int(len(timings_us) * 0.99) - 1], 2),
        "target_us": TARGET_US,
    }


def report(result: dict) -> str:
    verdict = "meets" if result["cpu_mean_us"] <= result["target_us"] else "misses"
    return (
        f"routing decision, {result['offers']} offers x {result['keys']} keys, "
        f"{result['decisions']} decisions: mean {result['mean_us']} us "
        f"(CPU {result['cpu_mean_us']} us), "
        f"p50 {result['p50_us']} us, p99 {result['p99_us']} us "
        f"({verdict} the {result['target_us']:.0f} us target)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offers", type=int, default=5000)
    parser.add_argument("--keys", type=int, default=500)
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "keyaos.settings")
    import django

    django.setup()
    result = measure(args.offers, args.keys, args.decisions)
    print(json.dumps(result) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

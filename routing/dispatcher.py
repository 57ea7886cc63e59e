"""Which key serves a request: every usable (offer, key) pair, cheapest first."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal

from billing.costs import MILLION
from billing.currency import UnknownCurrency, to_usd
from routing.health import HealthBoard
from routing.snapshot import KeyInfo, OfferInfo, Snapshot


class ModelNotFound(Exception):
    pass


class AmbiguousModel(Exception):
    def __init__(self, requested: str, matches: list[str]) -> None:
        self.matches = sorted(matches)
        super().__init__(
            f"The model id {requested!r} names several models: {', '.join(self.matches)}. "
            "Ask for one of them."
        )


@dataclass(frozen=True)
class ProviderPreferences:
    """A client's narrowing of providers, like OpenRouter's ``provider`` request field."""

    only: frozenset[str] = frozenset()
    ignore: frozenset[str] = frozenset()
    order: tuple[str, ...] = ()


@dataclass(frozen=True)
class Candidate:
    offer: OfferInfo
    key: KeyInfo
    estimated_cost_usd: Decimal

    @property
    def provider(self):
        return self.offer.provider


@dataclass(frozen=True)
class Exclusion:
    provider_slug: str
    upstream_model_id: str
    key_name: str
    reason: str


@dataclass(frozen=True)
class Decision:
    model: str
    candidates: list[Candidate]
    excluded: list[Exclusion]
    # Excluded only by a cooldown that may be lifted, soonest end first: tried when no
    # candidate served (see routing.health).
    last_resort: list[Candidate] = field(default_factory=list)


def resolve_model(snapshot: Snapshot, requested: str) -> str:
    """The canonical id for a canonical, native or unambiguous bare model id."""
    if requested in snapshot.offers:
        return requested
    lowered = requested.strip().lower()
    if lowered in snapshot.offers:
        return lowered
    natives = snapshot.native_ids.get(lowered, set())
    if len(natives) == 1:
        return next(iter(natives))
    bare = (
        snapshot.bare_ids().get(lowered.rsplit("/", 1)[-1], set()) if "/" not in lowered else set()
    )
    matches = natives | bare
    if len(matches) == 1:
        return next(iter(matches))
    if matches:
        raise AmbiguousModel(requested, list(matches))
    raise ModelNotFound(requested)


def rank_candidates(
    snapshot: Snapshot,
    model: str,
    *,
    board: HealthBoard,
    prompt_tokens: int,
    output_tokens: int,
    kind: str | None = None,
    preferences: ProviderPreferences | None = None,
) -> Decision:
    """Rank every usable (offer, key) pair for ``model`` by this request's estimated USD cost.

    Equal costs are shuffled so that keys at the same price share the traffic (and their rate
    limits). A provider named in ``preferences.order`` comes before the others, in that order.
    """
    preferences = preferences or ProviderPreferences()
    candidates: list[Candidate] = []
    excluded: list[Exclusion] = []
    last_resort: list[tuple[float, Candidate]] = []
    for offer in snapshot.offers.get(model, []):
        reason = _offer_exclusion(offer, kind, preferences)
        provider_keys = snapshot.keys.get(offer.provider.id, [])
        if reason is None and not provider_keys:
            reason = "no enabled key for this provider"
        if reason is not None:
            excluded.append(Exclusion(offer.provider.slug, offer.upstream_model_id, "-", reason))
            continue
        try:
            base_cost = _base_cost_usd(offer, snapshot, prompt_tokens, output_tokens)
        except UnknownCurrency as error:
            excluded.append(
                Exclusion(offer.provider.slug, offer.upstream_model_id, "-", str(error))
            )
            continue
        for key in provider_keys:
            key_reason = board.unusable_reason(key)
            if key_reason is None:
                candidates.append(Candidate(offer, key, base_cost * key.multiplier))
                continue
            excluded.append(
                Exclusion(offer.provider.slug, offer.upstream_model_id, key.name, key_reason)
            )
            lifts_at = board.lifts_at(key)
            if lifts_at is not None:
                last_resort.append((lifts_at, Candidate(offer, key, base_cost * key.multiplier)))
    order = {slug: index for index, slug in enumerate(preferences.order)}
    tie_breaks = {id(candidate): random.random() for candidate in candidates}
    candidates.sort(
        key=lambda c: (
            order.get(c.provider.slug, len(order)),
            c.estimated_cost_usd,
            tie_breaks[id(c)],
        )
    )
    last_resort.sort(key=lambda item: (item[0], item[1].estimated_cost_usd))
    return Decision(
        model=model,
        candidates=candidates,
        excluded=excluded,
        last_resort=[candidate for _, candidate in last_resort],
    )


def attempt_order(board: HealthBoard, decision: Decision) -> Iterator[tuple[Candidate, float]]:
    """The candidates in rank order, then (none having served) the last resort: keys out only
    for a cooldown that may be lifted, soonest end first. Yields each with its start time."""
    skipped = []
    for candidate in decision.candidates:
        started = board.begin(candidate.key)
        if started is None:
            skipped.append(candidate)  # tripped since the ranking, or its probe is taken
        else:
            yield candidate, started
    now = time.time()
    lifted = [(board.lifts_at(c.key, now), c) for c in skipped]
    lifted = [(at, c) for at, c in lifted if at is not None]
    lifted.sort(key=lambda item: item[0])
    for candidate in [c for _, c in lifted] + decision.last_resort:
        yield candidate, board.begin(candidate.key, last_resort=True)


def _offer_exclusion(
    offer: OfferInfo, kind: str | None, preferences: ProviderPreferences
) -> str | None:
    slug = offer.provider.slug
    if preferences.only and slug not in preferences.only:
        return "provider not in the request's provider.only"
    if slug in preferences.ignore:
        return "provider in the request's provider.ignore"
    if kind is not None and offer.kind != kind:
        return f"serves {offer.kind}, not {kind}"
    if offer.prices is None:
        return "no price known (set one with manage.py set_price or in the admin)"
    return None


def _base_cost_usd(
    offer: OfferInfo, snapshot: Snapshot, prompt_tokens: int, output_tokens: int
) -> Decimal:
    prices = offer.prices
    list_cost = (
        prompt_tokens * prices.input_per_mtok + output_tokens * prices.output_per_mtok
    ) / MILLION
    return to_usd(list_cost, prices.currency, snapshot.rates)

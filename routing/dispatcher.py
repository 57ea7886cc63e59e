"""Which key serves a request: every usable (offer, key) pair, by this request's expected cost.

The expected cost is the request's estimated tokens at the offer's prices, in USD, times the key's
multiplier; for the key that served the same session within its provider's prompt cache lifetime,
the prefix it sent then is expected at the cached-input price. A pair is a candidate only when the
offer fits the request (kind, context length, the client's provider preferences, a known price)
and the key can serve it (health, cooldown, and a known balance that still covers this request
after what its requests in flight are estimated to cost).

The request path asks for the first few candidates only (``limit``): keys are grouped by
multiplier in the snapshot, so the cost is computed once per (offer, multiplier) and only the keys
walked until ``limit`` are looked at. ``route`` and the model page ask for all of them, with the
reason each excluded one is out. When there is no candidate, the full pass also says what the
client should be told (``Decision.refusal``).
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal

from billing.costs import MILLION
from billing.currency import UnknownCurrency, usd_per_unit
from routing.health import HealthBoard
from routing.sessions import SessionState
from routing.snapshot import KeyInfo, OfferInfo, Snapshot

ZERO = Decimal(0)
OK = "ok"


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

    @property
    def narrows(self) -> bool:
        return bool(self.only or self.ignore)


NO_PREFERENCES = ProviderPreferences()


class InFlight:
    """The estimated cost of each key's requests in flight in this process, in the provider's
    currency: a key whose known balance would not cover them and one more is not a candidate."""

    def __init__(self) -> None:
        self.reserved: dict[int, Decimal] = {}

    def reserve(self, key_id: int, amount: Decimal) -> None:
        self.reserved[key_id] = self.reserved.get(key_id, ZERO) + amount

    def release(self, key_id: int, amount: Decimal) -> None:
        left = self.reserved.get(key_id, ZERO) - amount
        if left > 0:
            self.reserved[key_id] = left
        else:
            self.reserved.pop(key_id, None)


@dataclass(slots=True)
class Candidate:
    """One offer and key to try, ranked. Not frozen: a frozen dataclass's ``__init__`` sets each
    field through ``object.__setattr__``, and a decision builds several on every request."""

    offer: OfferInfo
    key: KeyInfo
    estimated_cost_usd: Decimal  # expected: the key's multiplier and the prompt cache included
    list_cost: Decimal = ZERO  # this request at list price, in the provider's currency
    cache_saving_usd: Decimal = ZERO  # what the expected prompt cache takes off the cost
    cached_tokens: int = 0  # prompt tokens expected to be read from the cache
    in_flight: Decimal = ZERO  # the key's reservations when it was ranked (provider currency)

    @property
    def provider(self):
        return self.offer.provider


# Why a pair is out, from the first test an offer fails to the last a key fails.
KIND, PREFERENCE, CONTEXT, PRICE, NO_KEY, COOLING, BALANCE, UNUSABLE = (
    "kind",
    "preference",
    "context",
    "price",
    "no_key",
    "cooling",
    "balance",
    "unusable",
)


@dataclass(frozen=True)
class Exclusion:
    provider_slug: str
    upstream_model_id: str
    key_name: str
    reason: str
    cause: str = UNUSABLE
    until: float | None = None  # when a cooldown ends (epoch seconds)
    context_length: int | None = None


@dataclass(frozen=True)
class Refusal:
    """What to answer when no pair can serve: the client's mistake (400), every key resting
    after 429s (429 with the first cooldown's end), or the gateway's side (503)."""

    status: int
    code: str
    message: str
    param: str | None = None
    retry_after_s: int | None = None


@dataclass(slots=True)
class Decision:
    model: str
    candidates: list[Candidate]
    excluded: list[Exclusion] = field(default_factory=list)
    # Excluded only by a cooldown that may be lifted, soonest end first: tried when no
    # candidate served (see routing.health).
    last_resort: list[Candidate] = field(default_factory=list)
    refusal: Refusal | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    session: SessionState | None = None


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
    bare = snapshot.bare_ids.get(lowered, set()) if "/" not in lowered else set()
    matches = natives | bare
    if len(matches) == 1:
        return next(iter(matches))
    if matches:
        raise AmbiguousModel(requested, list(matches))
    raise ModelNotFound(requested)


@dataclass(slots=True)
class _Group:
    """Keys of one offer that cost the same for this request."""

    rank: tuple[int, Decimal]
    offer: OfferInfo
    keys: list[KeyInfo]
    list_cost: Decimal
    cost_usd: Decimal
    saving_usd: Decimal = ZERO
    cached_tokens: int = 0
    skip_key_id: int = 0  # the session's key, ranked in a group of its own


def rank_candidates(
    snapshot: Snapshot,
    model: str,
    *,
    board: HealthBoard,
    prompt_tokens: int,
    output_tokens: int,
    kind: str | None = None,
    preferences: ProviderPreferences | None = None,
    session: SessionState | None = None,
    in_flight: InFlight | None = None,
    limit: int | None = None,
    now: float | None = None,
) -> Decision:
    """The candidates for ``model``, cheapest expected cost first: all of them, or the first
    ``limit``. Equal costs come in a random rotation, so keys at the same price share the traffic
    (and their rate limits); a provider named in ``preferences.order`` comes first, in that order.
    """
    now = time.time() if now is None else now
    preferences = preferences or NO_PREFERENCES
    reserved = in_flight.reserved if in_flight is not None else {}
    full = limit is None
    excluded: list[Exclusion] = []
    groups = _groups(
        snapshot, model, prompt_tokens, output_tokens, kind, preferences, session, now, excluded
    )
    groups.sort(key=lambda group: group.rank)
    candidates: list[Candidate] = []
    last_resort: list[tuple[float, Decimal, Candidate]] = []
    cooldowns, marked = board.cooldowns, board.marked
    index = 0
    while index < len(groups) and (full or len(candidates) < limit):
        end = index + 1
        while end < len(groups) and groups[end].rank == groups[index].rank:
            end += 1
        for group, key in _rotation(groups, index, end):
            if key.id == group.skip_key_id:
                continue
            if (
                key.health == OK
                and key.id not in cooldowns
                and key.id not in marked
                and (key.balance is None or key.balance > 0)
            ):
                reason = None  # the common case, without building a reason
            else:
                reason = board.unusable_reason(key, now)
            held = reserved.get(key.id, ZERO)
            if reason is None and key.balance is not None and key.balance - held < group.list_cost:
                if full:
                    excluded.append(_short_balance(key, held, group))
                continue
            candidate = Candidate(
                group.offer,
                key,
                group.cost_usd,
                group.list_cost,
                group.saving_usd,
                group.cached_tokens,
                held,
            )
            if reason is None:
                candidates.append(candidate)
                if not full and len(candidates) >= limit:
                    break
                continue
            if full:
                excluded.append(_key_exclusion(group.offer, key, reason, board, now))
            lifts_at = board.lifts_at(key, now)
            if lifts_at is not None:
                last_resort.append((lifts_at, group.cost_usd, candidate))
        index = end
    if not candidates and not last_resort and not full:
        return rank_candidates(
            snapshot,
            model,
            board=board,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            kind=kind,
            preferences=preferences,
            session=session,
            in_flight=in_flight,
            now=now,
        )
    last_resort.sort(key=lambda item: (item[0], item[1]))
    refusal = None
    if not candidates and not last_resort:
        refusal = _refusal(model, excluded, prompt_tokens, output_tokens, kind)
    return Decision(
        model,
        candidates,
        excluded,
        [candidate for *_, candidate in last_resort],
        refusal,
        prompt_tokens,
        output_tokens,
        session=session,
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


def _rotation(groups: list[_Group], index: int, end: int):
    """The keys of ``groups[index:end]`` (all at one cost), from a random one on."""
    if end - index == 1:
        group = groups[index]
        keys = group.keys
        count = len(keys)
        start = int(random.random() * count)
        for position in range(count):
            yield group, keys[(start + position) % count]
        return
    members = [(group, key) for group in groups[index:end] for key in group.keys]
    count = len(members)
    start = int(random.random() * count)
    for position in range(count):
        yield members[(start + position) % count]


def _groups(
    snapshot: Snapshot,
    model: str,
    prompt_tokens: int,
    output_tokens: int,
    kind: str | None,
    preferences: ProviderPreferences,
    session: SessionState | None,
    now: float,
    excluded: list[Exclusion],
) -> list[_Group]:
    order = {slug: position for position, slug in enumerate(preferences.order)}
    needed = prompt_tokens + output_tokens
    groups: list[_Group] = []
    for offer in snapshot.offers.get(model, []):
        slug = offer.provider.slug
        cause, reason = _offer_exclusion(offer, kind, preferences, needed)
        context = offer.context_length if cause == CONTEXT else None
        key_groups = snapshot.key_groups.get(offer.provider.id)
        if cause is None and not key_groups:
            cause, reason = NO_KEY, "no enabled key for this provider"
        if cause is None:
            try:
                rate = usd_per_unit(offer.prices.currency, snapshot.rates)
            except UnknownCurrency as error:
                cause, reason = PRICE, str(error)
        if cause is not None:
            excluded.append(
                Exclusion(slug, offer.upstream_model_id, "-", reason, cause, context_length=context)
            )
            continue
        prices = offer.prices
        rank = order.get(slug, len(order))
        list_cost = (
            prompt_tokens * prices.input_per_mtok + output_tokens * prices.output_per_mtok
        ) / MILLION
        list_usd = list_cost * rate
        sticky = _sticky_key(session, offer, now, snapshot)
        skip = sticky.id if sticky is not None else 0
        for multiplier, keys in key_groups:
            cost = list_usd * multiplier
            groups.append(_Group((rank, cost), offer, keys, list_cost, cost, skip_key_id=skip))
        if sticky is not None:
            cached = min(session.prompt_tokens, prompt_tokens)
            saved = cached * (prices.input_per_mtok - prices.cached_input_per_mtok) / MILLION
            cached_cost = list_cost - saved
            cost = cached_cost * rate * sticky.multiplier
            saving = saved * rate * sticky.multiplier
            groups.append(_Group((rank, cost), offer, [sticky], cached_cost, cost, saving, cached))
    return groups


def _sticky_key(
    session: SessionState | None, offer: OfferInfo, now: float, snapshot: Snapshot
) -> KeyInfo | None:
    """The key expected to hold this session's prompt cache for ``offer``, if any."""
    if (
        session is None
        or session.offer_id != offer.id
        or offer.prices.cached_input_per_mtok is None
        or offer.prices.cached_input_per_mtok >= offer.prices.input_per_mtok
        or now - session.served_at > offer.provider.prompt_cache_ttl_s
    ):
        return None
    key = snapshot.key_by_id.get(session.key_id)
    return key if key is not None and key.provider_id == offer.provider.id else None


def _offer_exclusion(
    offer: OfferInfo, kind: str | None, preferences: ProviderPreferences, needed_tokens: int
) -> tuple[str | None, str]:
    slug = offer.provider.slug
    if kind is not None and offer.kind != kind:
        return KIND, f"serves {offer.kind}, not {kind}"
    if preferences.only and slug not in preferences.only:
        return PREFERENCE, "provider not in the request's provider.only"
    if slug in preferences.ignore:
        return PREFERENCE, "provider in the request's provider.ignore"
    if offer.context_length is not None and offer.context_length < needed_tokens:
        return CONTEXT, (
            f"context length {offer.context_length} < {needed_tokens} tokens "
            "(estimated prompt + requested output)"
        )
    if offer.prices is None:
        return PRICE, "no price known (set one with manage.py set_price or in the admin)"
    return None, ""


def _short_balance(key: KeyInfo, held: Decimal, group: _Group) -> Exclusion:
    offer = group.offer
    reason = (
        f"balance {key.balance.normalize():f} {offer.prices.currency} minus "
        f"{held.normalize():f} in flight does not cover this request's "
        f"{group.list_cost.normalize():f}"
    )
    return Exclusion(offer.provider.slug, offer.upstream_model_id, key.name, reason, BALANCE)


def _key_exclusion(
    offer: OfferInfo, key: KeyInfo, reason: str, board: HealthBoard, now: float
) -> Exclusion:
    cooldown = board.cooldowns.get(key.id)
    cooling = (
        cooldown is not None
        and cooldown.until > now
        and board.marked.get(key.id, key.health) == "ok"
    )
    return Exclusion(
        offer.provider.slug,
        offer.upstream_model_id,
        key.name,
        reason,
        COOLING if cooling else UNUSABLE,
        cooldown.until if cooling else None,
    )


_STAGES = (KIND, PREFERENCE, CONTEXT, PRICE, NO_KEY, COOLING, BALANCE, UNUSABLE)


def _refusal(
    model: str, excluded: list[Exclusion], prompt_tokens: int, output_tokens: int, kind: str | None
) -> Refusal:
    """The furthest any offer got decides: a client mistake only when no offer got past it."""
    by_cause: dict[str, list[Exclusion]] = defaultdict(list)
    for exclusion in excluded:
        by_cause[exclusion.cause].append(exclusion)
    furthest = max((_STAGES.index(cause) for cause in by_cause), default=-1)
    if furthest == _STAGES.index(KIND):
        other = "embedding" if kind == "chat" else "chat"
        endpoint = "/v1/embeddings" if other == "embedding" else "/v1/chat/completions"
        return Refusal(
            400,
            "wrong_model_kind",
            f"{model!r} is {'an' if other == 'embedding' else 'a'} {other} model: "
            f"call {endpoint} with it, or ask for a {kind} model here.",
            "model",
        )
    if furthest == _STAGES.index(PREFERENCE):
        offered = sorted({e.provider_slug for e in by_cause[PREFERENCE]})
        return Refusal(
            400,
            "no_matching_provider",
            f"The request's provider preferences match no provider of {model!r}; it is offered "
            f"by {', '.join(offered)}. Widen 'provider.only' or 'provider.ignore'.",
            "provider",
        )
    if furthest == _STAGES.index(CONTEXT):
        largest = max(e.context_length for e in by_cause[CONTEXT])
        return Refusal(
            400,
            "context_length_exceeded",
            f"This request needs about {prompt_tokens} prompt + {output_tokens} output tokens, "
            f"more than the largest context of {model!r} ({largest} tokens). Shorten the "
            "messages or lower max_tokens.",
            "messages",
        )
    key_level = [e for e in excluded if e.key_name != "-"]
    if key_level and all(e.cause == COOLING for e in key_level):
        first_end = min(e.until for e in key_level)
        wait_s = max(int(first_end - time.time()) + 1, 1)
        return Refusal(
            429,
            "rate_limited",
            f"Every upstream key for {model!r} is cooling down after rate limits; "
            f"retry in {wait_s} s.",
            retry_after_s=wait_s,
        )
    reasons = sorted({f"{e.provider_slug} {e.key_name}: {e.reason}" for e in excluded})
    detail = "; ".join(reasons[:10]) or "no active offer"
    return Refusal(
        503, "no_available_key", f"No usable upstream key serves {model!r} right now ({detail})."
    )

"""Why the dispatcher would pick what it picks: shared by ``manage.py route`` and the admin."""

from __future__ import annotations

import time
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache

from providers.models import ModelOffer
from routing.dispatcher import (
    Candidate,
    Decision,
    InFlight,
    ProviderPreferences,
    rank_candidates,
    resolve_model,
)
from routing.health import COOLDOWN_KEY, HealthBoard
from routing.sessions import SessionState
from routing.snapshot import Snapshot, build_snapshot

RULES = dict(ModelOffer.IdentityRule.choices)


@dataclass(frozen=True)
class RouteExplanation:
    requested: str
    decision: Decision
    prompt_tokens: int
    output_tokens: int

    def lines(self) -> list[str]:
        decision = self.decision
        needed = self.prompt_tokens + self.output_tokens
        lines = [
            f"Model {self.requested!r} -> {decision.model}",
            f"Estimate: {self.prompt_tokens} prompt tokens, {self.output_tokens} output tokens "
            f"(an offer needs a context of at least {needed})",
        ]
        if decision.session is not None:
            lines.append(
                f"Session: key #{decision.session.key_id} served "
                f"{decision.session.prompt_tokens} prompt tokens "
                f"{max(time.time() - decision.session.served_at, 0):.0f} s ago"
            )
        lines += ["", f"Candidates ({len(decision.candidates)}), in the order they would be tried:"]
        for rank, candidate in enumerate(decision.candidates, start=1):
            lines.append(f"  {rank}. {describe_candidate(candidate)}")
        if not decision.candidates:
            lines.append("  (none)")
        lines += ["", f"Excluded ({len(decision.excluded)}):"]
        for excluded in decision.excluded:
            lines.append(
                f"  - {excluded.provider_slug} key {excluded.key_name} "
                f"model {excluded.upstream_model_id}: {excluded.reason}"
            )
        if not decision.excluded:
            lines.append("  (none)")
        if decision.last_resort:
            lines += ["", "Last resort, tried when no candidate serves (cooldown ending first):"]
            lines += [
                f"  - {c.provider.slug} key {c.key.name} model {c.offer.upstream_model_id}"
                for c in decision.last_resort
            ]
        if decision.refusal is not None:
            refusal = decision.refusal
            lines += ["", f"Answer: {refusal.status} {refusal.code}: {refusal.message}"]
        return lines


def describe_candidate(candidate: Candidate) -> str:
    offer, key, prices = candidate.offer, candidate.key, candidate.offer.prices
    context = f"context {offer.context_length}" if offer.context_length else "context unknown"
    line = (
        f"{offer.provider.slug} key {key.name} ({key.masked}) model {offer.upstream_model_id} "
        f"[{identity_label(offer.identity_rule)}; {context}, fits]: "
        f"{candidate.estimated_cost_usd:.8f} USD expected "
        f"[{prices.input_per_mtok.normalize():f}/{prices.output_per_mtok.normalize():f} "
        f"{prices.currency} per 1M, x{key.multiplier}]"
    )
    if candidate.cached_tokens:
        line += (
            f"; prompt cache: {candidate.cached_tokens} tokens expected cached, saving "
            f"{candidate.cache_saving_usd:.8f} USD"
        )
    if candidate.in_flight:
        line += f"; in flight {candidate.in_flight.normalize():f} {prices.currency}"
    if key.balance is not None:
        line += f"; balance {key.balance.normalize():f} {prices.currency}"
    if offer.provider.native:
        protocols = ", ".join(name for name, _ in offer.provider.native)
        line += f"; speaks {protocols} natively (those requests pass through untranslated)"
    return line


def identity_label(rule: str) -> str:
    return f"id by {RULES.get(rule, rule).lower()}"


def explain_route(
    requested: str,
    *,
    prompt_tokens: int = 1000,
    output_tokens: int | None = None,
    preferences: ProviderPreferences | None = None,
    snapshot: Snapshot | None = None,
    session: SessionState | None = None,
    cached_key: str = "",
    cached_tokens: int = 0,
    in_flight: InFlight | None = None,
) -> RouteExplanation:
    """Rank candidates as the gateway would now (raises ModelNotFound / AmbiguousModel).

    Sessions and requests in flight are a gateway process's own: a command sees neither, but
    ``cached_key`` (a key's name or id) with ``cached_tokens`` shows the ranking as if that key
    had just served this conversation."""
    snapshot = snapshot or build_snapshot()
    output_tokens = output_tokens or settings.KEYAOS_DEFAULT_MAX_TOKENS
    model = resolve_model(snapshot, requested)
    if cached_key:
        session = _session_on(snapshot, model, cached_key, cached_tokens or prompt_tokens)
    decision = rank_candidates(
        snapshot,
        model,
        board=shared_health(snapshot),
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        preferences=preferences,
        session=session,
        in_flight=in_flight,
    )
    return RouteExplanation(requested, decision, prompt_tokens, output_tokens)


def _session_on(snapshot: Snapshot, model: str, key_name: str, tokens: int) -> SessionState:
    for offer in snapshot.offers.get(model, []):
        for key in snapshot.keys.get(offer.provider.id, []):
            if key_name in (key.name, str(key.id)):
                return SessionState(
                    key.id, offer.id, time.time(), tokens, offer.provider.prompt_cache_ttl_s
                )
    raise ValueError(f"No enabled key named {key_name!r} serves {model}.")


def shared_health(snapshot: Snapshot) -> HealthBoard:
    """The cooldowns every gateway process shares through the cache."""
    board = HealthBoard()
    board.adopt(snapshot.keys)
    ids = [key.id for keys in snapshot.keys.values() for key in keys]
    board.merge(cache.get_many([COOLDOWN_KEY.format(i) for i in ids]))
    return board

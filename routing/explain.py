"""Why the dispatcher would pick what it picks: shared by ``manage.py route`` and the admin."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache

from routing.dispatcher import Decision, ProviderPreferences, rank_candidates, resolve_model
from routing.health import COOLDOWN_KEY, HealthBoard
from routing.snapshot import Snapshot, build_snapshot


@dataclass(frozen=True)
class RouteExplanation:
    requested: str
    decision: Decision
    prompt_tokens: int
    output_tokens: int

    def lines(self) -> list[str]:
        decision = self.decision
        lines = [
            f"Model {self.requested!r} -> {decision.model}",
            f"Estimate: {self.prompt_tokens} prompt tokens, {self.output_tokens} output tokens",
            "",
            f"Candidates ({len(decision.candidates)}), in the order they would be tried:",
        ]
        for rank, candidate in enumerate(decision.candidates, start=1):
            prices = candidate.offer.prices
            lines.append(
                f"  {rank}. {candidate.provider.slug} key {candidate.key.name} "
                f"({candidate.key.masked}) model {candidate.offer.upstream_model_id}: "
                f"{candidate.estimated_cost_usd:.8f} USD "
                f"[{prices.input_per_mtok.normalize():f}/{prices.output_per_mtok.normalize():f} "
                f"{prices.currency} per 1M, "
                f"x{candidate.key.multiplier}]"
            )
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
        return lines


def explain_route(
    requested: str,
    *,
    prompt_tokens: int = 1000,
    output_tokens: int | None = None,
    preferences: ProviderPreferences | None = None,
    snapshot: Snapshot | None = None,
) -> RouteExplanation:
    """Rank candidates as the gateway would now (raises ModelNotFound / AmbiguousModel)."""
    snapshot = snapshot or build_snapshot()
    output_tokens = output_tokens or settings.KEYAOS_DEFAULT_MAX_TOKENS
    model = resolve_model(snapshot, requested)
    decision = rank_candidates(
        snapshot,
        model,
        board=shared_health(snapshot),
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        preferences=preferences,
    )
    return RouteExplanation(requested, decision, prompt_tokens, output_tokens)


def shared_health(snapshot: Snapshot) -> HealthBoard:
    """The cooldowns every gateway process shares through the cache."""
    board = HealthBoard()
    board.adopt(snapshot.keys)
    ids = [key.id for keys in snapshot.keys.values() for key in keys]
    board.merge(cache.get_many([COOLDOWN_KEY.format(i) for i in ids]))
    return board

"""One canonical model across providers: its keys, the dispatcher's pick now, its price history."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone

from billing.currency import UnknownCurrency, load_rates, to_usd
from keyaos.admin_format import exact_amount, format_amount, format_usd, usd_pair
from keyaos.dashboard.charts import Chart, step_line_chart
from providers.models import ModelOffer, PriceHistory, UpstreamKey
from routing.dispatcher import AmbiguousModel, ModelNotFound
from routing.explain import RouteExplanation, explain_route
from routing.runtime import runtime


def model_page(request: HttpRequest, site, canonical_id: str) -> HttpResponse:
    """Every offer of ``canonical_id``, the keys behind them, the dispatcher's pick and prices."""
    if not request.user.has_perm("providers.view_modeloffer"):
        raise PermissionDenied
    offers = list(
        ModelOffer.objects.filter(canonical_id=canonical_id)
        .select_related("provider")
        .order_by("-active", "provider__slug")
    )
    rates = load_rates()
    rows = [
        {
            "offer": offer,
            "change_url": reverse("admin:providers_modeloffer_change", args=[offer.pk]),
            "input": exact_amount(offer.input_price_per_mtok, offer.currency),
            "output": exact_amount(offer.output_price_per_mtok, offer.currency),
            "cached_input": exact_amount(offer.cached_input_price_per_mtok, offer.currency),
            "usd": usd_pair(offer, rates),
        }
        for offer in offers
    ]
    context = {
        **site.each_context(request),
        "opts": ModelOffer._meta,
        "title": f"Offers for {canonical_id}",
        "canonical_id": canonical_id,
        "rows": rows,
        "keys": serving_keys(offers),
        "route": route_pick(canonical_id),
        "price_charts": price_history_charts(offers, rates),
    }
    return TemplateResponse(request, "admin/keyaos/model_page.html", context)


@dataclass(frozen=True)
class KeyRow:
    key: UpstreamKey
    url: str
    balance: str
    unusable_reason: str | None


def serving_keys(offers: list[ModelOffer]) -> list[KeyRow]:
    """Every key of the providers with an active offer for the model, usable or not."""
    provider_ids = {offer.provider_id for offer in offers if offer.active}
    keys = list(UpstreamKey.objects.filter(provider_id__in=provider_ids).select_related("provider"))
    now = timezone.now()
    return [
        KeyRow(
            key=key,
            url=reverse("admin:providers_upstreamkey_change", args=[key.pk]),
            balance="unknown"
            if key.balance is None
            else format_amount(key.balance, key.provider.currency),
            unusable_reason=key.unusable_reason(now),
        )
        for key in keys
    ]


@dataclass(frozen=True)
class RoutePick:
    explanation: RouteExplanation | None
    error: str
    candidates: list[dict]
    excluded: list[dict]

    @property
    def text(self) -> str:
        return "\n".join(self.explanation.lines()) if self.explanation else ""


def route_pick(canonical_id: str) -> RoutePick:
    """What ``manage.py route`` says for this model now, as rows for a table."""
    try:
        explanation = explain_route(canonical_id, in_flight=runtime.in_flight)
    except (ModelNotFound, AmbiguousModel) as exc:
        message = str(exc) if isinstance(exc, AmbiguousModel) else "no active offer"
        return RoutePick(None, f"The gateway cannot serve {canonical_id} now: {message}.", [], [])
    decision = explanation.decision
    candidates = [
        {
            "rank": rank,
            "provider": candidate.provider.slug,
            "key": f"{candidate.key.name} ({candidate.key.masked})",
            "native_id": candidate.offer.upstream_model_id,
            "estimated_cost": format_usd(candidate.estimated_cost_usd),
            "multiplier": candidate.key.multiplier,
            "identity": ModelOffer.IdentityRule(candidate.offer.identity_rule).label,
            "fit": _fit(candidate.offer.context_length),
            "cache_saving": format_usd(candidate.cache_saving_usd)
            if candidate.cached_tokens
            else "-",
            "in_flight": f"{candidate.in_flight.normalize():f} {candidate.offer.prices.currency}"
            if candidate.in_flight
            else "-",
        }
        for rank, candidate in enumerate(decision.candidates, start=1)
    ]
    excluded = [
        {
            "provider": item.provider_slug,
            "key": item.key_name,
            "native_id": item.upstream_model_id,
            "reason": item.reason,
        }
        for item in decision.excluded
    ]
    return RoutePick(explanation, "", candidates, excluded)


def _fit(context_length: int | None) -> str:
    return f"fits ({context_length:,} context)" if context_length else "fits (context unknown)"


def price_history_charts(offers: list[ModelOffer], rates: dict[str, Decimal]) -> list[Chart]:
    """Input and output prices per 1M tokens over time, one line per offer, in today's USD."""
    names = {offer.pk: f"{offer.provider.slug} ({offer.upstream_model_id})" for offer in offers}
    currencies = {offer.pk: offer.currency for offer in offers}
    series: dict[str, dict[str, list[tuple[datetime, Decimal]]]] = {
        "input": defaultdict(list),
        "output": defaultdict(list),
    }
    history = PriceHistory.objects.filter(offer_id__in=names).values_list(
        "offer_id", "recorded_at", "input_price_per_mtok", "output_price_per_mtok"
    )
    for offer_id, recorded_at, price_in, price_out in history.order_by("recorded_at"):
        for kind, price in (("input", price_in), ("output", price_out)):
            if price is None:
                continue
            try:
                usd = to_usd(price, currencies[offer_id], rates)
            except UnknownCurrency:
                continue
            series[kind][names[offer_id]].append((recorded_at, usd))
    now = timezone.now()
    return [
        step_line_chart(
            title=f"{kind.capitalize()} price per 1M tokens over time (USD at today's rates)",
            series=dict(sorted(series[kind].items())),
            end=now,
            fmt=format_usd,
            empty_text="No recorded price yet.",
        )
        for kind in ("input", "output")
    ]

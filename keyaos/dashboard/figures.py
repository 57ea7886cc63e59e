"""The figures of the admin index: spend, requests, errors, savings, latency and what needs
attention.

Usage is aggregated by the database in two grouped queries (ledger rows and daily rollups, by day,
provider, model, client key and upstream key), so the page costs the same handful of queries with
ten ledger rows or ten million. Days whose ledger rows were pruned count through their
``DailyUsage`` totals, which hold pruned rows only. Latency comes from a bounded sample of the
latest answered requests.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.urls import reverse
from django.utils import timezone

from billing import spool
from billing.costs import MILLION
from billing.currency import UnknownCurrency, load_rates, to_usd
from billing.models import ApiKey, LedgerEntry
from billing.selectors import usage
from providers.models import ModelOffer, RefreshResult, RefreshRun, UpstreamKey, unusable_reason

WINDOWS = (("Today", 1), ("Last 7 days", 7), ("Last 30 days", 30))
CHART_DAYS = 30
BURN_DAYS = 7
RUNWAY_WARNING_DAYS = Decimal(3)
RUNWAY_MAX_DAYS = 365
NO_PROVIDER = "(no provider)"
TOP_KEYS = 8
LATENCY_HOURS = 24
LATENCY_SAMPLE = 5000
UNPRICED_LISTED = 20


def low_balance_usd() -> Decimal:
    """Below this (in USD), a key's balance needs attention whatever its burn rate."""
    return settings.KEYAOS_LOW_BALANCE_USD


@dataclass(frozen=True)
class UsageGroup:
    """Totals of one (day, provider, requested model, client key, upstream key)."""

    day: date
    provider: str
    model: str
    api_key_id: int | None
    upstream_key_id: int | None
    requests: int
    errors: int
    client_errors: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal
    list_cost_usd: Decimal

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_groups(since: date) -> list[UsageGroup]:
    """Usage from ``since`` on, grouped by day, provider and model."""
    grouped = usage(
        since=since,
        group_by=("day", "provider__slug", "requested_model", "api_key", "upstream_key"),
    )
    return [
        UsageGroup(
            day=day,
            provider=provider or NO_PROVIDER,
            model=model,
            api_key_id=api_key_id,
            upstream_key_id=upstream_key_id,
            requests=totals.requests,
            errors=totals.errors,
            client_errors=totals.client_errors,
            prompt_tokens=totals.prompt_tokens,
            completion_tokens=totals.completion_tokens,
            cost_usd=totals.cost_usd,
            list_cost_usd=totals.list_cost_usd,
        )
        for (day, provider, model, api_key_id, upstream_key_id), totals in grouped.items()
    ]


@dataclass(frozen=True)
class OfferPrices:
    """Active offers' USD prices per 1M tokens by canonical id; every offer's native id (per
    provider and overall) to its canonical id; and the active offers without a price."""

    by_model: dict[str, list[tuple[Decimal, Decimal]]]
    native: dict[str, str]
    canonical_ids: set[str] = field(default_factory=set)
    native_by_provider: dict[tuple[str, str], str] = field(default_factory=dict)
    unpriced: dict[str, list[str]] = field(default_factory=dict)

    def canonical(self, model: str, provider: str | None = None) -> str | None:
        """The canonical model a requested id was served as; None when no offer knows it."""
        if model in self.canonical_ids:
            return model
        native = model.strip().lower()
        return self.native_by_provider.get((provider or "", native)) or self.native.get(native)

    def most_expensive_cost_usd(self, model: str, prompt: int, completion: int) -> Decimal | None:
        prices = self.by_model.get(model) or self.by_model.get(
            self.native.get(model.strip().lower(), "")
        )
        if not prices:
            return None
        return max((prompt * i + completion * o) / MILLION for i, o in prices)


def active_offer_prices(rates: dict[str, Decimal]) -> OfferPrices:
    rows = ModelOffer.objects.values_list(
        "canonical_id",
        "upstream_model_id",
        "input_price_per_mtok",
        "output_price_per_mtok",
        "provider__currency",
        "provider__slug",
        "active",
    ).order_by("provider__slug", "upstream_model_id")
    prices = OfferPrices({}, {})
    by_model: dict[str, list[tuple[Decimal, Decimal]]] = defaultdict(list)
    for canonical, upstream, price_in, price_out, currency, slug, active in rows:
        prices.canonical_ids.add(canonical)
        prices.native_by_provider[(slug, upstream.lower())] = canonical
        prices.native.setdefault(upstream.lower(), canonical)
        if not active:
            continue
        if price_in is None or price_out is None:
            prices.unpriced.setdefault(slug, []).append(upstream)
            continue
        try:
            by_model[canonical].append(
                (to_usd(price_in, currency, rates), to_usd(price_out, currency, rates))
            )
        except UnknownCurrency:
            continue
    prices.by_model.update(by_model)
    return prices


@dataclass
class Window:
    label: str
    days: int
    spend_usd: Decimal = Decimal(0)
    list_usd: Decimal = Decimal(0)
    requests: int = 0
    errors: int = 0
    client_errors: int = 0
    max_offer_usd: Decimal = Decimal(0)
    max_offer_cost_usd: Decimal = Decimal(0)
    unpriced_models: set[str] = field(default_factory=set)

    @property
    def upstream_error_rate(self) -> Decimal | None:
        """Requests that failed for the upstreams' reasons, in percent."""
        if not self.requests:
            return None
        return Decimal((self.errors - self.client_errors) * 100) / self.requests

    @property
    def client_error_rate(self) -> Decimal | None:
        """Requests refused for the client's reasons (bad input, limits) or left, in percent."""
        if not self.requests:
            return None
        return Decimal(self.client_errors * 100) / self.requests

    @property
    def savings_vs_list_usd(self) -> Decimal:
        return self.list_usd - self.spend_usd

    @property
    def savings_vs_max_usd(self) -> Decimal:
        return self.max_offer_usd - self.max_offer_cost_usd


def windows(groups: Iterable[UsageGroup], today: date, prices: OfferPrices) -> list[Window]:
    result = []
    groups = list(groups)
    for label, days in WINDOWS:
        window = Window(label, days)
        first = today - timedelta(days=days - 1)
        per_model: dict[str, list] = defaultdict(lambda: [0, 0, Decimal(0)])
        for group in groups:
            if not first <= group.day <= today:
                continue
            window.spend_usd += group.cost_usd
            window.list_usd += group.list_cost_usd
            window.requests += group.requests
            window.errors += group.errors
            window.client_errors += group.client_errors
            totals = per_model[group.model]
            totals[0] += group.prompt_tokens
            totals[1] += group.completion_tokens
            totals[2] += group.cost_usd
        for model, (prompt, completion, cost) in per_model.items():
            most = prices.most_expensive_cost_usd(model, prompt, completion)
            if most is None:
                window.unpriced_models.add(model)
                continue
            window.max_offer_usd += most
            window.max_offer_cost_usd += cost
        result.append(window)
    return result


def spend_by_provider(groups: Iterable[UsageGroup], days: list[date]) -> dict[str, list[Decimal]]:
    index = {day: i for i, day in enumerate(days)}
    series: dict[str, list[Decimal]] = {}
    for group in groups:
        if group.day not in index or not group.cost_usd:
            continue
        values = series.setdefault(group.provider, [Decimal(0)] * len(days))
        values[index[group.day]] += group.cost_usd
    return dict(sorted(series.items(), key=lambda item: -sum(item[1])))


@dataclass(frozen=True)
class ModelUsage:
    model: str
    requests: int
    tokens: int
    cost_usd: Decimal


def usage_by_model(
    groups: Iterable[UsageGroup], since: date, prices: OfferPrices, limit: int = 10
) -> list[ModelUsage]:
    """Requests served per canonical model: ``deepseek-chat`` and ``deepseek/deepseek-chat`` are
    one model, and a request no provider served (``gpt-99``) is none."""
    totals: dict[str, list] = defaultdict(lambda: [0, 0, Decimal(0)])
    for group in groups:
        if group.day < since or group.provider == NO_PROVIDER:
            continue
        model = prices.canonical(group.model, group.provider) or group.model
        row = totals[model]
        row[0] += group.requests
        row[1] += group.tokens
        row[2] += group.cost_usd
    ranked = sorted(totals.items(), key=lambda item: (-item[1][0], -item[1][1], item[0]))
    return [ModelUsage(model, *values) for model, values in ranked[:limit]]


@dataclass(frozen=True)
class KeySpend:
    """A client or upstream key's 30 days: its name, page and what went through it."""

    name: str
    url: str
    requests: int
    cost_usd: Decimal


def top_keys(groups: Iterable[UsageGroup], field_name: str) -> list[tuple[int, int, Decimal]]:
    """The ``TOP_KEYS`` keys (``api_key_id`` or ``upstream_key_id``) that spent most: id,
    requests, cost in USD."""
    totals: dict[int, list] = defaultdict(lambda: [0, Decimal(0)])
    for group in groups:
        key_id = getattr(group, field_name)
        if key_id is not None:
            totals[key_id][0] += group.requests
            totals[key_id][1] += group.cost_usd
    ranked = sorted(totals.items(), key=lambda item: (-item[1][1], -item[1][0], item[0]))
    return [(key_id, requests, cost) for key_id, (requests, cost) in ranked[:TOP_KEYS]]


def key_spend(
    ranked: list[tuple[int, int, Decimal]], names: dict[int, tuple[str, str]]
) -> list[KeySpend]:
    return [
        KeySpend(*names.get(key_id, (f"deleted key #{key_id}", "")), requests, cost)
        for key_id, requests, cost in ranked
    ]


@dataclass(frozen=True)
class Latency:
    provider: str
    requests: int
    latency_p50_ms: int
    latency_p95_ms: int
    ttfb_p50_ms: int | None
    ttfb_p95_ms: int | None


def percentile(values: list[int], share: float) -> int:
    """Nearest-rank percentile of sorted ``values``."""
    rank = max(1, round(share * len(values) + 0.5 - 1e-9))
    return values[min(rank, len(values)) - 1]


def latency_by_provider(now: datetime) -> list[Latency]:
    """p50/p95 latency and time to first byte per provider over the latest answered requests of
    the last day (at most ``LATENCY_SAMPLE`` rows: one bounded query)."""
    rows = (
        LedgerEntry.objects.filter(
            created_at__gte=now - timedelta(hours=LATENCY_HOURS),
            outcome=LedgerEntry.Outcome.OK,
            provider__isnull=False,
        )
        .order_by("-created_at")
        .values_list("provider__slug", "latency_ms", "ttfb_ms")[:LATENCY_SAMPLE]
    )
    latency: dict[str, list[int]] = defaultdict(list)
    ttfb: dict[str, list[int]] = defaultdict(list)
    for slug, latency_ms, ttfb_ms in rows:
        latency[slug].append(latency_ms)
        if ttfb_ms is not None:
            ttfb[slug].append(ttfb_ms)
    result = []
    for slug in sorted(latency):
        total, first = sorted(latency[slug]), sorted(ttfb[slug])
        result.append(
            Latency(
                provider=slug,
                requests=len(total),
                latency_p50_ms=percentile(total, 0.5),
                latency_p95_ms=percentile(total, 0.95),
                ttfb_p50_ms=percentile(first, 0.5) if first else None,
                ttfb_p95_ms=percentile(first, 0.95) if first else None,
            )
        )
    return result


@dataclass
class KeyStatus:
    key: UpstreamKey
    balance_usd: Decimal | None
    burn_usd_per_day: Decimal
    reasons: list[str] = field(default_factory=list)

    @property
    def runway_days(self) -> Decimal | None:
        if self.balance_usd is None or self.burn_usd_per_day <= 0:
            return None
        return max(self.balance_usd, Decimal(0)) / self.burn_usd_per_day

    @property
    def runway_text(self) -> str:
        runway = self.runway_days
        if runway is None:
            return "no spend in 7 days" if self.balance_usd is not None else "balance unknown"
        if runway < 1:
            return f"≈ {runway * 24:.0f} hours"
        if runway > RUNWAY_MAX_DAYS:
            return "over a year"
        return f"≈ {runway:.1f} days" if runway < 10 else f"≈ {runway:,.0f} days"


def key_statuses(
    keys: list[UpstreamKey],
    groups: Iterable[UsageGroup],
    now: datetime,
    today: date,
    rates: dict[str, Decimal],
) -> list[KeyStatus]:
    """Every enabled key with its balance in USD, 7-day burn rate and what needs attention."""
    since = today - timedelta(days=BURN_DAYS - 1)
    burn: dict[int, Decimal] = defaultdict(Decimal)
    for group in groups:
        if group.day >= since and group.upstream_key_id is not None:
            burn[group.upstream_key_id] += group.list_cost_usd
    statuses = []
    for key in keys:
        if not (key.enabled and key.provider.enabled):
            continue
        try:
            balance_usd = (
                None if key.balance is None else to_usd(key.balance, key.provider.currency, rates)
            )
        except UnknownCurrency:
            balance_usd = None
        status = KeyStatus(key, balance_usd, burn.get(key.pk, Decimal(0)) / BURN_DAYS)
        status.reasons = attention_reasons(status, now)
        statuses.append(status)
    return statuses


def attention_reasons(status: KeyStatus, now: datetime) -> list[str]:
    key = status.key
    reasons = []
    unusable = unusable_reason(
        health=key.health,
        last_error=key.last_error,
        cooldown_until=key.cooldown_until,
        now=now,
    )
    if unusable is not None:
        reasons.append(unusable)
    low = low_balance_usd()
    if status.balance_usd is not None and status.balance_usd < low:
        reasons.append(f"balance below ${low:.2f}")
    runway = status.runway_days
    if runway is not None and runway < RUNWAY_WARNING_DAYS:
        reasons.append(f"runs out in {status.runway_text} at the 7-day burn rate")
    return reasons


@dataclass(frozen=True)
class LastRefresh:
    run: RefreshRun
    errors: list[RefreshResult]


def last_refresh() -> LastRefresh | None:
    run = RefreshRun.objects.order_by("-started_at").first()
    if run is None:
        return None
    return LastRefresh(run, list(run.results.exclude(error="").order_by("provider_slug")))


@dataclass
class Dashboard:
    now: datetime
    windows: list[Window]
    days: list[date]
    spend_series: dict[str, list[Decimal]]
    models: list[ModelUsage]
    keys: list[KeyStatus]
    refresh: LastRefresh | None
    rates: dict[str, Decimal]
    client_key_spend: list[KeySpend] = field(default_factory=list)
    upstream_key_spend: list[KeySpend] = field(default_factory=list)
    latency: list[Latency] = field(default_factory=list)
    unpriced: dict[str, list[str]] = field(default_factory=dict)
    backlog: spool.LedgerBacklog | None = None

    @property
    def keys_needing_attention(self) -> list[KeyStatus]:
        return [status for status in self.keys if status.reasons]

    @property
    def keys_with_balance(self) -> list[KeyStatus]:
        return [status for status in self.keys if status.balance_usd is not None]


def build_dashboard(now: datetime | None = None) -> Dashboard:
    now = now or timezone.now()
    today = timezone.localdate(now)
    days = [today - timedelta(days=n) for n in range(CHART_DAYS - 1, -1, -1)]
    rates = load_rates()
    groups = usage_groups(days[0])
    prices = active_offer_prices(rates)
    keys = list(UpstreamKey.objects.select_related("provider"))
    upstream_names = {
        key.pk: (str(key), reverse("admin:providers_upstreamkey_change", args=[key.pk]))
        for key in keys
    }
    top_clients = top_keys(groups, "api_key_id")
    client_names = {
        key.pk: (key.name, reverse("admin:billing_apikey_change", args=[key.pk]))
        for key in ApiKey.objects.filter(pk__in=[key_id for key_id, _, _ in top_clients])
    }
    return Dashboard(
        now=now,
        windows=windows(groups, today, prices),
        days=days,
        spend_series=spend_by_provider(groups, days),
        models=usage_by_model(groups, days[0], prices),
        keys=key_statuses(keys, groups, now, today, rates),
        refresh=last_refresh(),
        rates=rates,
        client_key_spend=key_spend(top_clients, client_names),
        upstream_key_spend=key_spend(top_keys(groups, "upstream_key_id"), upstream_names),
        latency=latency_by_provider(now),
        unpriced={slug: ids[:UNPRICED_LISTED] for slug, ids in prices.unpriced.items()},
        backlog=spool.ledger_backlog(),
    )

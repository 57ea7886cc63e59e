"""The figures of the admin index: spend, requests, errors, savings and keys needing attention.

Each figure is aggregated by the database in a few grouped queries (by day, provider and model),
so the page costs the same handful of queries with ten ledger rows or ten million. Days whose
ledger rows were pruned count through their ``DailyUsage`` totals, which hold pruned rows only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.utils import timezone

from billing.costs import MILLION
from billing.currency import UnknownCurrency, load_rates, to_usd
from billing.selectors import usage
from providers.models import ModelOffer, RefreshResult, RefreshRun, UpstreamKey, unusable_reason

WINDOWS = (("Today", 1), ("Last 7 days", 7), ("Last 30 days", 30))
CHART_DAYS = 30
BURN_DAYS = 7
RUNWAY_WARNING_DAYS = Decimal(3)
NO_PROVIDER = "(no provider)"


def low_balance_usd() -> Decimal:
    """Below this (in USD), a key's balance needs attention whatever its burn rate."""
    return settings.KEYAOS_LOW_BALANCE_USD


@dataclass(frozen=True)
class UsageGroup:
    """Totals of one (day, provider, requested model): a ledger group or a daily rollup."""

    day: date
    provider: str
    model: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal
    list_cost_usd: Decimal

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_groups(since: date) -> list[UsageGroup]:
    """Usage from ``since`` on, grouped by day, provider and model."""
    grouped = usage(since=since, group_by=("day", "provider__slug", "requested_model"))
    return [
        UsageGroup(
            day=day,
            provider=provider or NO_PROVIDER,
            model=model,
            requests=totals.requests,
            errors=totals.errors,
            prompt_tokens=totals.prompt_tokens,
            completion_tokens=totals.completion_tokens,
            cost_usd=totals.cost_usd,
            list_cost_usd=totals.list_cost_usd,
        )
        for (day, provider, model), totals in grouped.items()
    ]


@dataclass(frozen=True)
class OfferPrices:
    """Active offers' USD prices per 1M tokens, by canonical id and by native id."""

    by_model: dict[str, list[tuple[Decimal, Decimal]]]
    native: dict[str, str]

    def most_expensive_cost_usd(self, model: str, prompt: int, completion: int) -> Decimal | None:
        prices = self.by_model.get(model) or self.by_model.get(
            self.native.get(model.strip().lower(), "")
        )
        if not prices:
            return None
        return max((prompt * i + completion * o) / MILLION for i, o in prices)


def active_offer_prices(rates: dict[str, Decimal]) -> OfferPrices:
    rows = ModelOffer.objects.filter(
        active=True,
        input_price_per_mtok__isnull=False,
        output_price_per_mtok__isnull=False,
    ).values_list(
        "canonical_id",
        "upstream_model_id",
        "input_price_per_mtok",
        "output_price_per_mtok",
        "provider__currency",
    )
    by_model: dict[str, list[tuple[Decimal, Decimal]]] = defaultdict(list)
    native: dict[str, str] = {}
    for canonical, upstream, price_in, price_out, currency in rows:
        try:
            by_model[canonical].append(
                (to_usd(price_in, currency, rates), to_usd(price_out, currency, rates))
            )
        except UnknownCurrency:
            continue
        native.setdefault(upstream.lower(), canonical)
    return OfferPrices(dict(by_model), native)


@dataclass
class Window:
    label: str
    days: int
    spend_usd: Decimal = Decimal(0)
    list_usd: Decimal = Decimal(0)
    requests: int = 0
    errors: int = 0
    max_offer_usd: Decimal = Decimal(0)
    max_offer_cost_usd: Decimal = Decimal(0)
    unpriced_models: set[str] = field(default_factory=set)

    @property
    def error_rate(self) -> Decimal | None:
        if not self.requests:
            return None
        return Decimal(self.errors * 100) / self.requests

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


def usage_by_model(groups: Iterable[UsageGroup], since: date, limit: int = 10) -> list[ModelUsage]:
    totals: dict[str, list] = defaultdict(lambda: [0, 0, Decimal(0)])
    for group in groups:
        if group.day >= since:
            row = totals[group.model]
            row[0] += group.requests
            row[1] += group.tokens
            row[2] += group.cost_usd
    ranked = sorted(totals.items(), key=lambda item: (-item[1][0], -item[1][1], item[0]))
    return [ModelUsage(model, *values) for model, values in ranked[:limit]]


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
        return f"≈ {runway:.1f} days" if runway < 10 else f"≈ {runway:,.0f} days"


def key_statuses(now: datetime, today: date, rates: dict[str, Decimal]) -> list[KeyStatus]:
    """Every enabled key with its balance in USD, 7-day burn rate and what needs attention."""
    since = today - timedelta(days=BURN_DAYS - 1)
    burn = {
        key_id: totals.list_cost_usd
        for (key_id,), totals in usage(
            since=since, group_by=("upstream_key",), upstream_key__isnull=False
        ).items()
    }
    keys = UpstreamKey.objects.filter(enabled=True, provider__enabled=True).select_related(
        "provider"
    )
    statuses = []
    for key in keys:
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
    return Dashboard(
        now=now,
        windows=windows(groups, today, prices),
        days=days,
        spend_series=spend_by_provider(groups, days),
        models=usage_by_model(groups, days[0]),
        keys=key_statuses(now, today, rates),
        refresh=last_refresh(),
        rates=rates,
    )

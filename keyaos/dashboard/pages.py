"""The admin index as a dashboard: figures and charts put into the template's context."""

from __future__ import annotations

from decimal import Decimal

from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone

from keyaos.admin_format import format_amount, format_usd
from keyaos.dashboard.charts import (
    BarRow,
    Chart,
    RunwayRow,
    horizontal_bar_chart,
    runway_chart,
    stacked_bar_chart,
)
from keyaos.dashboard.figures import (
    LATENCY_HOURS,
    LATENCY_SAMPLE,
    Dashboard,
    KeySpend,
    build_dashboard,
    low_balance_usd,
)


def spend_chart(dashboard: Dashboard) -> Chart:
    return stacked_bar_chart(
        title="Spend per day by provider, last 30 days (USD)",
        days=dashboard.days,
        series=dashboard.spend_series,
        fmt=format_usd,
        empty_text="No spend in the last 30 days.",
    )


def models_chart(dashboard: Dashboard) -> Chart:
    return horizontal_bar_chart(
        title="Requests and spend per served model, last 30 days (top 10 by requests)",
        rows=[BarRow(m.model, (m.requests, m.cost_usd)) for m in dashboard.models],
        columns=["Requests", "Spend (USD)"],
        fmts=[lambda v: f"{v:,}", format_usd],
        empty_text="No request was served in the last 30 days.",
    )


def balance_chart(dashboard: Dashboard) -> Chart:
    rows = []
    for status in sorted(dashboard.keys_with_balance, key=lambda s: -s.balance_usd):
        key = status.key
        balance = format_amount(key.balance, key.provider.currency)
        if key.provider.currency != "USD":
            balance += f" ({format_usd(status.balance_usd)})"
        runway = status.runway_days
        rows.append(
            RunwayRow(
                label=str(key),
                balance_usd=max(status.balance_usd, Decimal(0)),
                balance_text=balance,
                runway_text=status.runway_text,
                warn=bool(status.reasons) or (runway is not None and runway < 3),
            )
        )
    return runway_chart(
        title="Upstream key balances and expected runway at the 7-day burn rate",
        rows=rows,
        empty_text="No key has a known balance.",
    )


def index_context(request: HttpRequest) -> dict:
    dashboard = build_dashboard()
    refresh = dashboard.refresh
    return {
        "dashboard": dashboard,
        "time_zone": timezone.get_current_timezone_name(),
        "low_balance_usd": format_usd(low_balance_usd()),
        "figures": [
            {
                "window": window,
                "spend": format_usd(window.spend_usd),
                "list_savings": format_usd(window.savings_vs_list_usd),
                "max_savings": format_usd(window.savings_vs_max_usd),
                "upstream_errors": percent(window.upstream_error_rate),
                "client_errors": percent(window.client_error_rate),
            }
            for window in dashboard.windows
        ],
        "charts": [spend_chart(dashboard), models_chart(dashboard), balance_chart(dashboard)],
        "refresh_url": refresh
        and reverse("admin:providers_refreshrun_change", args=[refresh.run.pk]),
        "attention": [
            {
                "status": status,
                "url": reverse("admin:providers_upstreamkey_change", args=[status.key.pk]),
            }
            for status in dashboard.keys_needing_attention
        ],
        "unpriced": [
            {
                "provider": slug,
                "models": models,
                "url": reverse("admin:providers_modeloffer_changelist")
                + f"?provider__slug={slug}&priced=no",
            }
            for slug, models in sorted(dashboard.unpriced.items())
        ],
        "client_key_spend": key_rows(dashboard.client_key_spend),
        "upstream_key_spend": key_rows(dashboard.upstream_key_spend),
        "latency": [
            {
                "provider": row.provider,
                "requests": row.requests,
                "latency": f"{row.latency_p50_ms:,} / {row.latency_p95_ms:,}",
                "ttfb": "-"
                if row.ttfb_p50_ms is None
                else f"{row.ttfb_p50_ms:,} / {row.ttfb_p95_ms:,}",
            }
            for row in dashboard.latency
        ],
        "latency_hours": LATENCY_HOURS,
        "latency_sample": LATENCY_SAMPLE,
    }


def percent(value: Decimal | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def key_rows(rows: list[KeySpend]) -> list[dict]:
    return [
        {
            "name": row.name,
            "url": row.url,
            "requests": row.requests,
            "spend": format_usd(row.cost_usd),
        }
        for row in rows
    ]

"""The dashboard answers an operator's questions at a glance: which models are served, whose
fault the errors are, who spends, how fast each provider answers, how long the money lasts."""

from __future__ import annotations

from decimal import Decimal
from functools import partial

import pytest
from django.urls import reverse
from django.utils import timezone

from billing.models import ApiKey, LedgerEntry
from keyaos.dashboard.figures import KeyStatus, percentile
from tests.factories import make_key, make_offer, make_provider
from tests.test_dashboard import figure, ledger_row

pytestmark = pytest.mark.django_db
DEEPSEEK = "deepseek/deepseek-chat"


@pytest.fixture
def traffic():
    deepseek = make_provider("deepseek", "http://127.0.0.1:9/v1")
    openrouter = make_provider("openrouter", "http://127.0.0.1:9/api/v1")
    make_offer(deepseek, "deepseek-chat", canonical_id=DEEPSEEK, input="0.3", output="0.5")
    make_offer(openrouter, DEEPSEEK, input="0.3", output="0.5")
    ds_key = make_key(deepseek, "sk-ds-00000000000000001", label="main", balance=Decimal("5"))
    or_key = make_key(openrouter, "sk-or-00000000000000002", label="team")
    laptop, _ = ApiKey.create_key(name="laptop")
    ci, _ = ApiKey.create_key(name="ci")
    now = timezone.now()
    from_laptop_via_deepseek = partial(
        ledger_row, deepseek, ds_key, "deepseek-chat", now, api_key=laptop
    )
    from_ci_via_openrouter = partial(ledger_row, openrouter, or_key, DEEPSEEK, now, api_key=ci)
    rows = [
        from_laptop_via_deepseek(cost_usd="0.40", latency_ms=100, ttfb_ms=40),
        from_laptop_via_deepseek(cost_usd="0.40", latency_ms=300, ttfb_ms=60),
        from_ci_via_openrouter(cost_usd="0.10", latency_ms=900, ttfb_ms=None),
        from_ci_via_openrouter(
            outcome=LedgerEntry.Outcome.UPSTREAM_ERROR, status_code=502, latency_ms=5
        ),
        ledger_row(
            None,
            None,
            "gpt-99",
            now,
            api_key=ci,
            outcome=LedgerEntry.Outcome.CLIENT_ERROR,
            status_code=404,
        ),
    ]
    LedgerEntry.objects.bulk_create(rows)
    return {"laptop": laptop, "ds_key": ds_key}


def test_requests_are_counted_per_served_canonical_model(admin_client, traffic):
    models = admin_client.get(reverse("admin:index")).context["charts"][1]
    assert models.rows == [[DEEPSEEK, "4", "$0.90"]]  # gpt-99 was never served


def test_the_error_rate_separates_upstream_failures_from_client_errors(admin_client, traffic):
    html = admin_client.get(reverse("admin:index")).content.decode()
    assert figure(html, "errors-1") == "20.0%"
    assert figure(html, "client-errors-1") == "20.0%"


def test_spend_per_client_key_and_upstream_key_link_to_their_pages(admin_client, traffic):
    response = admin_client.get(reverse("admin:index"))
    clients = response.context["client_key_spend"]
    assert [(row["name"], row["requests"], row["spend"]) for row in clients] == [
        ("laptop", 2, "$0.80"),
        ("ci", 3, "$0.10"),
    ]
    assert clients[0]["url"] == reverse("admin:billing_apikey_change", args=[traffic["laptop"].pk])
    upstream = response.context["upstream_key_spend"]
    assert upstream[0]["name"] == "deepseek:main"
    html = response.content.decode()
    assert reverse("admin:providers_upstreamkey_change", args=[traffic["ds_key"].pk]) in html


def test_latency_and_first_byte_per_provider_come_from_the_ledger(admin_client, traffic):
    latency = admin_client.get(reverse("admin:index")).context["latency"]
    assert latency == [
        {"provider": "deepseek", "requests": 2, "latency": "100 / 300", "ttfb": "40 / 60"},
        {"provider": "openrouter", "requests": 1, "latency": "900 / 900", "ttfb": "-"},
    ]


def test_percentiles_are_nearest_rank():
    values = list(range(1, 101))
    assert (percentile(values, 0.5), percentile(values, 0.95)) == (50, 95)
    assert percentile([7], 0.95) == 7


@pytest.mark.parametrize(
    ("balance", "burn", "text"),
    [
        ("10", "1", "≈ 10 days"),
        ("364", "1", "≈ 364 days"),
        ("366", "1", "over a year"),
        ("829033", "1", "over a year"),
        ("0.5", "1", "≈ 12 hours"),
    ],
)
def test_runways_read_in_days_up_to_a_year(balance, burn, text):
    status = KeyStatus(key=None, balance_usd=Decimal(balance), burn_usd_per_day=Decimal(burn))
    assert status.runway_text == text


def test_the_task_queue_is_not_in_the_dashboards_lists(admin_client, traffic):
    html = admin_client.get(reverse("admin:index")).content.decode()
    assert "Django Q" not in html and ">Tasks</a>" in html


def test_the_ledger_writers_backlog_and_dead_letters_show_when_the_spool_reports_them(
    admin_client, traffic, monkeypatch
):
    from billing import spool

    backlog = spool.LedgerBacklog(12, 3.4, 2, "/var/spool/keyaos")
    monkeypatch.setattr(spool, "ledger_backlog", lambda: backlog)
    html = admin_client.get(reverse("admin:index")).content.decode()
    assert "12 records wait in the spool, the oldest for 3 s." in html
    assert "2 records the database refused" in html

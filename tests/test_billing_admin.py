"""The ledger in the admin: filters, totals, CSV export, constant queries; spend on key pages."""

from __future__ import annotations

import csv
import html
import io
import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from billing.models import ApiKey, Attempt, DailyUsage, LedgerEntry
from providers.models import BalanceReading
from tests.factories import make_key, make_provider

pytestmark = pytest.mark.django_db

SECRET = "sk-or-v1-" + "q" * 36 + "9z9z"


@pytest.fixture
def world():
    openrouter = make_provider("openrouter", "http://127.0.0.1:9/api/v1")
    deepseek = make_provider("deepseek", "http://127.0.0.1:9/deepseek")
    or_key = make_key(openrouter, SECRET, label="main")
    ds_key = make_key(deepseek, "sk-" + "d" * 32, label="cny")
    api_key, _ = ApiKey.create_key(name="ci")
    return {
        "openrouter": openrouter,
        "deepseek": deepseek,
        "or_key": or_key,
        "ds_key": ds_key,
    }, api_key


def add_entries(count: int, *, provider, key, api_key, model="openai/gpt-4o-mini", **fields):
    start = LedgerEntry.objects.count()
    values = {
        "endpoint": "chat/completions",
        "outcome": "ok",
        "status_code": 200,
        "usage_source": "reported",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost_usd": Decimal("0.000009"),
        "list_cost_usd": Decimal("0.00001"),
        **fields,
    }
    return LedgerEntry.objects.bulk_create(
        LedgerEntry(
            request_id=f"req_{start + number}",
            provider=provider,
            upstream_key=key,
            api_key=api_key,
            requested_model=model,
            **values,
        )
        for number in range(count)
    )


def changelist(admin_client, **params):
    return admin_client.get(reverse("admin:billing_ledgerentry_changelist"), params)


def test_totals_cover_the_filtered_rows_only(admin_client, world):
    keys, api_key = world
    add_entries(3, provider=keys["openrouter"], key=keys["or_key"], api_key=api_key)
    add_entries(
        2,
        provider=keys["deepseek"],
        key=keys["ds_key"],
        api_key=api_key,
        model="deepseek-chat",
        cost_usd=Decimal("1.5"),
        list_cost_usd=Decimal("2"),
    )

    response = changelist(admin_client, provider__id__exact=keys["openrouter"].pk)

    assert response.status_code == 200
    assert response.context_data["totals"] == {
        "requests": 3,
        "tokens": 45,
        "cost_usd": "0.000027",
        "list_cost_usd": "0.00003",
        "savings_usd": "0.000003",
    }
    everything = changelist(admin_client).context_data["totals"]
    assert (everything["requests"], everything["cost_usd"], everything["savings_usd"]) == (
        5,
        "3.000027",
        "1.000003",
    )
    by_model = changelist(admin_client, requested_model="deepseek-chat").context_data["totals"]
    assert by_model["requests"] == 2


def test_the_model_filter_lists_the_distinct_models(admin_client, world):
    keys, api_key = world
    add_entries(3, provider=keys["openrouter"], key=keys["or_key"], api_key=api_key)
    add_entries(1, provider=keys["deepseek"], key=keys["ds_key"], api_key=api_key, model="m2")

    response = changelist(admin_client)

    content = response.content.decode()
    assert "?requested_model=m2" in content
    assert "?requested_model=openai%2Fgpt-4o-mini" in content
    assert 'id="total-requests">4<' in content


def test_the_csv_export_has_the_filtered_rows_and_no_secret(admin_client, world):
    keys, api_key = world
    add_entries(3, provider=keys["openrouter"], key=keys["or_key"], api_key=api_key)
    add_entries(2, provider=keys["deepseek"], key=keys["ds_key"], api_key=api_key, model="m2")
    export = reverse("admin:billing_ledgerentry_export")
    assert export in changelist(admin_client).content.decode()

    response = admin_client.get(export, {"requested_model": "m2"})

    assert response.status_code == 200
    assert response["Content-Type"] == "text/csv"
    body = b"".join(response.streaming_content).decode()
    rows = list(csv.DictReader(io.StringIO(body)))
    assert len(rows) == 2
    assert {row["requested_model"] for row in rows} == {"m2"}
    assert rows[0]["provider"] == "deepseek" and rows[0]["upstream_key"] == "cny"
    assert rows[0]["client_key"] == "ci" and rows[0]["cost_usd"] == "0.000009000000"
    assert SECRET not in body and api_key.key_hash not in body


def test_the_ledger_list_runs_the_same_number_of_queries_for_many_rows(
    admin_client, world, django_assert_max_num_queries
):
    keys, api_key = world
    add_entries(3, provider=keys["openrouter"], key=keys["or_key"], api_key=api_key)
    url = reverse("admin:billing_ledgerentry_changelist")
    with CaptureQueriesContext(connection) as few:
        assert admin_client.get(url).status_code == 200

    add_entries(300, provider=keys["deepseek"], key=keys["ds_key"], api_key=api_key, model="m2")
    with django_assert_max_num_queries(len(few)):
        assert admin_client.get(url).status_code == 200


def test_a_ledger_row_shows_its_attempts_and_cannot_be_edited(admin_client, world):
    keys, api_key = world
    [entry] = add_entries(1, provider=keys["openrouter"], key=keys["or_key"], api_key=api_key)
    Attempt.objects.create(
        entry=entry,
        number=1,
        provider=keys["openrouter"],
        upstream_key=keys["or_key"],
        upstream_model="openai/gpt-4o-mini",
        status_code=429,
        failure="rate_limited",
        error="slow down",
    )

    response = admin_client.get(reverse("admin:billing_ledgerentry_change", args=[entry.pk]))

    assert response.status_code == 200
    content = response.content.decode()
    assert "slow down" in content and SECRET not in content
    assert not response.context["has_change_permission"]
    assert admin_client.get(reverse("admin:billing_ledgerentry_add")).status_code == 403


def test_a_client_key_page_shows_its_spend_and_budget(admin_client, world):
    keys, api_key = world
    ApiKey.objects.filter(pk=api_key.pk).update(
        budget_usd=Decimal("5"),
        spent_usd=Decimal("1.25"),
        period_spent_usd=Decimal("1.25"),
    )
    add_entries(4, provider=keys["openrouter"], key=keys["or_key"], api_key=api_key)
    DailyUsage.objects.create(
        day=timezone.now().date() - timedelta(days=3),
        api_key=api_key,
        requested_model="m",
        requests=6,
        prompt_tokens=100,
        completion_tokens=50,
        cost_usd=Decimal("0.5"),
    )

    content = admin_client.get(
        reverse("admin:billing_apikey_change", args=[api_key.pk])
    ).content.decode()

    assert "lifetime 1.25 USD" in content
    assert "budget remaining 3.75 USD" in content
    assert "10 requests, 210 tokens, 0.500036 USD" in content
    listing = admin_client.get(reverse("admin:billing_apikey_changelist")).content.decode()
    assert "1.25 USD (3.75 USD left)" in listing


def test_the_client_key_form_refuses_a_bad_network(admin_client):
    response = admin_client.post(
        reverse("admin:billing_apikey_add"),
        {"name": "x", "enabled": "on", "budget_period": "lifetime", "allowed_ips": "10.0.0/33"},
    )

    assert response.status_code == 200
    assert "not an IP address" in response.content.decode()
    assert not ApiKey.objects.exists()


def test_an_upstream_key_page_shows_spend_and_balance_readings(admin_client, world):
    keys, api_key = world
    key = keys["or_key"]
    add_entries(2, provider=keys["openrouter"], key=key, api_key=api_key)
    BalanceReading.objects.create(
        key=key,
        provider_balance=Decimal("9.5"),
        local_balance=Decimal("9.75"),
        drift=Decimal("-0.25"),
    )

    content = admin_client.get(
        reverse("admin:providers_upstreamkey_change", args=[key.pk])
    ).content.decode()

    assert "2 requests, 30 tokens, 0.000018 USD" in content
    assert "recent balance readings" in content.lower()
    assert "-0.25" in content
    listing = admin_client.get(reverse("admin:providers_upstreamkey_changelist")).content.decode()
    assert "-0.25 USD" in listing


def test_daily_usage_is_listed_read_only(admin_client, world):
    _, api_key = world
    DailyUsage.objects.create(day=timezone.now().date(), api_key=api_key, requested_model="m")

    response = admin_client.get(reverse("admin:billing_dailyusage_changelist"))

    assert response.status_code == 200
    assert admin_client.get(reverse("admin:billing_dailyusage_add")).status_code == 403


def test_the_spend_summary_links_to_the_key_s_recent_ledger_rows(admin_client, world):
    keys, api_key = world
    add_entries(2, provider=keys["openrouter"], key=keys["or_key"], api_key=api_key)
    other, _ = ApiKey.create_key(name="other")
    add_entries(3, provider=keys["openrouter"], key=keys["or_key"], api_key=other)
    page = admin_client.get(reverse("admin:billing_apikey_change", args=[api_key.pk]))
    link = re.search(r'href="([^"]*ledgerentry/\?[^"]*)"', page.content.decode()).group(1)

    response = admin_client.get(html.unescape(link))

    assert response.status_code == 200
    assert response.context_data["totals"]["requests"] == 2

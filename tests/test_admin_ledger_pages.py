"""The ledger list answers at a glance and an entry page reads without a glossary."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from billing.models import LedgerEntry
from tests.admin_client import add_failover_attempts
from tests.factories import make_key, make_provider

pytestmark = pytest.mark.django_db


@pytest.fixture
def entry():
    provider = make_provider("deepseek", "http://127.0.0.1:9/v1", currency="CNY")
    backup = make_provider("openrouter", "http://127.0.0.1:9/api/v1")
    key = make_key(provider, "sk-ds-0000000000000000001", label="main")
    row = LedgerEntry.objects.create(
        request_id="req_pages_1",
        created_at=timezone.now().replace(second=7, microsecond=0),
        provider=provider,
        upstream_key=key,
        requested_model="deepseek-chat",
        upstream_model="deepseek-chat",
        endpoint="chat/completions",
        outcome=LedgerEntry.Outcome.OK,
        status_code=200,
        attempts=2,
        prompt_tokens=1200,
        completion_tokens=300,
        usage_source=LedgerEntry.UsageSource.REPORTED,
        cost=Decimal("0.0012345678"),
        currency="CNY",
        cost_source=LedgerEntry.CostSource.COMPUTED,
        usd_per_unit=Decimal("0.1400000000"),
        cost_usd=Decimal("0.0001728395"),
        list_cost_usd=Decimal("0.0001728395"),
        latency_ms=1834,
        ttfb_ms=412,
    )
    add_failover_attempts(
        row,
        served_ms=1750,
        provider=backup,
        upstream_model="deepseek/deepseek-chat",
        status_code=503,
        failure="transient",
        error="HTTP 503",
        duration_ms=80,
    )
    return row


def test_the_list_shows_seconds_attempts_and_the_cost_in_its_currency(admin_client, entry):
    page = admin_client.get(reverse("admin:billing_ledgerentry_changelist")).content.decode()
    local = timezone.localtime(entry.created_at)
    assert f"{local:%Y-%m-%d %H:%M:}07" in page
    assert '<strong title="failed over">2</strong>' in page
    assert ">0.001235 CNY<" in page
    assert "1,834 ms" in page and "deepseek:main" in page


def test_the_entry_page_has_sections_human_labels_and_every_digit(admin_client, entry):
    url = reverse("admin:billing_ledgerentry_change", args=[entry.pk])
    page = admin_client.get(url).content.decode()
    for heading in ("Request", "Answer", "Tokens", "Cost (every stored digit)", "Timing"):
        assert f">{heading}</h2>" in page
    assert "Time to first byte" in page and "412 ms" in page
    assert "Ttfb" not in page and "Usd per unit" not in page
    assert "0.0012345678 CNY" in page and "1 CNY = 0.14 USD" in page
    assert "no (one JSON answer)" in page
    assert "Upstream attempts, in order" in page
    assert "attempt 1 of" not in page
    assert "503 (transient)" in page

"""``manage.py create_api_key`` with limits: every option validated, the key printed last."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from billing.models import ApiKey, hash_api_key

pytestmark = pytest.mark.django_db


def create(*args: str) -> tuple[ApiKey, str, str]:
    out = StringIO()
    call_command("create_api_key", *args, stdout=out)
    lines = out.getvalue().strip().splitlines()
    plain = lines[-1]
    return ApiKey.objects.get(key_hash=hash_api_key(plain)), plain, out.getvalue()


def test_it_creates_a_key_with_every_limit():
    api_key, plain, output = create(
        "ci",
        "--budget",
        "12.50",
        "--period",
        "month",
        "--models",
        "openai/*, *-mini",
        "--ips",
        "10.0.0.0/8,203.0.113.7",
        "--rpm",
        "60",
        "--tpm",
        "100000",
        "--expires",
        "2099-12-31",
    )

    assert plain.startswith("sk-keyaos-")
    assert api_key.budget_usd == Decimal("12.50")
    assert api_key.budget_period == "month"
    assert api_key.allowed_models == "openai/*\n*-mini"
    assert api_key.allowed_ips == "10.0.0.0/8\n203.0.113.7/32"
    assert (api_key.rpm_limit, api_key.tpm_limit) == (60, 100000)
    assert api_key.expires_at == datetime(2099, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert "budget 12.5 USD per month" in output


def test_a_key_without_options_has_no_limits():
    api_key, _, _ = create("plain")

    assert api_key.budget_usd is None and api_key.budget_period == "lifetime"
    assert not api_key.allowed_models and not api_key.allowed_ips
    assert api_key.expires_at is None


def test_an_expiry_may_be_a_date_time():
    api_key, _, _ = create("x", "--expires", "2099-01-02T03:04:05+00:00")

    assert api_key.expires_at == datetime(2099, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget", "ten"], "not a number"),
        (["--budget", "-1"], "zero or more"),
        (["--budget", "NaN"], "zero or more"),
        (["--period", "day"], "--period: A budget period needs a budget"),
        (["--ips", "10.0.0.300/8"], "not an IP address"),
        (["--rpm", "fast"], "not a whole number"),
        (["--tpm", "0"], "at least 1"),
        (["--expires", "next tuesday"], "not an ISO date"),
        (["--expires", "2001-01-01"], "in the past"),
    ],
)
def test_a_bad_option_is_refused_with_a_clear_error(args, message):
    with pytest.raises(CommandError, match=message):
        call_command("create_api_key", "bad", *args, stdout=StringIO())

    assert not ApiKey.objects.exists()

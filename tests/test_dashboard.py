from __future__ import annotations

import re
import time
from datetime import datetime, timedelta
from decimal import Decimal
from itertools import count

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from billing.models import CurrencyRate, DailyUsage, LedgerEntry
from billing.selectors import day_start
from keyaos.admin_format import format_usd
from providers.models import ModelOffer, RefreshResult, RefreshRun, UpstreamKey
from tests.factories import make_key, make_offer, make_provider

pytestmark = pytest.mark.django_db

GPT = "openai/gpt-4o-mini"
DEEPSEEK = "deepseek/deepseek-chat"
_request_ids = count(1)


def ledger_row(provider, key, model: str, at: datetime, **fields) -> LedgerEntry:
    values = {
        "request_id": f"req-{next(_request_ids)}",
        "created_at": at,
        "provider": provider,
        "upstream_key": key,
        "requested_model": model,
        "upstream_model": model,
        "endpoint": "chat/completions",
        "outcome": LedgerEntry.Outcome.OK,
        "status_code": 200,
        "usage_source": LedgerEntry.UsageSource.REPORTED,
        "currency": provider.currency if provider else "USD",
        **fields,
    }
    for name in ("cost_usd", "list_cost_usd", "cost"):
        if name in values:
            values[name] = Decimal(values[name])
    return LedgerEntry(**values)


@pytest.fixture
def usage():
    """Known ledger rows, a pruned day's rollup, offers and keys in two currencies.

    Expected figures (USD):
      today:   spend 1.25 + 0.50 = 1.75, list 2.00; 3 requests, 1 error
      7 days:  + 2.00 three days ago: spend 3.75, list 4.40; 4 requests
      30 days: + the rollup of 1.00 twenty days ago: 4.75, list 5.60; 14 requests, 2 errors
      a row 40 days ago (100.00) is outside every window.
    Against the most expensive active offer (GPT 1.00/2.00 at zenmux, DeepSeek 2/3 CNY = 0.28/0.42):
      today:   GPT 2M+1M tokens -> 4.00 - 1.25 = 2.75; DeepSeek 1M+1M -> 0.70 - 0.50 = 0.20: 2.95
      7 days:  GPT 3M+1M -> 5.00 - 3.25 = 1.75; DeepSeek 0.20: 1.95
      30 days: DeepSeek 11M+1M -> 3.50 - 1.50 = 2.00; GPT 1.75: 3.75
    """
    CurrencyRate.objects.update_or_create(
        currency="CNY", defaults={"usd_per_unit": Decimal("0.14")}
    )
    openrouter = make_provider("openrouter", "http://127.0.0.1:9/api/v1")
    zenmux = make_provider("zenmux", "http://127.0.0.1:9/api/v1")
    deepseek = make_provider("deepseek", "http://127.0.0.1:9/v1", currency="CNY")
    make_offer(openrouter, GPT, input="0.15", output="0.60")
    make_offer(zenmux, GPT, input="1.00", output="2.00")
    make_offer(deepseek, "deepseek-chat", canonical_id=DEEPSEEK, input="2", output="3")
    old = make_provider("old", "http://127.0.0.1:9/v1")
    make_offer(old, GPT, input="50", output="50", active=False)

    main = make_key(openrouter, "sk-or-main-1111111111", label="main", balance=Decimal("1.50"))
    make_key(openrouter, "sk-or-spare-2222222222", label="spare", balance=Decimal("50"))
    make_key(openrouter, "sk-or-low-33333333333", label="low", balance=Decimal("0.50"))
    make_key(
        zenmux,
        "sk-zm-bad-4444444444",
        label="revoked",
        health=UpstreamKey.Health.INVALID,
        last_error="401 Unauthorized",
    )
    make_key(
        zenmux,
        "sk-zm-hot-5555555555",
        label="throttled",
        cooldown_until=timezone.now() + timedelta(minutes=5),
    )
    make_key(
        zenmux,
        "sk-zm-off-6666666666",
        label="retired",
        enabled=False,
        health=UpstreamKey.Health.INVALID,
    )
    dry = make_key(deepseek, "sk-ds-dry-7777777777", label="cny", balance=Decimal("100"))

    today = timezone.localdate()
    minute_past_midnight = day_start(today) + timedelta(minutes=1)
    LedgerEntry.objects.bulk_create(
        [
            ledger_row(
                openrouter,
                main,
                GPT,
                minute_past_midnight,
                prompt_tokens=2_000_000,
                completion_tokens=1_000_000,
                cost_usd="1.25",
                list_cost_usd="1.50",
            ),
            ledger_row(
                deepseek,
                dry,
                DEEPSEEK,
                minute_past_midnight,
                prompt_tokens=1_000_000,
                completion_tokens=1_000_000,
                cost_usd="0.50",
                list_cost_usd="0.50",
            ),
            ledger_row(
                deepseek,
                dry,
                DEEPSEEK,
                minute_past_midnight,
                outcome=LedgerEntry.Outcome.UPSTREAM_ERROR,
                status_code=502,
            ),
            ledger_row(
                openrouter,
                main,
                GPT,
                day_start(today - timedelta(days=3)) + timedelta(hours=12),
                prompt_tokens=1_000_000,
                cost_usd="2.00",
                list_cost_usd="2.40",
            ),
            ledger_row(
                openrouter,
                main,
                GPT,
                day_start(today - timedelta(days=40)),
                prompt_tokens=1_000,
                cost_usd="100",
                list_cost_usd="100",
            ),
        ]
    )
    DailyUsage.objects.create(
        day=today - timedelta(days=20),
        provider=openrouter,
        requested_model=DEEPSEEK,
        requests=10,
        errors=1,
        prompt_tokens=10_000_000,
        cost_usd=Decimal("1.00"),
        list_cost_usd=Decimal("1.20"),
    )
    run = RefreshRun.objects.create(
        trigger=RefreshRun.Trigger.SCHEDULE, duration_ms=840, error_count=1
    )
    RefreshResult.objects.create(run=run, provider=openrouter, provider_slug="openrouter")
    RefreshResult.objects.create(
        run=run, provider=zenmux, provider_slug="zenmux", error="HTTP 503 from /models"
    )
    return {"run": run, "main": main}


def figure(html: str, name: str) -> str:
    match = re.search(rf'data-figure="{name}">([^<]*)', html)
    assert match, f"no figure {name}"
    return match.group(1).strip()


class TestFigures:
    def test_spend_requests_and_errors_are_summed_per_window(self, admin_client, usage):
        html = admin_client.get(reverse("admin:index")).content.decode()

        assert figure(html, "spend-1") == "$1.75"
        assert figure(html, "spend-7") == "$3.75"
        assert figure(html, "spend-30") == "$4.75"
        assert figure(html, "requests-1") == "3"
        assert figure(html, "requests-7") == "4"
        assert figure(html, "requests-30") == "14"
        assert figure(html, "errors-1") == "33.3%"
        assert figure(html, "errors-30") == "14.3%"

    def test_savings_against_list_price_are_list_cost_minus_cost(self, admin_client, usage):
        html = admin_client.get(reverse("admin:index")).content.decode()

        assert figure(html, "list-savings-1") == "$0.25"
        assert figure(html, "list-savings-7") == "$0.65"
        assert figure(html, "list-savings-30") == "$0.85"

    def test_savings_against_the_most_expensive_active_offer_price_each_models_tokens(
        self, admin_client, usage
    ):
        html = admin_client.get(reverse("admin:index")).content.decode()

        assert figure(html, "max-savings-1") == "$2.95"
        assert figure(html, "max-savings-7") == "$1.95"
        assert figure(html, "max-savings-30") == "$3.75"

    def test_the_page_says_how_each_figure_is_computed(self, admin_client, usage):
        html = admin_client.get(reverse("admin:index")).content.decode()

        assert "How these figures are computed" in html
        assert "most expensive active offer for that model" in html
        assert "after the key's price multiplier" in html

    def test_an_empty_ledger_shows_zeros_and_no_error_rate(self, admin_client):
        html = admin_client.get(reverse("admin:index")).content.decode()

        assert figure(html, "spend-30") == "$0.00"
        assert figure(html, "errors-30") == "-"
        assert "No spend in the last 30 days." in html

    def test_the_normal_app_list_stays_on_the_page(self, admin_client, usage):
        html = admin_client.get(reverse("admin:index")).content.decode()

        assert reverse("admin:providers_upstreamkey_changelist") in html
        assert reverse("admin:billing_apikey_changelist") in html

    def test_a_staff_user_without_ledger_access_sees_the_plain_index(
        self, client, django_user_model, usage
    ):
        staff = django_user_model.objects.create_user("staff", password="pw", is_staff=True)
        client.force_login(staff)

        response = client.get(reverse("admin:index"))

        assert response.status_code == 200
        assert "dashboard" not in response.context
        assert "Spend (USD)" not in response.content.decode()


class TestAttention:
    def test_invalid_cooling_low_and_running_out_keys_are_listed_with_reasons(
        self, admin_client, usage
    ):
        response = admin_client.get(reverse("admin:index"))
        listed = {
            item["status"].key.label: item["status"].reasons
            for item in response.context["attention"]
        }

        assert set(listed) == {"revoked", "throttled", "low", "main"}
        assert listed["revoked"] == ["invalid: 401 Unauthorized"]
        assert listed["throttled"][0].startswith("cooling down until ")
        assert listed["low"] == ["balance below $1.00"]
        # 1.50 USD left, 3.90 USD of list cost in 7 days: 0.557 a day, 2.7 days.
        assert listed["main"] == ["runs out in ≈ 2.7 days at the 7-day burn rate"]

    def test_each_listed_key_links_to_its_page_with_a_health_badge(self, admin_client, usage):
        html = admin_client.get(reverse("admin:index")).content.decode()

        url = reverse("admin:providers_upstreamkey_change", args=[usage["main"].pk])
        assert f'href="{url}"' in html
        assert 'class="kd-badge kd-health-invalid">Invalid<' in html

    def test_the_last_refresh_run_links_to_its_page_with_its_errors(self, admin_client, usage):
        html = admin_client.get(reverse("admin:index")).content.decode()

        assert reverse("admin:providers_refreshrun_change", args=[usage["run"].pk]) in html
        assert "1 error" in html
        assert "HTTP 503 from /models" in html


class TestCharts:
    def test_every_chart_is_an_inline_svg_with_a_title_and_a_table(self, admin_client, usage):
        html = admin_client.get(reverse("admin:index")).content.decode()

        svgs = re.findall(r"<svg class=\"kc-chart\"[^>]*>\s*<title[^>]*>([^<]+)</title>", html)
        assert svgs == [
            "Spend per day by provider, last 30 days (USD)",
            "Requests and spend per served model, last 30 days (top 10 by requests)",
            "Upstream key balances and expected runway at the 7-day burn rate",
        ]
        assert html.count('role="img" aria-label=') == 3
        assert html.count("<summary>The numbers</summary>") == 3

    def test_the_spend_chart_stacks_providers_per_day(self, admin_client, usage):
        response = admin_client.get(reverse("admin:index"))
        spend = response.context["charts"][0]

        assert spend.headers == ["Day", "openrouter", "deepseek", "Total"]
        today = timezone.localdate().isoformat()
        assert [today, "$1.25", "$0.50", "$1.75"] in spend.rows
        assert "<title>deepseek " + today + ": $0.50</title>" in str(spend.svg)

    def test_the_model_chart_counts_requests_and_spend(self, admin_client, usage):
        models = admin_client.get(reverse("admin:index")).context["charts"][1]

        assert models.rows == [[DEEPSEEK, "12", "$1.50"], [GPT, "2", "$3.25"]]

    def test_the_balance_chart_shows_each_keys_balance_and_runway(self, admin_client, usage):
        balances = admin_client.get(reverse("admin:index")).context["charts"][2]

        assert ["openrouter:main", "1.50 USD", "≈ 2.7 days"] in balances.rows
        assert ["deepseek:cny", "100.00 CNY ($14.00)", "≈ 196 days"] in balances.rows
        assert ["openrouter:spare", "50.00 USD", "no spend in 7 days"] in balances.rows

    def test_chart_colours_come_from_css_classes_that_follow_the_admin_theme(
        self, admin_client, usage
    ):
        html = admin_client.get(reverse("admin:index")).content.decode()
        css = (
            __import__("pathlib").Path(__file__).parent.parent
            / "keyaos/static/keyaos/dashboard.css"
        ).read_text()

        assert 'class="kc-bar kc-s0"' in html
        assert 'fill="#' not in html
        assert "var(--link-fg)" in css
        assert re.search(r"--kc-s1: light-dark\(#[0-9a-f]{6}, #[0-9a-f]{6}\);", css)

    def test_the_page_loads_nothing_from_another_host(self, admin_client, usage):
        html = admin_client.get(reverse("admin:index")).content.decode()

        external = re.findall(r'(?:src|href)="(https?://[^"]*)"', html)
        assert external == []
        assert "/static/keyaos/dashboard.css" in html


class TestFormatting:
    @pytest.mark.parametrize(
        ("value", "text"),
        [
            ("0", "$0.00"),
            ("1234.567", "$1,234.57"),
            ("0.25", "$0.25"),
            ("0.00181", "$0.00181"),
            ("0.00000181", "$0.00000181"),
            ("-0.05", "-$0.05"),
        ],
    )
    def test_usd_amounts_keep_significant_digits_below_a_cent(self, value, text):
        assert format_usd(Decimal(value)) == text


def bulk_ledger(count_rows: int, providers, keys, models, *, first: int = 0) -> None:
    now = timezone.now()
    rows = []
    for number in range(first, first + count_rows):
        rows.append(
            ledger_row(
                providers[number % len(providers)],
                keys[number % len(keys)],
                models[number % len(models)],
                now - timedelta(minutes=10 * number),
                prompt_tokens=100 + number % 50,
                completion_tokens=20,
                cost_usd="0.0001",
                list_cost_usd="0.00012",
                outcome=LedgerEntry.Outcome.UPSTREAM_ERROR
                if number % 20 == 0
                else LedgerEntry.Outcome.OK,
            )
        )
    LedgerEntry.objects.bulk_create(rows, batch_size=5000)


def copy_ledger(copies: int) -> None:
    """Insert ``copies`` more copies of every ledger row (with new request ids), in SQL: the ORM
    spends ~0.2 ms a row building an INSERT, which would make 100k rows take 20 s."""
    quote = connection.ops.quote_name
    fields = [f for f in LedgerEntry._meta.concrete_fields if not f.primary_key]
    columns = ", ".join(quote(f.column) for f in fields)
    values = ", ".join(
        f"{quote(f.column)} || %s" if f.name == "request_id" else quote(f.column) for f in fields
    )
    table = quote(LedgerEntry._meta.db_table)
    last_id = LedgerEntry.objects.order_by("-pk").values_list("pk", flat=True).first()
    with connection.cursor() as cursor:
        for copy in range(1, copies + 1):
            cursor.execute(
                f"INSERT INTO {table} ({columns}) SELECT {values} FROM {table} WHERE id <= %s",
                [f"-copy{copy}", last_id],
            )


@pytest.mark.slow
class TestScale:
    def test_the_dashboard_query_count_is_small_and_the_same_with_100k_rows(
        self, admin_client, django_assert_max_num_queries
    ):
        providers = [make_provider(slug, "http://127.0.0.1:9/v1") for slug in ("a", "b", "c")]
        keys = [
            make_key(provider, f"sk-{provider.slug}-{n}-0000000000", balance=Decimal("10"))
            for provider in providers
            for n in range(2)
        ]
        models = [f"vendor/model-{n}" for n in range(15)]
        for number, model in enumerate(models):
            make_offer(providers[number % 3], model, canonical_id=model)
        url = reverse("admin:index")
        admin_client.get(url)  # the session and the user are loaded once for every page

        bulk_ledger(10, providers, keys, models)
        with CaptureQueriesContext(connection) as small:
            assert admin_client.get(url).status_code == 200

        bulk_ledger(4990, providers, keys, models, first=10)
        copy_ledger(19)
        assert LedgerEntry.objects.count() == 100_000
        started = time.monotonic()
        with django_assert_max_num_queries(12):
            response = admin_client.get(url)
        elapsed = time.monotonic() - started

        assert len(small) <= 12
        with CaptureQueriesContext(connection) as large:
            admin_client.get(url)
        assert len(large) == len(small)
        in_window = LedgerEntry.objects.filter(
            created_at__gte=day_start(timezone.localdate() - timedelta(days=29))
        )
        assert response.context["dashboard"].windows[-1].requests == in_window.count()
        assert elapsed < 10, f"the dashboard took {elapsed:.1f} s over 100k rows"


def test_offers_without_prices_are_ignored_by_the_savings(admin_client, usage):
    ModelOffer.objects.filter(provider__slug="zenmux").update(input_price_per_mtok=None)
    html = admin_client.get(reverse("admin:index")).content.decode()

    # GPT's most expensive priced offer is now openrouter's 0.15/0.60: 0.30 + 0.60 - 1.25.
    assert figure(html, "max-savings-1") == "-$0.15"

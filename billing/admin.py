"""Admin for currency rates, client API keys (shown once, stored as a keyed hash) and the ledger."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from datetime import timedelta

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.options import IncorrectLookupParameters
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html

from billing.models import (
    USAGE_GROUP,
    USAGE_SUMS,
    ApiKey,
    Attempt,
    CurrencyRate,
    DailyUsage,
    LedgerEntry,
    generate_api_key,
)
from billing.selectors import ledger_totals, recent_spend
from billing.services import LIMIT_FIELDS, validate_limits
from keyaos.admin_format import (
    exact_amount,
    format_usd,
    plain_amount,
    relative_time,
    seconds,
    short_amount,
    spend_summary,
)
from keyaos.admin_mixins import AddFormMixin, EnableActionsMixin, ReadOnlyAdminMixin, ReadOnlyInline


class CurrencyRateForm(forms.ModelForm):
    class Meta:
        model = CurrencyRate
        fields = ("currency", "usd_per_unit")

    def clean_currency(self) -> str:
        currency = self.cleaned_data["currency"].strip().upper()
        if currency == "USD":
            raise forms.ValidationError("USD needs no rate: amounts are converted to USD.")
        return currency

    def clean_usd_per_unit(self):
        rate = self.cleaned_data["usd_per_unit"]
        if rate <= 0:
            raise forms.ValidationError("A rate must be greater than zero.")
        return rate


@admin.register(CurrencyRate)
class CurrencyRateAdmin(admin.ModelAdmin):
    form = CurrencyRateForm
    list_display = ("currency", "usd_per_unit", "updated_at")
    readonly_fields = ("updated_at",)
    fields = ("currency", "usd_per_unit", "updated_at")


class ApiKeyForm(forms.ModelForm):
    class Meta:
        model = ApiKey
        fields = ("name", "enabled", *LIMIT_FIELDS)

    def clean(self) -> dict:
        cleaned = super().clean()
        values = {field: cleaned[field] for field in LIMIT_FIELDS if field in cleaned}
        try:
            cleaned.update(validate_limits(values, creating=self.instance.pk is None))
        except ValidationError as error:
            self.add_error(None, error)
        return cleaned


@admin.register(ApiKey)
class ApiKeyAdmin(AddFormMixin, EnableActionsMixin, admin.ModelAdmin):
    form = add_form = ApiKeyForm
    list_display = (
        "name",
        "prefix",
        "enabled",
        "budget",
        "period_spend",
        "lifetime_spend",
        "rate_limits",
        "expires_at",
        "last_used",
    )
    list_filter = ("enabled", "budget_period")
    search_fields = ("name", "prefix")
    readonly_fields = (
        "prefix",
        "created_at",
        "last_used_at",
        "spend_so_far",
        "spend_last_30_days",
    )
    enabled_noun = "client key(s)"

    @admin.display(description="last used", ordering="last_used_at")
    def last_used(self, api_key: ApiKey) -> str:
        return relative_time(api_key.last_used_at)

    def get_fields(self, request: HttpRequest, obj=None):
        return (
            ("name", "enabled"),
            ("prefix", "created_at", "last_used_at"),
            "expires_at",
            ("budget_usd", "budget_period"),
            "spend_so_far",
            "spend_last_30_days",
            "allowed_models",
            "allowed_ips",
            ("rpm_limit", "tpm_limit"),
        )

    @admin.display(description="budget", ordering="budget_usd")
    def budget(self, api_key: ApiKey) -> str:
        if api_key.budget_usd is None:
            return "-"
        period = "" if api_key.budget_period == "lifetime" else f" / {api_key.budget_period}"
        return f"{usd(api_key.budget_usd)}{period}"

    @admin.display(description="spent this period")
    def period_spend(self, api_key: ApiKey) -> str:
        spent = usd(api_key.current_period_spent_usd())
        remaining = api_key.budget_remaining_usd()
        return spent if remaining is None else f"{spent} ({usd(remaining)} left)"

    @admin.display(description="spent (lifetime)", ordering="spent_usd")
    def lifetime_spend(self, api_key: ApiKey) -> str:
        return usd(api_key.spent_usd)

    @admin.display(description="rate limits")
    def rate_limits(self, api_key: ApiKey) -> str:
        parts = []
        if api_key.rpm_limit:
            parts.append(f"{api_key.rpm_limit} req/min")
        if api_key.tpm_limit:
            parts.append(f"{api_key.tpm_limit} tok/min")
        return ", ".join(parts) or "-"

    @admin.display(description="spend so far")
    def spend_so_far(self, api_key: ApiKey) -> str:
        text = f"lifetime {usd(api_key.spent_usd)}"
        if api_key.budget_period != "lifetime":
            text += f"; this {api_key.budget_period} {usd(api_key.current_period_spent_usd())}"
        remaining = api_key.budget_remaining_usd()
        if remaining is not None:
            text += f"; budget remaining {usd(remaining)}"
        return text + " (settled after each request)"

    @admin.display(description="last 30 days")
    def spend_last_30_days(self, api_key: ApiKey) -> str:
        return spend_summary(recent_spend(api_key=api_key), "api_key", api_key.pk)

    def save_model(self, request: HttpRequest, obj: ApiKey, form, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        plain = generate_api_key()
        obj.set_key(plain)
        super().save_model(request, obj, form, change)
        self.message_user(
            request,
            f"The key for {obj.name} is {plain} . Copy it now, it will not be shown again.",
            messages.WARNING,
        )


def usd(amount) -> str:
    return exact_amount(amount, "USD")


class RequestedModelFilter(admin.SimpleListFilter):
    """The models asked for lately: a bounded DISTINCT, so 100k rows stay cheap."""

    title = "requested model"
    parameter_name = "requested_model"
    LIMIT = 100
    RECENT_DAYS = 90

    def lookups(self, request: HttpRequest, model_admin):
        since = timezone.now() - timedelta(days=self.RECENT_DAYS)
        models = list(
            LedgerEntry.objects.filter(created_at__gte=since)
            .order_by("requested_model")
            .values_list("requested_model", flat=True)
            .distinct()[: self.LIMIT]
        )
        if self.value() and self.value() not in models:
            models.append(self.value())
        return [(model, model or "(none)") for model in models]

    def queryset(self, request: HttpRequest, queryset):
        if self.value() is None:
            return queryset
        return queryset.filter(requested_model=self.value())


class ClientKeyFilter(admin.RelatedFieldListFilter):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.title = "client key"


class AttemptInline(ReadOnlyInline):
    """Each upstream try in order: who was asked, what came back, why the next was tried."""

    model = Attempt
    fields = ("try_number", "upstream_key", "upstream_model", "answer", "error", "took")
    verbose_name = "upstream attempt"
    verbose_name_plural = "upstream attempts, in order"

    @admin.display(description="#")
    def try_number(self, attempt: Attempt) -> int:
        return attempt.number

    @admin.display(description="answer")
    def answer(self, attempt: Attempt) -> str:
        status = attempt.status_code or "no answer"
        return f"{status} ({attempt.failure})" if attempt.failure else str(status)

    @admin.display(description="took")
    def took(self, attempt: Attempt) -> str:
        return f"{attempt.duration_ms:,} ms"

    def get_queryset(self, request: HttpRequest):
        return super().get_queryset(request).select_related("provider", "upstream_key__provider")


CSV_COLUMNS = (
    ("created_at", "created_at"),
    ("request_id", "request_id"),
    ("client_key", "api_key__name"),
    ("provider", "provider__slug"),
    ("upstream_key", "upstream_key__label"),
    ("requested_model", "requested_model"),
    ("upstream_model", "upstream_model"),
    ("endpoint", "endpoint"),
    ("streamed", "streamed"),
    ("outcome", "outcome"),
    ("status_code", "status_code"),
    ("attempts", "attempts"),
    ("prompt_tokens", "prompt_tokens"),
    ("completion_tokens", "completion_tokens"),
    ("cached_tokens", "cached_tokens"),
    ("reasoning_tokens", "reasoning_tokens"),
    ("usage_source", "usage_source"),
    ("cost", "cost"),
    ("currency", "currency"),
    ("cost_source", "cost_source"),
    ("usd_per_unit", "usd_per_unit"),
    ("cost_usd", "cost_usd"),
    ("list_cost_usd", "list_cost_usd"),
    ("latency_ms", "latency_ms"),
    ("ttfb_ms", "ttfb_ms"),
    ("error", "error"),
)


class _Echo:
    def write(self, value: str) -> str:
        return value


@admin.register(LedgerEntry)
class LedgerEntryAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    class Media:
        css = {"all": ["keyaos/dashboard.css"]}

    change_list_template = "admin/billing/ledgerentry/change_list.html"
    list_display = (
        "when",
        "client_key",
        "requested_model",
        "served_by",
        "result",
        "attempt_count",
        "tokens",
        "cost_in_currency",
        "latency",
    )
    list_display_links = ("when",)
    fieldsets = (
        (
            "Request",
            {
                "fields": (
                    ("request_id", "exact_time", "client_key"),
                    ("endpoint", "requested_model", "stream"),
                )
            },
        ),
        (
            "Answer",
            {
                "fields": (
                    ("outcome", "status_code", "attempts"),
                    ("provider", "upstream_key", "upstream_model"),
                    "error",
                )
            },
        ),
        (
            "Tokens",
            {
                "fields": (
                    ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens"),
                    "usage_source",
                )
            },
        ),
        (
            "Cost (every stored digit)",
            {
                "fields": (
                    ("exact_cost", "cost_source", "rate"),
                    ("exact_cost_usd", "exact_list_cost"),
                )
            },
        ),
        ("Timing", {"fields": (("total_time", "first_byte", "gateway_overhead"),)}),
    )
    readonly_fields = (
        "exact_time",
        "client_key",
        "stream",
        "exact_cost",
        "rate",
        "exact_cost_usd",
        "exact_list_cost",
        "total_time",
        "first_byte",
        "gateway_overhead",
    )
    list_filter = (
        "created_at",
        "provider",
        RequestedModelFilter,
        ("api_key", ClientKeyFilter),
        "upstream_key",
        "outcome",
        "streamed",
        "usage_source",
    )
    list_select_related = ("api_key", "provider", "upstream_key__provider")
    date_hierarchy = "created_at"
    search_fields = ("=request_id", "requested_model", "upstream_model")
    show_full_result_count = False
    inlines = [AttemptInline]

    @admin.display(description="tokens")
    def tokens(self, entry: LedgerEntry) -> str:
        return f"{entry.total_tokens:,}"

    @admin.display(description="time", ordering="created_at")
    def when(self, entry: LedgerEntry) -> str:
        return seconds(entry.created_at)

    @admin.display(description="time")
    def exact_time(self, entry: LedgerEntry) -> str:
        return f"{seconds(entry.created_at)} ({timezone.get_current_timezone_name()})"

    @admin.display(description="served by", ordering="provider__slug")
    def served_by(self, entry: LedgerEntry) -> str:
        if entry.upstream_key is not None:
            return str(entry.upstream_key)
        return entry.provider.slug if entry.provider else "-"

    @admin.display(description="result", ordering="status_code")
    def result(self, entry: LedgerEntry) -> str:
        css = "kd-good" if entry.outcome == LedgerEntry.Outcome.OK else "kd-bad"
        return format_html(
            '<span class="{}">{}</span> {}', css, entry.get_outcome_display(), entry.status_code
        )

    @admin.display(description="attempts", ordering="attempts")
    def attempt_count(self, entry: LedgerEntry) -> str:
        if entry.attempts <= 1:
            return str(entry.attempts)
        return format_html('<strong title="failed over">{}</strong>', entry.attempts)

    @admin.display(description="cost", ordering="cost_usd")
    def cost_in_currency(self, entry: LedgerEntry) -> str:
        return format_html(
            '<span title="{} = {}">{}</span>',
            exact_amount(entry.cost, entry.currency),
            exact_amount(entry.cost_usd, "USD"),
            short_amount(entry.cost, entry.currency),
        )

    @admin.display(description="latency", ordering="latency_ms")
    def latency(self, entry: LedgerEntry) -> str:
        return f"{entry.latency_ms:,} ms"

    @admin.display(description="client key", ordering="api_key__name")
    def client_key(self, entry: LedgerEntry) -> str:
        if entry.api_key is None:
            return "-"
        url = reverse("admin:billing_apikey_change", args=[entry.api_key_id])
        return format_html(
            '<a href="{}" title="{}">{}</a>', url, entry.api_key.prefix, entry.api_key.name
        )

    @admin.display(description="streamed")
    def stream(self, entry: LedgerEntry) -> str:
        return "yes (server-sent events)" if entry.streamed else "no (one JSON answer)"

    @admin.display(description="cost")
    def exact_cost(self, entry: LedgerEntry) -> str:
        return exact_amount(entry.cost, entry.currency)

    @admin.display(description="exchange rate")
    def rate(self, entry: LedgerEntry) -> str:
        return f"1 {entry.currency} = {plain_amount(entry.usd_per_unit)} USD"

    @admin.display(description="cost in USD (after the key's multiplier)")
    def exact_cost_usd(self, entry: LedgerEntry) -> str:
        return exact_amount(entry.cost_usd, "USD")

    @admin.display(description="at list price, in USD")
    def exact_list_cost(self, entry: LedgerEntry) -> str:
        return exact_amount(entry.list_cost_usd, "USD")

    @admin.display(description="total time")
    def total_time(self, entry: LedgerEntry) -> str:
        return f"{entry.latency_ms:,} ms"

    @admin.display(description="time to first byte")
    def first_byte(self, entry: LedgerEntry) -> str:
        return "-" if entry.ttfb_ms is None else f"{entry.ttfb_ms:,} ms"

    @admin.display(description="gateway overhead")
    def gateway_overhead(self, entry: LedgerEntry) -> str:
        return "-" if entry.overhead_ms is None else f"{plain_amount(entry.overhead_ms)} ms"

    def get_urls(self):
        export = path(
            "export.csv",
            self.admin_site.admin_view(self.export_csv),
            name="billing_ledgerentry_export",
        )
        return [export, *super().get_urls()]

    def changelist_view(self, request: HttpRequest, extra_context=None):
        response = super().changelist_view(request, extra_context)
        context = getattr(response, "context_data", None)
        if context is not None and "cl" in context:
            totals = ledger_totals(context["cl"].queryset)
            context["totals"] = {
                "requests": totals.requests,
                "tokens": totals.tokens,
                "cost_usd": plain_amount(totals.cost_usd),
                "list_cost_usd": plain_amount(totals.list_cost_usd),
                "savings_usd": plain_amount(totals.savings_usd),
            }
            context["shown_totals"] = {
                "requests": f"{totals.requests:,}",
                "tokens": f"{totals.tokens:,}",
                **{
                    name: format_html(
                        '<span title="{}">{}</span>',
                        exact_amount(amount, "USD"),
                        format_usd(amount),
                    )
                    for name, amount in (
                        ("cost_usd", totals.cost_usd),
                        ("list_cost_usd", totals.list_cost_usd),
                        ("savings_usd", totals.savings_usd),
                    )
                },
            }
            context["export_query"] = request.GET.urlencode()
        return response

    def export_csv(self, request: HttpRequest) -> HttpResponse:
        """The filtered rows as CSV, streamed; never a secret (keys by label and slug only)."""
        if not self.has_view_permission(request):
            return HttpResponse(status=403)
        try:
            changelist = self.get_changelist_instance(request)
        except IncorrectLookupParameters:
            return HttpResponse("Unknown filter.", status=400)
        rows = changelist.queryset.values_list(*(lookup for _, lookup in CSV_COLUMNS))
        filename = f"keyaos-ledger-{timezone.now():%Y%m%d-%H%M%S}.csv"
        response = StreamingHttpResponse(_csv_lines(rows), content_type="text/csv")
        response["Content-Disposition"] = f'attachment; filename="{filename}"'
        return response


def _csv_lines(rows) -> Iterator[str]:
    writer = csv.writer(_Echo())
    yield writer.writerow([name for name, _ in CSV_COLUMNS])
    for row in rows.iterator(chunk_size=2000):
        yield writer.writerow(row)


@admin.register(DailyUsage)
class DailyUsageAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = (*USAGE_GROUP, *USAGE_SUMS)
    list_filter = ("day", "provider", "api_key")
    list_select_related = ("api_key", "provider", "upstream_key__provider")
    date_hierarchy = "day"
    search_fields = ("requested_model",)

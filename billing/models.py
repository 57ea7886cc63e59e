"""What every request cost and who pays: currency rates, client API keys and the ledger."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime, tzinfo
from decimal import Decimal

from django.conf import settings
from django.db import connection, models
from django.db.models import Count, Q, Sum, Value
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone

from providers.models import MONEY_DIGITS, Provider, UpstreamKey, currency_validator

API_KEY_PREFIX = "sk-keyaos-"


class CurrencyRate(models.Model):
    """How many US dollars one unit of ``currency`` buys. USD itself is always 1."""

    currency = models.CharField(max_length=3, unique=True, validators=[currency_validator])
    usd_per_unit = models.DecimalField(max_digits=20, decimal_places=10)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["currency"]

    def __str__(self) -> str:
        return f"1 {self.currency} = {self.usd_per_unit} USD"

    def save(self, *args, **kwargs) -> None:
        self.currency = self.currency.upper()
        self.updated_at = timezone.now()
        super().save(*args, **kwargs)


def hash_api_key(plain: str) -> str:
    """Keyed hash of a client key: a stolen database alone does not let anyone test guesses."""
    return hmac.new(
        ("keyaos-api-key:" + settings.SECRET_KEY).encode(), plain.encode(), hashlib.sha256
    ).hexdigest()


def generate_api_key() -> str:
    """A new plain client key: the one generator (only its hash is ever stored)."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


class ApiKey(models.Model):
    """A key that a client program sends to ``/v1``. Only its keyed hash is stored."""

    class BudgetPeriod(models.TextChoices):
        LIFETIME = "lifetime", "Lifetime"
        DAY = "day", "Per day (resets at 00:00 UTC)"
        MONTH = "month", "Per month (resets on the 1st, UTC)"

    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=20, editable=False)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    budget_usd = models.DecimalField(
        **MONEY_DIGITS, null=True, blank=True, help_text="Empty = no budget."
    )
    budget_period = models.CharField(
        max_length=10, choices=BudgetPeriod.choices, default=BudgetPeriod.LIFETIME
    )
    spent_usd = models.DecimalField(
        **MONEY_DIGITS,
        default=Decimal("0"),
        editable=False,
        help_text="Lifetime spend, settled after requests.",
    )
    period_spent_usd = models.DecimalField(**MONEY_DIGITS, default=Decimal("0"), editable=False)
    period_started_at = models.DateTimeField(null=True, blank=True, editable=False)
    allowed_models = models.TextField(
        blank=True, help_text="Glob patterns (openai/*, *-mini), one per line or comma-separated."
    )
    allowed_ips = models.TextField(
        blank=True, help_text="CIDRs (10.0.0.0/8, 203.0.113.7/32), one per line or comma-separated."
    )
    rpm_limit = models.PositiveIntegerField("requests per minute", null=True, blank=True)
    tpm_limit = models.PositiveIntegerField("tokens per minute", null=True, blank=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "client API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}...)"

    @classmethod
    def create_key(cls, *, name: str, **fields) -> tuple[ApiKey, str]:
        """Create a key; return it with its plain value, which is never stored nor shown again."""
        plain = generate_api_key()
        api_key = cls(name=name, **fields)
        api_key.set_key(plain)
        api_key.save()
        return api_key, plain

    def set_key(self, plain: str) -> None:
        self.prefix = plain[: len(API_KEY_PREFIX) + 4]
        self.key_hash = hash_api_key(plain)

    def current_period_spent_usd(self, now: datetime | None = None) -> Decimal:
        """Spend in the budget period running now: zero once the period has rolled over."""
        return self.spent_in_period(budget_period_start(self.budget_period, now or timezone.now()))

    def spent_in_period(self, start: datetime | None) -> Decimal:
        """Spend in the budget period starting at ``start`` (None: lifetime), as the ledger last
        wrote it: zero when the period on record is an older one."""
        if start is None:
            return self.spent_usd
        return self.period_spent_usd if self.period_started_at == start else Decimal(0)

    def budget_remaining_usd(self, now: datetime | None = None) -> Decimal | None:
        if self.budget_usd is None:
            return None
        return self.budget_usd - self.current_period_spent_usd(now)

    def is_expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or timezone.now())


def budget_period_start(period: str, when: datetime) -> datetime | None:
    """Start (UTC) of the budget period holding ``when``; None for a lifetime budget."""
    when = when.astimezone(UTC)
    if period == ApiKey.BudgetPeriod.DAY:
        return when.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == ApiKey.BudgetPeriod.MONTH:
        return when.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return None


USAGE_SUMS = (
    "requests",
    "errors",
    "client_errors",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "list_cost_usd",
)
"""What ``usage_totals()`` of the ledger and of the daily rollups both return, beside the group."""

USAGE_GROUP = ("day", "api_key", "provider", "upstream_key", "requested_model")
"""The group key of a daily rollup: one DailyUsage row per value."""


def _grouped(queryset: models.QuerySet, group_by: tuple[str, ...], sums: dict) -> list[dict]:
    if not group_by:
        return [queryset.order_by().aggregate(**sums)]
    return list(queryset.order_by().values(*group_by).annotate(**sums))


class LedgerQuerySet(models.QuerySet):
    def usage_totals(self, *group_by: str, tz: tzinfo | None = None) -> list[dict]:
        """Per group (``"day"``: the row's calendar day in ``tz``, default the current time
        zone), the ``USAGE_SUMS`` of these rows; with no group, one dict for all of them."""
        queryset = self
        if "day" in group_by:
            queryset = queryset.annotate(day=TruncDate("created_at", tzinfo=tz))
        return _grouped(
            queryset,
            group_by,
            {
                "requests": Count("id"),
                "errors": Count("id", filter=~Q(outcome=LedgerEntry.Outcome.OK)),
                "client_errors": Count("id", filter=Q(outcome__in=LedgerEntry.CLIENT_SIDE)),
                "prompt_tokens": Sum("prompt_tokens"),
                "completion_tokens": Sum("completion_tokens"),
                "cost_usd": Sum("cost_usd"),
                "list_cost_usd": Sum("list_cost_usd"),
            },
        )


class LedgerEntry(models.Model):
    """One row per client request: what was asked, who served it, and what it cost."""

    class Outcome(models.TextChoices):
        OK = "ok", "OK"
        UPSTREAM_ERROR = "upstream_error", "Upstream error"
        CLIENT_ERROR = "client_error", "Client error"
        DISCONNECTED = "disconnected", "Client disconnected"
        STREAM_FAILED = "stream_failed", "Failed mid-stream"

    # Not the upstream's failing: what the client sent, or the client leaving.
    CLIENT_SIDE = (Outcome.CLIENT_ERROR, Outcome.DISCONNECTED)

    class UsageSource(models.TextChoices):
        REPORTED = "reported", "Reported by the upstream"
        ESTIMATED = "estimated", "Estimated"
        NONE = "none", "None (no upstream answer)"

    class CostSource(models.TextChoices):
        REPORTED = "reported", "Reported by the upstream"
        COMPUTED = "computed", "Computed from stored prices"
        NONE = "none", "None"

    request_id = models.CharField(max_length=40, unique=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    api_key = models.ForeignKey(ApiKey, on_delete=models.SET_NULL, null=True, blank=True)
    provider = models.ForeignKey(Provider, on_delete=models.SET_NULL, null=True, blank=True)
    upstream_key = models.ForeignKey(UpstreamKey, on_delete=models.SET_NULL, null=True, blank=True)
    requested_model = models.CharField(max_length=200)
    upstream_model = models.CharField(max_length=200, blank=True)
    endpoint = models.CharField(max_length=40)
    streamed = models.BooleanField(default=False)
    outcome = models.CharField(max_length=20, choices=Outcome.choices)
    status_code = models.PositiveSmallIntegerField()
    attempts = models.PositiveSmallIntegerField(default=0)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    reasoning_tokens = models.PositiveIntegerField(default=0)
    usage_source = models.CharField(max_length=10, choices=UsageSource.choices)
    cost = models.DecimalField(**MONEY_DIGITS, default=Decimal("0"))
    currency = models.CharField(max_length=3, default="USD")
    cost_source = models.CharField(max_length=10, choices=CostSource.choices, default="none")
    usd_per_unit = models.DecimalField(max_digits=20, decimal_places=10, default=Decimal("1"))
    cost_usd = models.DecimalField(**MONEY_DIGITS, default=Decimal("0"))
    list_cost_usd = models.DecimalField(**MONEY_DIGITS, default=Decimal("0"))
    expected_cache_saving_usd = models.DecimalField(
        **MONEY_DIGITS,
        default=Decimal("0"),
        help_text="What routing expected the prompt cache to save on this request (USD).",
    )
    latency_ms = models.PositiveIntegerField(default=0)
    ttfb_ms = models.PositiveIntegerField(null=True, blank=True)
    overhead_ms = models.DecimalField(max_digits=10, decimal_places=3, null=True, blank=True)
    error = models.TextField(blank=True)

    objects = LedgerQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "ledger entry"
        verbose_name_plural = "ledger"
        indexes = [
            models.Index(fields=["provider", "created_at"]),
            models.Index(fields=["api_key", "created_at"]),
            models.Index(fields=["upstream_key", "created_at"]),
            models.Index(fields=["requested_model", "created_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.request_id} {self.requested_model} {self.outcome}"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Attempt(models.Model):
    """One upstream try of a request; failed ones say why the dispatcher moved on."""

    entry = models.ForeignKey(LedgerEntry, on_delete=models.CASCADE, related_name="attempt_rows")
    number = models.PositiveSmallIntegerField()
    provider = models.ForeignKey(Provider, on_delete=models.SET_NULL, null=True)
    upstream_key = models.ForeignKey(UpstreamKey, on_delete=models.SET_NULL, null=True)
    upstream_model = models.CharField(max_length=200)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    failure = models.CharField(max_length=20, blank=True)
    error = models.TextField(blank=True)
    duration_ms = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["entry", "number"]

    def __str__(self) -> str:
        return f"attempt {self.number}"


class DailyUsageQuerySet(models.QuerySet):
    def usage_totals(self, *group_by: str, tz: tzinfo | None = None) -> list[dict]:
        """The same keys as ``LedgerQuerySet.usage_totals`` (a rollup's day is already a day)."""
        return _grouped(self, group_by, {name: Sum(name) for name in USAGE_SUMS})

    def add(self, groups: list[dict]) -> None:
        """Add each group's ``USAGE_SUMS`` to its rollup row (``USAGE_GROUP`` values, FKs by id),
        creating the row when the group is new: one upsert per group."""
        table = DailyUsage._meta.db_table
        columns = [DailyUsage._meta.get_field(name).column for name in (*USAGE_GROUP, *USAGE_SUMS)]
        sql = (
            f"INSERT INTO {table} ({', '.join(columns)}) "
            f"VALUES ({', '.join(['%s'] * len(columns))}) "
            f"ON CONFLICT ({_CONFLICT_TARGET}) DO UPDATE SET "
            + ", ".join(f"{name} = {table}.{name} + excluded.{name}" for name in USAGE_SUMS)
        )
        ops = connection.ops
        rows = [
            [ops.adapt_datefield_value(group["day"])]
            + [group[name] for name in USAGE_GROUP[1:]]
            + [group[name] or 0 for name in USAGE_SUMS]
            for group in groups
        ]
        with connection.cursor() as cursor:
            cursor.executemany(sql, rows)

    def forget(self, field: str, pk: int) -> None:
        """Fold the rollups of a deleted ``field`` object into the rows without one, so that
        SET NULL cannot make two rows of one group."""
        rows = list(self.filter(**{field: pk}).values(*USAGE_GROUP, *USAGE_SUMS))
        if rows:
            self.filter(**{field: pk}).delete()
            self.add([{**row, field: None} for row in rows])


def _unknown(field: str):
    return Coalesce(field, Value(0), output_field=models.BigIntegerField())


class DailyUsage(models.Model):
    """Daily totals per client key, provider, upstream key and model; outlive pruned rows."""

    day = models.DateField(db_index=True)
    api_key = models.ForeignKey(ApiKey, on_delete=models.SET_NULL, null=True, blank=True)
    provider = models.ForeignKey(Provider, on_delete=models.SET_NULL, null=True, blank=True)
    upstream_key = models.ForeignKey(UpstreamKey, on_delete=models.SET_NULL, null=True, blank=True)
    requested_model = models.CharField(max_length=200)
    requests = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    client_errors = models.PositiveIntegerField(
        default=0, help_text="Errors of the client's making: client errors and disconnects."
    )
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    cost_usd = models.DecimalField(**MONEY_DIGITS, default=Decimal("0"))
    list_cost_usd = models.DecimalField(**MONEY_DIGITS, default=Decimal("0"))

    objects = DailyUsageQuerySet.as_manager()

    class Meta:
        ordering = ["-day"]
        verbose_name_plural = "daily usage"
        constraints = [
            # NULL (no client key, no provider) is a group of its own: coalesced to 0 here.
            models.UniqueConstraint(
                "day",
                _unknown("api_key"),
                _unknown("provider"),
                _unknown("upstream_key"),
                "requested_model",
                name="one_daily_usage_per_group",
            )
        ]

    def __str__(self) -> str:
        return f"{self.day} {self.requested_model}"


# The upsert's ON CONFLICT target: exactly the expressions of ``one_daily_usage_per_group``.
_CONFLICT_TARGET = (
    "day, (COALESCE(api_key_id, 0)), (COALESCE(provider_id, 0)), (COALESCE(upstream_key_id, 0)), "
    "requested_model"
)

"""Who Keyaos buys tokens from: providers, their upstream keys, and the model catalog."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, RegexValidator
from django.db import models
from django.utils import timezone

from keyaos.lib.signals import routing_data_changed
from providers.crypto import (
    SecretDecryptionError,
    decrypt_secret,
    encrypt_secret,
    mask_secret,
    secret_fingerprint,
)

logger = logging.getLogger("keyaos.keys")

PRICE_DIGITS = {"max_digits": 24, "decimal_places": 10}
MONEY_DIGITS = {"max_digits": 28, "decimal_places": 12}

currency_validator = RegexValidator(
    r"^[A-Z]{3}$", "Use a three-letter ISO code such as USD or CNY."
)


class UpstreamEndpoint:
    """How to address a provider: shared by the model and the gateway's snapshot of it."""

    base_url: str
    auth_style: str

    def url(self, path: str) -> str:
        return self.base_url.rstrip("/") + "/" + path.lstrip("/")

    def auth_headers(self, secret: str) -> dict[str, str]:
        if self.auth_style == API_KEY_HEADER:
            return {"x-api-key": secret}
        if self.auth_style == ANTHROPIC_AUTH:
            return {"x-api-key": secret, "anthropic-version": ANTHROPIC_VERSION}
        return {"Authorization": f"Bearer {secret}"}


API_KEY_HEADER = "x-api-key"
ANTHROPIC_AUTH = "anthropic"
ANTHROPIC_VERSION = "2023-06-01"
# Client protocols a provider may serve natively besides chat completions (``native_protocols``).
NATIVE_PROTOCOLS = ("anthropic",)


def validate_native_protocols(value: object) -> None:
    """``{"anthropic": "https://api.deepseek.com/anthropic/v1"}``; "" stands for the base URL."""
    if not isinstance(value, dict):
        raise ValidationError('Native protocols must be an object such as {"anthropic": ""}.')
    for protocol, url in value.items():
        if protocol not in NATIVE_PROTOCOLS:
            raise ValidationError(
                f"Unknown protocol {protocol!r}; known: {', '.join(NATIVE_PROTOCOLS)}."
            )
        if not isinstance(url, str) or (url and not url.startswith(("http://", "https://"))):
            raise ValidationError(f"The {protocol} URL must be an http(s) URL or empty.")


def default_read_timeout_s() -> float:
    """A new provider's read timeout: ``KEYAOS_READ_TIMEOUT_S``."""
    return settings.KEYAOS_READ_TIMEOUT_S


class Provider(UpstreamEndpoint, models.Model):
    class CatalogFormat(models.TextChoices):
        OPENROUTER = "openrouter", "OpenRouter (per-token price strings)"
        DEEPINFRA = "deepinfra", "DeepInfra (metadata.pricing per 1M)"
        ZENMUX = "zenmux", "ZenMux (tiered pricings per 1M)"
        OPENAI = "openai", "OpenAI list (ids only, prices set by hand)"
        ANTHROPIC = "anthropic", "Anthropic list (ids and names, prices set by hand)"

    class BalanceMethod(models.TextChoices):
        NONE = "none", "None (entered by hand)"
        OPENROUTER = "openrouter_credits", "OpenRouter GET /credits"
        DEEPSEEK = "deepseek_balance", "DeepSeek GET /user/balance"

    class KeyCheck(models.TextChoices):
        MODELS = "models", "GET /models with the key"
        OPENROUTER = "openrouter_key", "OpenRouter GET /key"
        CHAT = "chat", "1-token chat completion"

    class AuthStyle(models.TextChoices):
        BEARER = "bearer", "Authorization: Bearer"
        API_KEY = API_KEY_HEADER, "x-api-key header"
        ANTHROPIC = ANTHROPIC_AUTH, "x-api-key and anthropic-version (Anthropic)"

    slug = models.SlugField(max_length=50, unique=True)
    name = models.CharField(max_length=100)
    preset = models.CharField(max_length=30, default="openai-compatible")
    base_url = models.URLField(
        max_length=300, help_text="Up to and including /v1 (or its equivalent)."
    )
    currency = models.CharField(max_length=3, default="USD", validators=[currency_validator])
    catalog_format = models.CharField(
        max_length=20, choices=CatalogFormat.choices, default=CatalogFormat.OPENAI
    )
    balance_method = models.CharField(
        max_length=30, choices=BalanceMethod.choices, default=BalanceMethod.NONE
    )
    key_check = models.CharField(max_length=20, choices=KeyCheck.choices, default=KeyCheck.MODELS)
    key_check_model = models.CharField(
        max_length=200, blank=True, help_text="Model used by the 1-token chat key check."
    )
    auth_style = models.CharField(
        max_length=20, choices=AuthStyle.choices, default=AuthStyle.BEARER
    )
    default_vendor = models.CharField(
        max_length=50,
        blank=True,
        help_text="Vendor prefix for native ids without one (deepseek-chat -> deepseek/...).",
    )
    read_timeout_s = models.FloatField(
        default=default_read_timeout_s,
        validators=[MinValueValidator(1.0)],
        help_text="Seconds to wait between bytes from this provider (and for its first token).",
    )
    prompt_cache_ttl_s = models.FloatField(
        "prompt cache lifetime (s)",
        default=300.0,
        validators=[MinValueValidator(0.0)],
        help_text=(
            "How long this provider keeps a conversation's prompt prefix cached: routing expects "
            "a key that served a session this recently to bill that prefix at the cached price."
        ),
    )
    native_protocols = models.JSONField(
        default=dict,
        blank=True,
        validators=[validate_native_protocols],
        help_text="Client protocols this provider serves natively, with their base URL up to "
        'and including /v1 ("" for the base URL above), e.g. {"anthropic": '
        '"https://api.deepseek.com/anthropic/v1"}. Requests in that protocol are passed through '
        "untranslated.",
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.name or self.slug

    def canonical_id(
        self,
        upstream_model_id: str,
        aliases: dict[str, str] | None = None,
        published: dict[str, set[str]] | None = None,
    ) -> str:
        """The OpenRouter-style ``vendor/model`` id that a native id serves."""
        return self.identify(upstream_model_id, aliases, published).canonical_id

    def identify(
        self,
        upstream_model_id: str,
        aliases: dict[str, str] | None = None,
        published: dict[str, set[str]] | None = None,
    ) -> Identity:
        """Which canonical model a native id serves, and by which rule, in this order: the
        operator's mapping; an id published by the identity source (OpenRouter's
        ``hugging_face_id`` or ``canonical_slug``, case-insensitive); the provider's default
        vendor; lowercasing. Two canonical ids claiming one native id are a conflict: it is
        reported, and the next rules decide."""
        Rule = ModelOffer.IdentityRule
        if aliases and upstream_model_id in aliases:
            return Identity(aliases[upstream_model_id], Rule.MAPPING)
        lowered = upstream_model_id.strip().lower()
        claims = sorted((published or {}).get(lowered, ()))
        if len(claims) == 1 and claims[0] != lowered:
            return Identity(claims[0], Rule.PUBLISHED)
        if "/" not in lowered and self.default_vendor:
            fallback = Identity(f"{self.default_vendor.lower()}/{lowered}", Rule.VENDOR)
        else:
            fallback = Identity(lowered, Rule.LOWERCASE)
        if len(claims) > 1:
            note = f"published for {', '.join(claims)}; add a mapping to choose"
            return Identity(fallback.canonical_id, Rule.CONFLICT, note)
        return fallback


@dataclass(frozen=True)
class Identity:
    canonical_id: str
    rule: str
    note: str = ""


class Health(models.TextChoices):
    OK = "ok", "OK"
    COOLING = "cooling", "Cooling down"
    EXHAUSTED = "exhausted", "Exhausted"
    INVALID = "invalid", "Invalid"


# What a key starts from (and returns to on reset).
FRESH_HEALTH = {
    "health": Health.OK,
    "cooldown_until": None,
    "last_error": "",
    "last_error_at": None,
}


def unusable_reason(
    *,
    health: str,
    last_error: str = "",
    cooldown_until: datetime | None = None,
    balance: Decimal | None = None,
    enabled: bool = True,
    provider_enabled: bool = True,
    probing: bool = False,
    now: datetime | None = None,
) -> str | None:
    """Why a key cannot serve now, or None: the one wording for routing, commands and pages."""
    if not provider_enabled:
        return "provider disabled"
    if not enabled:
        return "key disabled"
    if health == Health.INVALID:
        return f"invalid: {last_error or 'rejected by the provider'}"
    if health == Health.EXHAUSTED:
        return "exhausted (no credit left)"
    if cooldown_until is not None and cooldown_until > (now or timezone.now()):
        return f"cooling down until {timezone.localtime(cooldown_until):%H:%M:%S}"
    if probing:
        return "half-open: one probe request is testing it"
    if balance is not None and balance <= 0:
        return "balance is zero"
    return None


@dataclass(frozen=True)
class SecretCheck:
    """Whether ``KEYAOS_ENCRYPTION_KEYS`` decrypts the stored upstream secrets."""

    readable: int
    unreadable: tuple[str, ...]  # "provider:key" names, never secrets

    @property
    def none_readable(self) -> bool:
        """Secrets are stored and not one decrypts: the encryption key is wrong."""
        return bool(self.unreadable) and not self.readable

    def problem(self) -> str | None:
        if not self.unreadable:
            return None
        names = ", ".join(self.unreadable[:20]) + (" ..." if len(self.unreadable) > 20 else "")
        if self.none_readable:
            return (
                f"KEYAOS_ENCRYPTION_KEYS decrypts none of the {len(self.unreadable)} stored "
                f"upstream secrets ({names}): set the key they were encrypted with (a new key "
                "goes first, the old ones stay after it)"
            )
        return (
            f"{len(self.unreadable)} upstream secret(s) cannot be decrypted with "
            f"KEYAOS_ENCRYPTION_KEYS and are left out of routing: {names}"
        )


class UpstreamKeyQuerySet(models.QuerySet):
    def secret_check(self) -> SecretCheck:
        """Try to decrypt the secret of every key in the queryset (the admin's banner)."""
        readable, unreadable = 0, []
        for key in self.select_related("provider"):
            try:
                decrypt_secret(key.secret_encrypted)
            except SecretDecryptionError:
                unreadable.append(f"{key.provider.slug}:{key.name}")
            else:
                readable += 1
        return SecretCheck(readable, tuple(unreadable))

    """Every change of a key's health: one atomic UPDATE each, routing told when health moved."""

    def mark_invalid(self, reason: str) -> int:
        return self._transition(
            health=Health.INVALID, last_error=reason, last_error_at=timezone.now()
        )

    def mark_exhausted(self, reason: str) -> int:
        return self._transition(
            health=Health.EXHAUSTED, last_error=reason, last_error_at=timezone.now()
        )

    def mark(self, health: str | None, reason: str) -> int:
        """The state a failure calls for (``health_after(failure)``): invalid or exhausted
        change health; anything else only records the error."""
        if health == Health.INVALID:
            return self.mark_invalid(reason)
        if health == Health.EXHAUSTED:
            return self.mark_exhausted(reason)
        return self.note_error(reason)

    def recover(self) -> int:
        """Exhausted keys that have credit again serve again."""
        return self.filter(health=Health.EXHAUSTED)._transition(health=Health.OK)

    def reset(self, *, clear_error: bool = False) -> int:
        """Healthy, with no cooldown (a key check passed); the last error stays as history
        unless ``clear_error``."""
        changes = dict(FRESH_HEALTH)
        if not clear_error:
            del changes["last_error"], changes["last_error_at"]
        return self._transition(**changes)

    def cool_down(self, seconds: float, reason: str) -> int:
        """Shown in the admin. Routing reads live cooldowns from the cache, so no rebuild."""
        now = timezone.now()
        return self.update(
            cooldown_until=now + timedelta(seconds=seconds), last_error=reason, last_error_at=now
        )

    def end_cooldown(self, *, ended_by: datetime) -> int:
        """The gateway saw the key serve again: clear a cooldown that ends by ``ended_by`` (a
        later one was set since, and stays)."""
        return self.filter(cooldown_until__lte=ended_by).update(cooldown_until=None)

    def note_error(self, reason: str) -> int:
        return self.update(last_error=reason, last_error_at=timezone.now())

    def _transition(self, **changes) -> int:
        key_ids = list(self.order_by().values_list("pk", flat=True))
        changed = self.filter(pk__in=key_ids).update(**changes) if key_ids else 0
        if changed:
            routing_data_changed()
            data = {
                "event": "key_state",
                "key_ids": key_ids,
                "health": changes.get("health", ""),
                "reason": changes.get("last_error", ""),
            }
            logger.info(
                "upstream keys %s: health %s", key_ids, data["health"], extra={"data": data}
            )
        return changed


class UpstreamKey(models.Model):
    Health = Health

    class BalanceSource(models.TextChoices):
        AUTO = "auto", "Auto (provider's balance endpoint)"
        MANUAL = "manual", "Manual (entered by the operator)"

    provider = models.ForeignKey(Provider, on_delete=models.CASCADE, related_name="keys")
    label = models.CharField(max_length=100, blank=True)
    secret_encrypted = models.TextField(editable=False)
    secret_hash = models.CharField(max_length=64, editable=False)
    secret_masked = models.CharField("secret", max_length=40, editable=False)
    enabled = models.BooleanField(default=True)
    balance = models.DecimalField(
        **MONEY_DIGITS,
        null=True,
        blank=True,
        help_text="In the provider's currency; empty = unknown.",
    )
    balance_source = models.CharField(
        max_length=10, choices=BalanceSource.choices, default=BalanceSource.MANUAL
    )
    balance_updated_at = models.DateTimeField(null=True, blank=True)
    multiplier = models.DecimalField(
        max_digits=8,
        decimal_places=4,
        default=Decimal("1"),
        validators=[MinValueValidator(Decimal("0"))],
        help_text="Real cost relative to list price: 0.8 for discounted credits, 0 for free ones.",
    )
    health = models.CharField(max_length=10, choices=Health.choices, default=Health.OK)
    cooldown_until = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    last_error_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    objects = UpstreamKeyQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["provider", "secret_hash"], name="unique_key_per_provider"
            )
        ]
        ordering = ["provider__slug", "id"]

    def __str__(self) -> str:
        return f"{self.provider.slug}:{self.label or self.secret_masked}"

    @property
    def name(self) -> str:
        """What responses and logs call this key: its label, or its id; never the secret."""
        return self.label or f"key-{self.pk}"

    @property
    def current_health(self) -> str:
        """Health as an operator sees it now: a key whose cooldown is running is cooling down."""
        if (
            self.health == self.Health.OK
            and self.cooldown_until
            and self.cooldown_until > timezone.now()
        ):
            return self.Health.COOLING
        return self.health

    @property
    def current_health_label(self) -> str:
        return self.Health(self.current_health).label

    def set_secret(self, plain: str) -> None:
        plain = plain.strip()
        if not plain:
            raise ValueError("The secret is empty.")
        self.secret_encrypted = encrypt_secret(plain)
        self.secret_hash = secret_fingerprint(plain)
        self.secret_masked = mask_secret(plain)

    @property
    def secret(self) -> str:
        return decrypt_secret(self.secret_encrypted)

    def is_usable(self, now: datetime | None = None) -> bool:
        return self.unusable_reason(now) is None

    def unusable_reason(self, now: datetime | None = None) -> str | None:
        """Why routing skips this key, or None when it may serve."""
        return unusable_reason(
            health=self.health,
            last_error=self.last_error,
            cooldown_until=self.cooldown_until,
            balance=self.balance,
            enabled=self.enabled,
            provider_enabled=self.provider.enabled,
            now=now,
        )


UNPRICED = models.Q(input_price_per_mtok__isnull=True) | models.Q(
    output_price_per_mtok__isnull=True
)
"""An offer without an input or an output price: routing cannot cost it, so it does not serve."""


class ModelOfferQuerySet(models.QuerySet):
    def unpriced(self) -> ModelOfferQuerySet:
        """Active offers that do not serve for want of a price."""
        return self.filter(UNPRICED, active=True)


class ModelOffer(models.Model):
    class Kind(models.TextChoices):
        CHAT = "chat", "Chat"
        EMBEDDING = "embedding", "Embedding"

    class PriceSource(models.TextChoices):
        CATALOG = "catalog", "Provider catalog"
        MANUAL = "manual", "Set by the operator"

    class IdentityRule(models.TextChoices):
        MAPPING = "mapping", "Operator's mapping"
        PUBLISHED = "published", "Published id (OpenRouter's hugging_face_id or canonical_slug)"
        VENDOR = "vendor", "Provider's default vendor"
        LOWERCASE = "lowercase", "Native id, lowercased"
        CONFLICT = "conflict", "Conflict: several canonical ids publish this id"

    provider = models.ForeignKey(Provider, on_delete=models.CASCADE, related_name="offers")
    upstream_model_id = models.CharField(max_length=200)
    canonical_id = models.CharField(max_length=200, db_index=True)
    identity_rule = models.CharField(
        max_length=10,
        choices=IdentityRule.choices,
        default=IdentityRule.LOWERCASE,
        help_text="Which rule gave the canonical id.",
    )
    identity_note = models.CharField(max_length=300, blank=True)
    display_name = models.CharField(max_length=200, blank=True)
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.CHAT)
    input_price_per_mtok = models.DecimalField(**PRICE_DIGITS, null=True, blank=True)
    output_price_per_mtok = models.DecimalField(**PRICE_DIGITS, null=True, blank=True)
    cached_input_price_per_mtok = models.DecimalField(**PRICE_DIGITS, null=True, blank=True)
    price_tiers = models.JSONField(default=dict, blank=True)
    price_source = models.CharField(
        max_length=10, choices=PriceSource.choices, default=PriceSource.CATALOG
    )
    context_length = models.PositiveIntegerField(null=True, blank=True)
    active = models.BooleanField(default=True)
    first_seen_at = models.DateTimeField(default=timezone.now)
    last_refreshed_at = models.DateTimeField(null=True, blank=True)

    objects = ModelOfferQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["provider", "upstream_model_id"], name="unique_offer_per_provider"
            )
        ]
        indexes = [models.Index(fields=["canonical_id", "active"])]
        ordering = ["canonical_id", "provider__slug"]

    def __str__(self) -> str:
        return f"{self.canonical_id} @ {self.provider.slug}"

    @property
    def currency(self) -> str:
        return self.provider.currency

    @property
    def has_prices(self) -> bool:
        return self.input_price_per_mtok is not None and self.output_price_per_mtok is not None

    def price_tuple(self) -> tuple[Decimal | None, Decimal | None, Decimal | None]:
        return (
            self.input_price_per_mtok,
            self.output_price_per_mtok,
            self.cached_input_price_per_mtok,
        )

    def record_price(self) -> PriceHistory:
        return PriceHistory.objects.create(
            offer=self,
            input_price_per_mtok=self.input_price_per_mtok,
            output_price_per_mtok=self.output_price_per_mtok,
            cached_input_price_per_mtok=self.cached_input_price_per_mtok,
        )


class PriceHistory(models.Model):
    """One row per price an offer has had, written when the price changes."""

    offer = models.ForeignKey(ModelOffer, on_delete=models.CASCADE, related_name="price_history")
    input_price_per_mtok = models.DecimalField(**PRICE_DIGITS, null=True, blank=True)
    output_price_per_mtok = models.DecimalField(**PRICE_DIGITS, null=True, blank=True)
    cached_input_price_per_mtok = models.DecimalField(**PRICE_DIGITS, null=True, blank=True)
    recorded_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-recorded_at"]
        verbose_name_plural = "price history"

    def __str__(self) -> str:
        return f"{self.offer_id} at {self.recorded_at:%Y-%m-%d %H:%M}"


class ModelAlias(models.Model):
    """Maps a provider's native model id to the canonical id it serves."""

    provider = models.ForeignKey(Provider, on_delete=models.CASCADE, related_name="aliases")
    upstream_model_id = models.CharField(max_length=200)
    canonical_id = models.CharField(max_length=200)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["provider", "upstream_model_id"], name="unique_alias_per_provider"
            )
        ]
        verbose_name_plural = "model aliases"

    def __str__(self) -> str:
        return f"{self.provider.slug}:{self.upstream_model_id} -> {self.canonical_id}"

    def save(self, *args, **kwargs) -> None:
        self.canonical_id = self.canonical_id.strip().lower()
        super().save(*args, **kwargs)


class PublishedIdentity(models.Model):
    """A native id (lowercased) that the identity source says a canonical model is served as.

    From OpenRouter's catalog: each model's ``hugging_face_id`` (the id DeepInfra, Together and
    vLLM use) and ``canonical_slug``. Replaced as a whole by each refresh that read the source.
    """

    native_id = models.CharField(max_length=200, db_index=True)
    canonical_id = models.CharField(max_length=200)
    source = models.CharField(max_length=300)
    fetched_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["native_id", "canonical_id"], name="unique_published_identity"
            )
        ]
        ordering = ["native_id", "canonical_id"]

    def __str__(self) -> str:
        return f"{self.native_id} -> {self.canonical_id}"

    @classmethod
    def as_map(cls) -> dict[str, set[str]]:
        published: dict[str, set[str]] = {}
        for native_id, canonical_id in cls.objects.values_list("native_id", "canonical_id"):
            published.setdefault(native_id, set()).add(canonical_id)
        return published


class RefreshRun(models.Model):
    class Trigger(models.TextChoices):
        SCHEDULE = "schedule", "Schedule"
        COMMAND = "command", "Command"
        ADMIN = "admin", "Admin button"

    trigger = models.CharField(max_length=10, choices=Trigger.choices)
    started_at = models.DateTimeField(default=timezone.now, db_index=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    error_count = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"Refresh {self.started_at:%Y-%m-%d %H:%M:%S} ({self.trigger})"

    @property
    def ok(self) -> bool:
        return self.duration_ms is not None and self.error_count == 0

    def summary(self) -> str:
        """One sentence for the admin button and ``manage.py refresh_models``."""
        results = list(self.results.all())
        return (
            f"Refreshed {len(results)} provider(s) in {self.duration_ms or 0} ms: "
            f"{sum(r.added for r in results)} offer(s) added, "
            f"{sum(r.updated for r in results)} updated, "
            f"{sum(r.deactivated for r in results)} deactivated, "
            f"{sum(r.balances_updated for r in results)} balance(s) read."
            + "".join(f" {r.unpriced_note()}" for r in results if r.unpriced_models)
        )


UNPRICED_NAMED = 5


class RefreshResult(models.Model):
    """What one refresh run did for one provider."""

    run = models.ForeignKey(RefreshRun, on_delete=models.CASCADE, related_name="results")
    provider = models.ForeignKey(Provider, on_delete=models.SET_NULL, null=True)
    provider_slug = models.CharField(max_length=50)
    offers_seen = models.PositiveIntegerField(default=0)
    added = models.PositiveIntegerField(default=0)
    updated = models.PositiveIntegerField(default=0)
    deactivated = models.PositiveIntegerField(default=0)
    balances_updated = models.PositiveIntegerField(default=0)
    duration_ms = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)
    unpriced_models = models.JSONField(
        default=list, blank=True, help_text="Active offers without a price: they do not serve."
    )

    class Meta:
        ordering = ["provider_slug"]

    def __str__(self) -> str:
        return self.provider_slug

    def unpriced_note(self) -> str:
        """Which offers do not serve for want of a price, and the fix."""
        names = ", ".join(self.unpriced_models[:UNPRICED_NAMED])
        more = len(self.unpriced_models) - UNPRICED_NAMED
        if more > 0:
            names += f" and {more} more"
        return (
            f"{self.provider_slug}: {len(self.unpriced_models)} offer(s) have no price and do not "
            f"serve ({names}): set a price under Model offers or with manage.py set_price "
            "(0 for a free local model)."
        )


class BalanceReading(models.Model):
    """A provider-reported balance next to what Keyaos had counted down to: the drift."""

    key = models.ForeignKey(UpstreamKey, on_delete=models.CASCADE, related_name="balance_readings")
    read_at = models.DateTimeField(default=timezone.now, db_index=True)
    provider_balance = models.DecimalField(**MONEY_DIGITS)
    local_balance = models.DecimalField(**MONEY_DIGITS, null=True, blank=True)
    drift = models.DecimalField(
        **MONEY_DIGITS, null=True, blank=True, help_text="Provider figure minus local figure."
    )

    class Meta:
        ordering = ["-read_at"]

    def __str__(self) -> str:
        return f"{self.key} {self.provider_balance} at {self.read_at:%Y-%m-%d %H:%M}"

"""What an operator changes by hand: providers, upstream keys, manual prices, secret rotation.

The management commands and the admin both call these, so a rule (a duplicate key, a negative
price, the seeding of DeepSeek's prices) holds the same whichever way the operator works.
"""

from __future__ import annotations

import difflib
import json
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from django.core.exceptions import ValidationError
from django.core.validators import URLValidator, validate_slug
from django.db import IntegrityError, transaction
from django.utils import timezone

from providers.crypto import reencrypt_secret, secret_fingerprint
from providers.identity import apply_identity, provider_aliases
from providers.models import FRESH_HEALTH, ModelOffer, Provider, PublishedIdentity, UpstreamKey
from providers.presets import PRESETS, ProviderPreset

CUSTOM_PRESET = "openai-compatible"
SEED_DIR = Path(__file__).resolve().parent / "seed"

_currency_re = re.compile(r"^[A-Z]{3}$")
_validate_url = URLValidator(schemes=["http", "https"])


class SetupError(ValueError):
    """Input the operator must fix; the message says what and how."""


class DuplicateUpstreamKey(SetupError):
    pass


def parse_amount(text: str, *, what: str) -> Decimal:
    """A non-negative, finite Decimal from operator input, or a SetupError naming ``what``."""
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise SetupError(f"{what} must be a number such as 0.5, not {text!r}.") from None
    if not value.is_finite():
        raise SetupError(f"{what} must be a finite number, not {text!r}.")
    if value < 0:
        raise SetupError(f"{what} cannot be negative ({text}).")
    return value


def provider_fields(
    *,
    slug: str,
    preset: str,
    base_url: str | None = None,
    currency: str | None = None,
    name: str | None = None,
) -> dict[str, str]:
    """The columns of a new Provider: the preset's values, overridden by what the operator gave."""
    chosen = PRESETS.get(preset)
    if chosen is None:
        raise SetupError(f"Unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}.")
    try:
        validate_slug(slug)
    except ValidationError:
        raise SetupError(
            f"{slug!r} is not a valid slug: use letters, numbers, hyphens or underscores."
        ) from None
    if Provider.objects.filter(slug=slug).exists():
        raise SetupError(f"A provider with the slug {slug!r} already exists.")
    if chosen.slug == CUSTOM_PRESET and not base_url:
        raise SetupError(
            "An OpenAI-compatible provider needs its base URL (up to and including /v1)."
        )
    fields = chosen.provider_fields()
    fields["base_url"] = _checked_url(base_url or chosen.base_url)
    fields["currency"] = _checked_currency(currency or chosen.currency)
    fields["name"] = name or (slug if chosen.slug == CUSTOM_PRESET else chosen.name)
    return fields


def _checked_url(url: str) -> str:
    url = url.strip()
    try:
        _validate_url(url)
    except ValidationError:
        raise SetupError(f"{url!r} is not a valid http(s) URL.") from None
    return url


def _checked_currency(code: str) -> str:
    code = code.strip().upper()
    if not _currency_re.match(code):
        raise SetupError(f"{code!r} is not a currency code: use three letters such as USD or CNY.")
    return code


@transaction.atomic
def create_provider(
    *,
    slug: str,
    preset: str,
    base_url: str | None = None,
    currency: str | None = None,
    name: str | None = None,
) -> Provider:
    fields = provider_fields(
        slug=slug, preset=preset, base_url=base_url, currency=currency, name=name
    )
    provider = Provider.objects.create(slug=slug, **fields)
    seed_prices(provider, PRESETS[preset])
    return provider


def seed_prices(provider: Provider, preset: ProviderPreset) -> int:
    """Create the preset's hand-maintained prices as manual offers; returns how many.

    Seed prices are in one currency: a provider billed in another gets none rather than wrong ones.
    """
    if not preset.seed_prices:
        return 0
    seed = json.loads((SEED_DIR / preset.seed_prices).read_text())
    if seed["currency"] != provider.currency:
        return 0
    for row in seed["prices"]:
        identity = provider.identify(row["model"], published=PublishedIdentity.as_map())
        offer = ModelOffer.objects.create(
            provider=provider,
            upstream_model_id=row["model"],
            canonical_id=identity.canonical_id,
            identity_rule=identity.rule,
            identity_note=identity.note,
            input_price_per_mtok=Decimal(row["input"]),
            output_price_per_mtok=Decimal(row["output"]),
            cached_input_price_per_mtok=_optional_decimal(row.get("cached_input")),
            context_length=row.get("context_length"),
            price_source=ModelOffer.PriceSource.MANUAL,
        )
        offer.record_price()
    return len(seed["prices"])


def _optional_decimal(value: str | None) -> Decimal | None:
    return None if value in (None, "") else Decimal(value)


def ensure_secret_is_new(
    *, provider: Provider, secret: str, exclude: UpstreamKey | None = None
) -> None:
    """Raise DuplicateUpstreamKey, naming the stored key (never the secret), if it is known."""
    existing = UpstreamKey.objects.filter(
        provider=provider, secret_hash=secret_fingerprint(secret.strip())
    )
    if exclude is not None and exclude.pk:
        existing = existing.exclude(pk=exclude.pk)
    duplicate = existing.first()
    if duplicate is not None:
        raise DuplicateUpstreamKey(
            f"This secret is already stored for {provider.slug} as key #{duplicate.pk} "
            f"({duplicate.label or 'no label'}, {duplicate.secret_masked})."
        )


@transaction.atomic
def add_upstream_key(
    *,
    provider: Provider,
    secret: str,
    label: str = "",
    multiplier: Decimal = Decimal("1"),
    balance: Decimal | None = None,
) -> UpstreamKey:
    secret = secret.strip()
    if not secret:
        raise SetupError("The secret is empty.")
    if multiplier < 0:
        raise SetupError("The multiplier cannot be negative.")
    if balance is not None and balance < 0:
        raise SetupError("The balance cannot be negative.")
    ensure_secret_is_new(provider=provider, secret=secret)
    key = UpstreamKey(provider=provider, label=label.strip(), multiplier=multiplier)
    key.set_secret(secret)
    if balance is not None:
        key.balance = balance
        key.balance_source = UpstreamKey.BalanceSource.MANUAL
        key.balance_updated_at = timezone.now()
    elif provider.balance_method != Provider.BalanceMethod.NONE:
        key.balance_source = UpstreamKey.BalanceSource.AUTO
    else:
        key.balance_source = UpstreamKey.BalanceSource.MANUAL
    try:
        with transaction.atomic():
            key.save()
    except IntegrityError:
        # Another process stored the same secret between the check and the insert.
        ensure_secret_is_new(provider=provider, secret=secret)
        raise
    return key


def replace_upstream_secret(*, key: UpstreamKey, secret: str) -> None:
    """Give ``key`` a new secret (not saved); a new secret starts healthy."""
    ensure_secret_is_new(provider=key.provider, secret=secret, exclude=key)
    key.set_secret(secret)
    for name, value in FRESH_HEALTH.items():
        setattr(key, name, value)


def native_model_id(
    provider: Provider, model: str, *, create: bool = False, create_hint: str = "use --create"
) -> str:
    """The provider's own id for ``model``: its native id (any casing) or the canonical id one
    of its offers serves. An id the provider's catalog does not list is refused, with the close
    matches, unless ``create`` (a provider whose catalog lists no models): an offer under an id
    the upstream rejects would fail every request routed to it."""
    model = model.strip()
    if not model:
        raise SetupError("The model id is empty.")
    known = dict(provider.offers.values_list("upstream_model_id", "canonical_id"))
    if model in known:
        return model
    lowered = model.lower()
    natives = sorted({native for native in known if native.lower() == lowered})
    natives = natives or sorted(n for n, canonical in known.items() if canonical == lowered)
    if len(natives) == 1:
        return natives[0]
    if natives:
        raise SetupError(
            f"{model!r} names several models of {provider.slug}: {', '.join(natives)}. "
            "Give the provider's own id."
        )
    if create:
        return model
    candidates = list(known) + sorted(set(known.values()))
    close = difflib.get_close_matches(model, candidates, n=5, cutoff=0.5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    listed = (
        f"its last catalog lists {len(known)} model(s)"
        if known
        else "it has no catalog yet (refresh it first)"
    )
    raise SetupError(
        f"{provider.slug} does not list the model {model!r}; {listed}.{hint} "
        f"To add it anyway (a provider whose catalog lists no models), {create_hint}."
    )


@transaction.atomic
def set_price(
    *,
    provider: Provider,
    model: str,
    input_per_mtok: Decimal,
    output_per_mtok: Decimal,
    cached_input_per_mtok: Decimal | None = None,
    create: bool = False,
) -> ModelOffer:
    """Set an offer's price per 1M tokens in the provider's currency; a refresh keeps it.

    ``model`` may be the canonical id: the price goes to the provider's native offer of it."""
    model = native_model_id(provider, model, create=create)
    for what, price in [
        ("The input price", input_per_mtok),
        ("The output price", output_per_mtok),
        ("The cached input price", cached_input_per_mtok),
    ]:
        if price is not None and (not price.is_finite() or price < 0):
            raise SetupError(f"{what} must be a non-negative number.")
    offer = (
        ModelOffer.objects.select_for_update()
        .filter(provider=provider, upstream_model_id=model)
        .first()
    )
    created = offer is None
    if created:
        offer = ModelOffer(provider=provider, upstream_model_id=model)
    old_prices = offer.price_tuple()
    apply_identity(offer, provider, provider_aliases(provider), PublishedIdentity.as_map())
    offer.input_price_per_mtok = input_per_mtok
    offer.output_price_per_mtok = output_per_mtok
    offer.cached_input_price_per_mtok = cached_input_per_mtok
    offer.price_source = ModelOffer.PriceSource.MANUAL
    offer.active = True
    offer.save()
    if created or old_prices != offer.price_tuple():
        offer.record_price()
    return offer


@transaction.atomic
def rotate_upstream_secrets() -> int:
    """Re-encrypt every upstream secret with the first key of KEYAOS_ENCRYPTION_KEYS."""
    keys = list(UpstreamKey.objects.select_for_update().only("pk", "secret_encrypted"))
    for key in keys:
        key.secret_encrypted = reencrypt_secret(key.secret_encrypted)
    UpstreamKey.objects.bulk_update(keys, ["secret_encrypted"], batch_size=500)
    return len(keys)

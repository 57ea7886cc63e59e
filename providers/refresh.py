"""The refresh of the model catalog, prices and upstream balances.

``refresh_providers`` is the one function behind the 5-minute schedule, ``manage.py
refresh_models`` and the admin button. The network part runs in worker threads (one per provider,
no database access there); each provider's changes are then saved in one transaction, so a
provider that fails, hangs or answers garbage leaves its offers exactly as they were and does not
hold up the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from keyaos.lib import metrics
from keyaos.lib.signals import routing_data_changed
from providers.adapters import (
    CatalogEntry,
    KeyCheckResult,
    UpstreamError,
    check_key,
    fetch_balance,
    fetch_catalog,
    fetch_public_catalog,
    new_client,
)
from providers.crypto import SecretDecryptionError
from providers.identity import provider_aliases, published_ids, rekey_offers, store_published
from providers.models import (
    BalanceReading,
    Identity,
    ModelOffer,
    Provider,
    PublishedIdentity,
    RefreshResult,
    RefreshRun,
    UpstreamKey,
)
from providers.upstream import classify, health_after, redact

logger = logging.getLogger(__name__)

MAX_PARALLEL_FETCHES = 8
IDENTITY_SOURCE_SLUG = "(model identities)"
PRICE_FIELDS = ("input_price_per_mtok", "output_price_per_mtok", "cached_input_price_per_mtok")


class UnknownProvider(Provider.DoesNotExist):
    pass


@dataclass
class OfferChanges:
    added: int = 0
    updated: int = 0
    deactivated: int = 0

    @property
    def any(self) -> bool:
        return bool(self.added or self.updated or self.deactivated)


@dataclass
class _Job:
    """What a worker thread needs for one provider, read from the database beforehand."""

    provider: Provider
    catalog_secret: str = ""
    balance_keys: list[tuple[int, str, str]] = field(default_factory=list)  # pk, name, secret
    errors: list[str] = field(default_factory=list)

    @property
    def secrets(self) -> list[str]:
        return [self.catalog_secret, *(secret for _, _, secret in self.balance_keys)]


@dataclass
class _Fetched:
    entries: list[CatalogEntry] | None = None  # None: the catalog could not be trusted
    balances: dict[int, Decimal] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    duration_ms: int = 0


def refresh_providers(
    *,
    trigger: str,
    provider_slug: str | None = None,
    progress: Callable[[RefreshResult], None] | None = None,
) -> RefreshRun:
    """Refresh every enabled provider (or the one named, even if disabled) and record the run."""
    providers = _providers_to_refresh(provider_slug)
    run = RefreshRun.objects.create(trigger=trigger)
    started = time.monotonic()
    jobs = [_prepare(provider) for provider in providers]
    public_url = _public_identity_url(provider_slug)
    if jobs or public_url:
        with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_FETCHES, len(jobs) + 1)) as pool:
            public = pool.submit(_fetch_public, public_url) if public_url else None
            futures = [pool.submit(_fetch, job) for job in jobs]
            fetched = [future.result() for future in futures]
        results = [_apply_public(run, public_url, public.result())] if public else []
        _store_provider_identities(jobs, fetched)
        published = PublishedIdentity.as_map()
        for job, each in zip(jobs, fetched, strict=True):
            results.append(_apply(run, job, each, published))
        if rekey_offers():
            logger.info("refresh: offers re-keyed to new published model ids")
        for result in results:
            _log(result)
            if progress is not None:
                progress(result)
    run.duration_ms = _elapsed_ms(started)
    run.error_count = run.results.exclude(error="").count()
    run.save(update_fields=["duration_ms", "error_count"])
    return run


def _providers_to_refresh(slug: str | None) -> list[Provider]:
    if slug is None:
        return list(Provider.objects.filter(enabled=True).order_by("slug"))
    try:
        return [Provider.objects.get(slug=slug)]
    except Provider.DoesNotExist:
        known = ", ".join(Provider.objects.values_list("slug", flat=True)) or "none yet"
        raise UnknownProvider(f"No provider with the slug {slug!r} (known: {known}).") from None


def _public_identity_url(slug: str | None) -> str:
    """OpenRouter's public list is read only by a full refresh, and only when no OpenRouter
    provider is configured (its own catalog is the source then)."""
    if slug is not None or not settings.KEYAOS_IDENTITY_SOURCE_URL:
        return ""
    configured = Provider.objects.filter(
        enabled=True, catalog_format=Provider.CatalogFormat.OPENROUTER
    )
    return "" if configured.exists() else settings.KEYAOS_IDENTITY_SOURCE_URL


def _fetch_public(url: str) -> _Fetched:
    started = time.monotonic()
    fetched = _Fetched()
    try:
        with new_client() as client:
            fetched.entries = fetch_public_catalog(url, client=client)
    except UpstreamError as exc:
        fetched.errors.append(f"identity source: {exc}")
    except Exception as exc:
        logger.warning("refresh: the identity source raised %s", type(exc).__name__)
        fetched.errors.append(f"identity source: unexpected {type(exc).__name__}")
    fetched.duration_ms = _elapsed_ms(started)
    return fetched


def _apply_public(run: RefreshRun, url: str, fetched: _Fetched) -> RefreshResult:
    """The public list's published ids are stored; its result row says how it went."""
    error = "; ".join(fetched.errors)
    if fetched.entries:
        store_published(published_ids(fetched.entries), source=url)
    elif not error:
        error = "identity source: the list was empty; published ids left as they were"
    return RefreshResult.objects.create(
        run=run,
        provider_slug=IDENTITY_SOURCE_SLUG,
        offers_seen=len(fetched.entries or ()),
        duration_ms=fetched.duration_ms,
        error=error,
    )


def _store_provider_identities(jobs: list[_Job], fetched: list[_Fetched]) -> None:
    """A refreshed OpenRouter provider's catalog is the identity source."""
    sources = [
        (job.provider.slug, each.entries)
        for job, each in zip(jobs, fetched, strict=True)
        if job.provider.catalog_format == Provider.CatalogFormat.OPENROUTER and each.entries
    ]
    if sources:
        entries = [entry for _, each in sources for entry in each]
        store_published(published_ids(entries), source=", ".join(slug for slug, _ in sources))


def _prepare(provider: Provider) -> _Job:
    job = _Job(provider=provider)
    wants_balances = provider.balance_method != Provider.BalanceMethod.NONE
    for key in provider.keys.filter(enabled=True).order_by("id"):
        if key.health == UpstreamKey.Health.INVALID:
            continue
        try:
            secret = key.secret
        except SecretDecryptionError as exc:
            job.errors.append(f"key {key.name}: {exc}")
            continue
        job.catalog_secret = job.catalog_secret or secret
        if wants_balances and key.balance_source == UpstreamKey.BalanceSource.AUTO:
            job.balance_keys.append((key.pk, key.name, secret))
    return job


def _fetch(job: _Job) -> _Fetched:
    """Runs in a worker thread: network only, never raises."""
    started = time.monotonic()
    fetched = _Fetched(errors=list(job.errors))
    with new_client() as client:
        entries, reachable = _guarded(
            fetched,
            job,
            "catalog",
            lambda: fetch_catalog(job.provider, secret=job.catalog_secret, client=client),
        )
        if entries:
            fetched.entries = entries
        elif entries is not None:
            fetched.errors.append("catalog: the provider listed no models; offers left as is")
        for key_id, key_name, secret in job.balance_keys:
            if not reachable:
                fetched.errors.append(f"balance of key {key_name}: skipped, provider unreachable")
                continue
            balance, reachable = _guarded(
                fetched,
                job,
                f"balance of key {key_name}",
                lambda secret=secret: fetch_balance(job.provider, secret, client=client),
            )
            if balance is not None:
                fetched.balances[key_id] = balance
    fetched.duration_ms = _elapsed_ms(started)
    return fetched


def _guarded[T](
    fetched: _Fetched, job: _Job, what: str, call: Callable[[], T]
) -> tuple[T | None, bool]:
    """``call()``, or None with its error recorded; and whether the provider answered at all."""
    try:
        return call(), True
    except UpstreamError as exc:
        fetched.errors.append(f"{what}: {exc}")
        return None, not exc.unreachable
    except Exception as exc:
        logger.warning("refresh %s: %s raised %s", job.provider.slug, what, type(exc).__name__)
        message = f"{what}: unexpected {type(exc).__name__}: {exc}"
        fetched.errors.append(redact(message, *job.secrets))
        return None, True


def _apply(
    run: RefreshRun, job: _Job, fetched: _Fetched, published: dict[str, set[str]]
) -> RefreshResult:
    started = time.monotonic()
    provider = job.provider
    result = RefreshResult(
        run=run,
        provider=provider,
        provider_slug=provider.slug,
        offers_seen=len(fetched.entries or ()),
    )
    errors = list(fetched.errors)
    now = timezone.now()
    try:
        with transaction.atomic():
            changes = OfferChanges()
            if fetched.entries is not None:
                changes = sync_offers(provider, fetched.entries, now=now, published=published)
            balances_updated = sum(
                store_balance(key_id, balance, now=now)
                for key_id, balance in fetched.balances.items()
            )
            if changes.any or balances_updated:
                routing_data_changed()
    except Exception as exc:
        logger.exception("refresh %s: saving failed", provider.slug)
        errors.append(redact(f"saving: {type(exc).__name__}: {exc}", *job.secrets))
    else:
        result.added, result.updated = changes.added, changes.updated
        result.deactivated, result.balances_updated = changes.deactivated, balances_updated
    result.error = "; ".join(errors)
    result.unpriced_models = list(
        provider.offers.unpriced()
        .order_by("upstream_model_id")
        .values_list("upstream_model_id", flat=True)
    )
    result.duration_ms = fetched.duration_ms + _elapsed_ms(started)
    result.save()
    return result


def sync_offers(
    provider: Provider,
    entries: list[CatalogEntry],
    *,
    now: datetime | None = None,
    published: dict[str, set[str]] | None = None,
) -> OfferChanges:
    """Make the provider's offers match a catalog that was fetched successfully and is not empty.

    New ids become offers, known ones are updated (identity re-applied from the mappings and
    the published ids, prices unless the operator set them), and active offers the catalog no
    longer lists are deactivated. Every new or changed price gets a PriceHistory row.
    """
    now = now or timezone.now()
    aliases = provider_aliases(provider)
    published = PublishedIdentity.as_map() if published is None else published
    existing = {offer.upstream_model_id: offer for offer in provider.offers.all()}
    changes = OfferChanges()
    created, changed, repriced = [], [], []
    changed_fields: set[str] = set()
    for entry in entries:
        identity = provider.identify(entry.upstream_model_id, aliases, published)
        offer = existing.get(entry.upstream_model_id)
        if offer is None:
            created.append(_new_offer(provider, entry, identity, now))
            continue
        fields, price_changed = _merge(offer, entry, identity)
        if fields:
            changed.append(offer)
            changed_fields |= fields
        if price_changed:
            repriced.append(offer)

    if created:
        ModelOffer.objects.bulk_create(created)
        created_ids = [o.upstream_model_id for o in created if _has_any_price(o)]
        repriced += provider.offers.filter(upstream_model_id__in=created_ids)
    if changed:
        ModelOffer.objects.bulk_update(changed, sorted(changed_fields), batch_size=200)
    for offer in repriced:
        offer.record_price()

    seen = {entry.upstream_model_id for entry in entries}
    missing = [o.pk for o in existing.values() if o.active and o.upstream_model_id not in seen]
    if missing:
        ModelOffer.objects.filter(pk__in=missing).update(active=False)
    provider.offers.filter(active=True).update(last_refreshed_at=now)

    changes.added, changes.updated, changes.deactivated = len(created), len(changed), len(missing)
    return changes


def _has_any_price(offer: ModelOffer) -> bool:
    return any(price is not None for price in offer.price_tuple())


def _new_offer(
    provider: Provider, entry: CatalogEntry, identity: Identity, now: datetime
) -> ModelOffer:
    return ModelOffer(
        provider=provider,
        upstream_model_id=entry.upstream_model_id,
        canonical_id=identity.canonical_id,
        identity_rule=identity.rule,
        identity_note=identity.note[:300],
        display_name=entry.display_name,
        kind=entry.kind,
        input_price_per_mtok=entry.input_price_per_mtok,
        output_price_per_mtok=entry.output_price_per_mtok,
        cached_input_price_per_mtok=entry.cached_input_price_per_mtok,
        price_tiers=entry.price_tiers,
        context_length=entry.context_length,
        first_seen_at=now,
        last_refreshed_at=now,
    )


def _merge(offer: ModelOffer, entry: CatalogEntry, identity: Identity) -> tuple[set[str], bool]:
    """Copy what the catalog knows onto ``offer``; returns the changed fields and whether the
    price changed. A value the catalog lacks, and a price the operator set, stay as they are."""
    wanted = {
        "canonical_id": identity.canonical_id,
        "identity_rule": identity.rule,
        "identity_note": identity.note[:300],
        "kind": entry.kind,
        "active": True,
    }
    if entry.display_name:
        wanted["display_name"] = entry.display_name
    if entry.context_length is not None:
        wanted["context_length"] = entry.context_length
    takes_prices = entry.has_prices and offer.price_source != ModelOffer.PriceSource.MANUAL
    if takes_prices:
        wanted.update(zip(PRICE_FIELDS, entry.price_tuple(), strict=True))
        wanted["price_tiers"] = entry.price_tiers
    old_prices = offer.price_tuple()
    fields = set()
    for name, value in wanted.items():
        if getattr(offer, name) != value:
            setattr(offer, name, value)
            fields.add(name)
    return fields, takes_prices and offer.price_tuple() != old_prices


def store_balance(key_id: int, balance: Decimal, *, now: datetime | None = None) -> int:
    """Save a fetched balance; a key that ran dry and now has credit serves again.

    The figure Keyaos had counted down to is read under a row lock (no ledger debit slips in
    between) and kept beside the provider's in a BalanceReading: their difference is the drift.
    """
    now = now or timezone.now()
    with transaction.atomic():
        local = (
            UpstreamKey.objects.select_for_update()
            .filter(pk=key_id)
            .values_list("balance", flat=True)
            .first()
        )
        updated = UpstreamKey.objects.filter(pk=key_id).update(
            balance=balance, balance_updated_at=now
        )
        if not updated:
            return 0
        BalanceReading.objects.create(
            key_id=key_id,
            read_at=now,
            provider_balance=balance,
            local_balance=local,
            drift=None if local is None else balance - local,
        )
        if balance > 0:
            UpstreamKey.objects.filter(pk=key_id).recover()
    return updated


def refresh_key_balance(key: UpstreamKey) -> Decimal | None:
    """Fetch and store one key's balance now (the admin action).

    Returns None, changing nothing, when the provider has no balance endpoint or the operator
    keeps this key's balance by hand. Raises BalanceError when the provider does not answer.
    """
    provider = key.provider
    if (
        provider.balance_method == Provider.BalanceMethod.NONE
        or key.balance_source != UpstreamKey.BalanceSource.AUTO
    ):
        return None
    balance = fetch_balance(provider, key.secret)
    if balance is None:
        return None
    with transaction.atomic():
        store_balance(key.pk, balance)
        routing_data_changed()
    key.refresh_from_db(fields=["balance", "balance_updated_at", "health"])
    return balance


def validate_key(key: UpstreamKey) -> KeyCheckResult:
    """Run the provider's key check and record its verdict on the key."""
    try:
        result = check_key(key.provider, key.secret)
    except SecretDecryptionError as exc:
        result = KeyCheckResult(False, None, str(exc))
    keys = UpstreamKey.objects.filter(pk=key.pk)
    if result.ok:
        keys.reset()
    else:
        status = result.status_code
        failure = None if status is None else classify(status, result.message)
        keys.mark(health_after(failure), f"key check: {result.message}")
    key.refresh_from_db(fields=["health", "cooldown_until", "last_error", "last_error_at"])
    return result


def describe(result: RefreshResult) -> str:
    """One line per provider, for the log and the command's output."""
    counts = (
        f"{result.offers_seen} seen, {result.added} added, {result.updated} updated, "
        f"{result.deactivated} deactivated, {result.balances_updated} balance(s), "
        f"{result.duration_ms} ms"
    )
    if result.error:
        return f"{result.provider_slug}: FAILED ({counts}): {result.error}"
    if result.unpriced_models:
        return f"{result.provider_slug}: {counts}. WARNING {result.unpriced_note()}"
    return f"{result.provider_slug}: {counts}"


def _log(result: RefreshResult) -> None:
    """The log line (a JSON object with KEYAOS_LOG_FORMAT=json) and the refresh metrics."""
    level = logging.WARNING if result.error or result.unpriced_models else logging.INFO
    data = {
        "event": "refresh",
        "provider": result.provider_slug,
        "ok": not result.error,
        "offers_seen": result.offers_seen,
        "added": result.added,
        "updated": result.updated,
        "deactivated": result.deactivated,
        "balances_updated": result.balances_updated,
        "duration_ms": result.duration_ms,
        "error": result.error,
        "unpriced_models": result.unpriced_models,
    }
    logger.log(level, "refresh %s", describe(result), extra={"data": data})
    metrics.observe_refresh(
        result.provider_slug, duration_s=result.duration_ms / 1000, failed=bool(result.error)
    )


def _elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)

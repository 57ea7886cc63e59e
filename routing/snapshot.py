"""The in-process snapshot of everything routing reads: offers, prices, keys, rates, client keys.

Built in one go from the database (off the event loop), then read per request without a query.
``routing.runtime`` rebuilds it when ``SnapshotVersion`` changes.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import cached_property

import httpx
from django.conf import settings

from billing.costs import Prices
from billing.currency import load_rates
from billing.limits import KeyLimits
from billing.models import ApiKey
from providers.crypto import SecretDecryptionError
from providers.models import ModelOffer, Provider, SecretCheck, UpstreamEndpoint, UpstreamKey
from providers.presets import PRESETS
from routing.models import SnapshotVersion


@dataclass(frozen=True)
class ProviderInfo(UpstreamEndpoint):
    id: int
    slug: str
    name: str
    base_url: str
    currency: str
    auth_style: str
    read_timeout_s: float
    prompt_cache_ttl_s: float = 300.0
    native: tuple[tuple[str, str], ...] = ()  # (client protocol, its base URL) served natively
    reasoning_parameter: str = ""  # where OpenRouter-style reasoning options go, if anywhere

    def native_base(self, protocol: str) -> str | None:
        return next((url for name, url in self.native if name == protocol), None)

    def request_url(self, endpoint: str) -> httpx.URL:
        """Parsed once per endpoint: parsing a URL is a good part of building a request."""
        url = self._urls.get(endpoint)
        if url is None:
            url = self._urls[endpoint] = httpx.URL(self.url(endpoint))
        return url

    @cached_property
    def _urls(self) -> dict[str, httpx.URL]:
        return {}

    @cached_property
    def timeouts(self) -> dict[str, float]:
        """The timeout extension of a request: connecting is quick, a first token may not be."""
        connect_s = settings.KEYAOS_CONNECT_TIMEOUT_S
        return httpx.Timeout(connect_s, read=self.read_timeout_s, pool=connect_s).as_dict()


@dataclass(frozen=True)
class KeyInfo:
    id: int
    provider_id: int
    name: str
    masked: str
    secret: str = field(repr=False)
    multiplier: Decimal
    balance: Decimal | None
    health: str
    cooldown_until: datetime | None
    last_error: str


@dataclass(frozen=True)
class OfferInfo:
    id: int
    provider: ProviderInfo
    upstream_model_id: str
    canonical_id: str
    identity_rule: str
    kind: str
    prices: Prices | None
    context_length: int | None
    created: int  # unix time the offer was first seen, for the OpenAI model list


@dataclass(frozen=True)
class ClientKey:
    id: int
    name: str
    budget_period: str = ApiKey.BudgetPeriod.LIFETIME
    limits: KeyLimits | None = None  # None: nothing to check, no cache work


@dataclass
class Snapshot:
    token: uuid.UUID | None
    offers: dict[str, list[OfferInfo]]  # canonical id -> active offers
    native_ids: dict[str, set[str]]  # lowercased native id -> canonical ids
    keys: dict[int, list[KeyInfo]]  # provider id -> enabled keys, whatever their health
    rates: dict[str, Decimal]
    client_keys: dict[str, ClientKey]  # keyed hash -> key
    disabled_client_keys: set[str]
    unreadable_keys: list[str] = field(default_factory=list)

    @property
    def secret_check(self) -> SecretCheck:
        readable = sum(len(provider_keys) for provider_keys in self.keys.values())
        return SecretCheck(readable, tuple(self.unreadable_keys))

    @cached_property
    def bare_ids(self) -> dict[str, set[str]]:
        names: dict[str, set[str]] = defaultdict(set)
        for canonical in self.offers:
            names[canonical.rsplit("/", 1)[-1]].add(canonical)
        return dict(names)

    @cached_property
    def key_by_id(self) -> dict[int, KeyInfo]:
        return {key.id: key for keys in self.keys.values() for key in keys}

    @cached_property
    def key_groups(self) -> dict[int, list[tuple[Decimal, list[KeyInfo]]]]:
        """Provider id -> its keys grouped by multiplier, cheapest first: a request's cost is
        then computed once per (offer, multiplier), not once per key."""
        groups: dict[int, list[tuple[Decimal, list[KeyInfo]]]] = {}
        for provider_id, keys in self.keys.items():
            by_multiplier: dict[Decimal, list[KeyInfo]] = defaultdict(list)
            for key in keys:
                by_multiplier[key.multiplier].append(key)
            groups[provider_id] = sorted(by_multiplier.items(), key=lambda item: item[0])
        return groups


def build_snapshot() -> Snapshot:
    """Read every routing table once. Sync: call it through ``sync_to_async``."""
    token = SnapshotVersion.current()
    providers = {
        p.id: ProviderInfo(
            id=p.id,
            slug=p.slug,
            name=p.name,
            base_url=p.base_url,
            currency=p.currency,
            auth_style=p.auth_style,
            read_timeout_s=p.read_timeout_s,
            prompt_cache_ttl_s=p.prompt_cache_ttl_s,
            native=tuple((name, url or p.base_url) for name, url in p.native_protocols.items()),
            reasoning_parameter=getattr(PRESETS.get(p.preset), "reasoning_parameter", ""),
        )
        for p in Provider.objects.filter(enabled=True)
    }
    offers: dict[str, list[OfferInfo]] = defaultdict(list)
    native_ids: dict[str, set[str]] = defaultdict(set)
    for offer in ModelOffer.objects.filter(active=True, provider_id__in=providers):
        info = OfferInfo(
            id=offer.id,
            provider=providers[offer.provider_id],
            upstream_model_id=offer.upstream_model_id,
            canonical_id=offer.canonical_id,
            identity_rule=offer.identity_rule,
            kind=offer.kind,
            prices=_prices(offer, providers[offer.provider_id].currency),
            context_length=offer.context_length,
            created=int(offer.first_seen_at.timestamp()),
        )
        offers[offer.canonical_id].append(info)
        native_ids[offer.upstream_model_id.lower()].add(offer.canonical_id)
    keys: dict[int, list[KeyInfo]] = defaultdict(list)
    unreadable: list[str] = []
    for key in UpstreamKey.objects.filter(enabled=True, provider_id__in=providers):
        try:
            secret = key.secret
        except SecretDecryptionError:
            unreadable.append(f"{providers[key.provider_id].slug}:{key.name}")
            continue
        keys[key.provider_id].append(
            KeyInfo(
                id=key.id,
                provider_id=key.provider_id,
                name=key.name,
                masked=key.secret_masked,
                secret=secret,
                multiplier=key.multiplier,
                balance=key.balance,
                health=key.health,
                cooldown_until=key.cooldown_until,
                last_error=key.last_error,
            )
        )
    client_keys: dict[str, ClientKey] = {}
    disabled: set[str] = set()
    for api_key in ApiKey.objects.defer("spent_usd", "period_spent_usd", "period_started_at"):
        if api_key.enabled:
            client_keys[api_key.key_hash] = ClientKey(
                id=api_key.id,
                name=api_key.name,
                budget_period=api_key.budget_period,
                limits=KeyLimits.of(api_key),
            )
        else:
            disabled.add(api_key.key_hash)
    return Snapshot(
        token=token,
        offers=dict(offers),
        native_ids=dict(native_ids),
        keys=dict(keys),
        rates=load_rates(),
        client_keys=client_keys,
        disabled_client_keys=disabled,
        unreadable_keys=unreadable,
    )


def _prices(offer: ModelOffer, currency: str) -> Prices | None:
    if not offer.has_prices:
        return None
    return Prices(
        currency=currency,
        input_per_mtok=offer.input_price_per_mtok,
        output_per_mtok=offer.output_price_per_mtok,
        cached_input_per_mtok=offer.cached_input_price_per_mtok,
    )

"""Small builders for the rows most tests need."""

from __future__ import annotations

from decimal import Decimal

from billing.models import ApiKey
from providers.models import ModelOffer, Provider, UpstreamKey
from providers.presets import PRESETS


def make_provider(slug: str, base_url: str, *, preset: str | None = None, **fields) -> Provider:
    values = PRESETS[preset or slug if (preset or slug) in PRESETS else "openai-compatible"]
    data = {**values.provider_fields(), "base_url": base_url, "name": slug.title(), **fields}
    return Provider.objects.create(slug=slug, **data)


def make_key(provider: Provider, secret: str, *, label: str = "", **fields) -> UpstreamKey:
    key = UpstreamKey(provider=provider, label=label, **fields)
    key.set_secret(secret)
    key.save()
    return key


def make_offer(
    provider: Provider,
    upstream_model_id: str,
    *,
    canonical_id: str | None = None,
    input: str = "1",
    output: str = "2",
    cached_input: str | None = None,
    kind: str = ModelOffer.Kind.CHAT,
    **fields,
) -> ModelOffer:
    return ModelOffer.objects.create(
        provider=provider,
        upstream_model_id=upstream_model_id,
        canonical_id=canonical_id or provider.canonical_id(upstream_model_id),
        input_price_per_mtok=Decimal(input),
        output_price_per_mtok=Decimal(output),
        cached_input_price_per_mtok=Decimal(cached_input) if cached_input is not None else None,
        kind=kind,
        **fields,
    )


def make_client_key(name: str = "client") -> tuple[ApiKey, str]:
    return ApiKey.create_key(name=name)

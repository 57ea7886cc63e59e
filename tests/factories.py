"""Small builders for the rows most tests need, and the world a gateway test serves from."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx

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


@dataclass
class World:
    """A provider at the fake upstream, one priced offer, an upstream key and a client key."""

    provider: Provider
    offer: ModelOffer
    key: UpstreamKey
    api_key: ApiKey
    client_key: str  # the plain secret, as a client sends it
    chat_path: str  # where the fake upstream receives the provider's chat completions
    gateway_url: str = ""

    def client(self, **options: Any):
        """The official OpenAI SDK pointed at the gateway with this world's client key."""
        import openai

        return openai.OpenAI(
            base_url=self.gateway_url, api_key=self.client_key, **({"max_retries": 0} | options)
        )


def make_world(
    fake_upstream,
    gateway=None,
    *,
    slug: str = "openrouter",
    prefix: str | None = None,
    model: str = "openai/gpt-4o-mini",
    input: str = "0.15",
    output: str = "0.6",
    canonical_id: str | None = None,
    secret: str | None = None,
    label: str = "",
    client_name: str = "client",
    key_fields: dict[str, Any] | None = None,
    provider_fields: dict[str, Any] | None = None,
    reply: dict[str, Any] | None = None,
) -> World:
    """Build the world at ``fake_upstream.url(prefix)`` (by default OpenRouter's ``/api/v1`` for
    OpenRouter, the slug for others); with ``reply``, the upstream answers chat completions with
    it; with ``gateway``, the gateway reloads its snapshot to serve it."""
    prefix = prefix or ("openrouter/api/v1" if slug == "openrouter" else slug)
    provider = make_provider(slug, fake_upstream.url(prefix), **(provider_fields or {}))
    offer = make_offer(provider, model, canonical_id=canonical_id, input=input, output=output)
    secret = secret or f"sk-{slug}-" + "w" * 32
    key = make_key(provider, secret, label=label, **(key_fields or {}))
    api_key, client_key = make_client_key(client_name)
    chat_path = f"/{prefix}/chat/completions"
    if reply is not None:
        fake_upstream.reply("POST", chat_path, json_body=reply)
    if gateway is not None:
        gateway.reload()
    return World(
        provider=provider,
        offer=offer,
        key=key,
        api_key=api_key,
        client_key=client_key,
        chat_path=chat_path,
        gateway_url=gateway.url if gateway is not None else "",
    )


def make_ledger_owners() -> tuple[Provider, UpstreamKey, ApiKey]:
    """What a ledger row points at: an OpenRouter provider, its upstream key, the client key "ci"."""
    provider = make_provider("openrouter", "http://127.0.0.1:9/api/v1")
    key = make_key(provider, "sk-or-v1-" + "o" * 40)
    api_key, _ = make_client_key("ci")
    return provider, key, api_key


def post_chat(
    gateway: Any, client_key: str, model: str, content: str = "Hi", **body: Any
) -> httpx.Response:
    """One chat completion sent to the gateway over plain HTTP with ``client_key``: one user
    message, and ``body`` added to the request (``stream=True``, ``max_tokens``...)."""
    return httpx.post(
        gateway.url + "/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": content}], **body},
        headers={"Authorization": f"Bearer {client_key}"},
        timeout=10,
    )

"""Driving the admin through Django's test client: the rows every admin page test starts from."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.db import connection
from django.test.utils import CaptureQueriesContext

from billing.models import ApiKey, Attempt, CurrencyRate, LedgerEntry
from providers import services
from providers.models import Provider, RefreshResult, RefreshRun, UpstreamKey

SECRET_A = "sk-or-v1-fake-aaaaaaaaaaaaaaaaaaaaaaa1111"
SECRET_B = "sk-or-v1-fake-bbbbbbbbbbbbbbbbbbbbbbb2222"
ADMIN_MODELS = [
    "providers_provider",
    "providers_upstreamkey",
    "providers_modeloffer",
    "providers_refreshrun",
    "billing_currencyrate",
    "billing_apikey",
]


def admin_provider(fake_upstream) -> Provider:
    """OpenRouter added as an operator adds it (the preset), answering at the fake upstream."""
    provider = services.create_provider(slug="openrouter", preset="openrouter")
    provider.base_url = fake_upstream.url("openrouter/api/v1")
    provider.save()
    return provider


def admin_catalog(openrouter: Provider) -> dict[str, object]:
    """One row of everything the admin lists, keyed by ``app_model``."""
    deepseek = services.create_provider(slug="deepseek", preset="deepseek")
    key = services.add_upstream_key(provider=openrouter, secret=SECRET_A, label="main")
    offer = services.set_price(
        provider=openrouter,
        model="deepseek/deepseek-chat",
        input_per_mtok=Decimal("0.28"),
        output_per_mtok=Decimal("0.42"),
        create=True,  # no catalog fetched in these tests
    )
    run = RefreshRun.objects.create(trigger=RefreshRun.Trigger.COMMAND, duration_ms=12)
    RefreshResult.objects.create(run=run, provider=openrouter, provider_slug="openrouter")
    api_key, _ = ApiKey.create_key(name="ci")
    return {
        "providers_provider": deepseek,
        "providers_upstreamkey": key,
        "providers_modeloffer": offer,
        "providers_refreshrun": run,
        "billing_currencyrate": CurrencyRate.objects.get(currency="CNY"),
        "billing_apikey": api_key,
    }


def messages_of(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def queries_for(client, url: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert client.get(url).status_code == 200
    return len(queries)


def select(action: str, *objects) -> dict:
    return {"action": action, "_selected_action": [obj.pk for obj in objects]}


def key_change_form(key: UpstreamKey, **fields: str) -> dict[str, str]:
    """The upstream key's change form as the admin posts it, unchanged but for ``fields``."""
    return {
        "provider": str(key.provider_id),
        "label": key.label,
        "secret": "",
        "enabled": "on",
        "multiplier": "1",
        "balance": "",
        "balance_source": "auto",
        "health": "ok",
        "cooldown_until_0": "",
        "cooldown_until_1": "",
        **fields,
    }


def offer_add_form(provider: Provider, upstream_model_id: str, **fields: str) -> dict[str, Any]:
    """The add-offer form as the admin posts it: an active chat offer at 1 / 2 per Mtok with no
    canonical id (the admin derives it) and no tiers, but for ``fields``."""
    return {
        "provider": provider.pk,
        "upstream_model_id": upstream_model_id,
        "canonical_id": "",
        "kind": "chat",
        "active": "on",
        "input_price_per_mtok": "1",
        "output_price_per_mtok": "2",
        "price_tiers": "{}",
        **fields,
    }


def add_failover_attempts(entry: LedgerEntry, *, served_ms: int, **first_try: Any) -> None:
    """``entry`` answered on its second try: attempt 1 failed as ``first_try`` says (on the entry's
    provider and model unless it names others), attempt 2 is the entry's own provider, key and
    model answering 200 in ``served_ms``."""
    Attempt.objects.create(
        entry=entry,
        number=1,
        **{"provider": entry.provider, "upstream_model": entry.upstream_model, **first_try},
    )
    Attempt.objects.create(
        entry=entry,
        number=2,
        provider=entry.provider,
        upstream_key=entry.upstream_key,
        upstream_model=entry.upstream_model,
        status_code=200,
        duration_ms=served_ms,
    )

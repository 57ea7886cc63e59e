"""Provider presets: declarative data, one entry per upstream Keyaos knows out of the box.

Adding a preset is adding one ``ProviderPreset(...)`` to ``PRESETS`` (README, "Adding a provider
preset"). Every field becomes an editable column of the ``Provider`` row created from it, so an
operator can point a preset at a mirror, and tests at a local fake.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from providers.models import Provider

CatalogFormat = Provider.CatalogFormat
BalanceMethod = Provider.BalanceMethod
KeyCheck = Provider.KeyCheck


@dataclass(frozen=True)
class ProviderPreset:
    slug: str
    name: str
    base_url: str
    currency: str = "USD"
    catalog_format: str = CatalogFormat.OPENAI
    balance_method: str = BalanceMethod.NONE
    key_check: str = KeyCheck.MODELS
    key_check_model: str = ""
    default_vendor: str = ""
    seed_prices: str = ""  # a JSON file in providers/seed/, for catalogs without prices
    auth_style: str = Provider.AuthStyle.BEARER
    native_protocols: tuple[tuple[str, str], ...] = ()  # (protocol, base URL; "" = base_url)
    reasoning_parameter: str = ""  # the request field taking OpenRouter-style reasoning options

    def provider_fields(self) -> dict[str, Any]:
        return {
            "preset": self.slug,
            "name": self.name,
            "base_url": self.base_url,
            "currency": self.currency,
            "catalog_format": self.catalog_format,
            "balance_method": self.balance_method,
            "key_check": self.key_check,
            "key_check_model": self.key_check_model,
            "default_vendor": self.default_vendor,
            "auth_style": self.auth_style,
            "native_protocols": dict(self.native_protocols),
        }


PRESETS: dict[str, ProviderPreset] = {
    preset.slug: preset
    for preset in [
        ProviderPreset(
            slug="openrouter",
            name="OpenRouter",
            base_url="https://openrouter.ai/api/v1",
            catalog_format=CatalogFormat.OPENROUTER,
            balance_method=BalanceMethod.OPENROUTER,
            key_check=KeyCheck.OPENROUTER,
            reasoning_parameter="reasoning",
        ),
        ProviderPreset(
            slug="deepinfra",
            name="DeepInfra",
            base_url="https://api.deepinfra.com/v1/openai",
            catalog_format=CatalogFormat.DEEPINFRA,
        ),
        ProviderPreset(
            slug="zenmux",
            name="ZenMux",
            base_url="https://zenmux.ai/api/v1",
            catalog_format=CatalogFormat.ZENMUX,
            key_check=KeyCheck.CHAT,
            key_check_model="openai/gpt-4o-mini",
        ),
        ProviderPreset(
            slug="deepseek",
            name="DeepSeek",
            base_url="https://api.deepseek.com",
            currency="CNY",
            balance_method=BalanceMethod.DEEPSEEK,
            default_vendor="deepseek",
            seed_prices="deepseek.json",
            native_protocols=(("anthropic", "https://api.deepseek.com/anthropic/v1"),),
        ),
        ProviderPreset(
            slug="anthropic",
            name="Anthropic",
            base_url="https://api.anthropic.com/v1",
            catalog_format=CatalogFormat.ANTHROPIC,
            auth_style=Provider.AuthStyle.ANTHROPIC,
            default_vendor="anthropic",
            native_protocols=(("anthropic", ""),),
        ),
        ProviderPreset(
            slug="openai-compatible",
            name="OpenAI-compatible",
            base_url="http://127.0.0.1:11434/v1",
        ),
    ]
}

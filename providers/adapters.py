"""What each provider's catalog, balance and key-check endpoints answer, read into plain data.

One adapter per ``Provider.CatalogFormat`` turns a ``/models`` answer into ``CatalogEntry`` rows
with prices per 1M tokens in the provider's currency (PROVIDERS.md, "Units"). Nothing here touches
the database, so the refresh runs adapters in worker threads. JSON is parsed with
``parse_float=Decimal``: a price never passes through a float.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar

import httpx
from django.conf import settings

from providers.models import PRICE_DIGITS, ModelOffer, Provider
from providers.upstream import redact, upstream_message

logger = logging.getLogger(__name__)

PER_MTOK = Decimal(1_000_000)
PRICE_QUANTUM = Decimal(1).scaleb(-PRICE_DIGITS["decimal_places"])
PRICE_LIMIT = Decimal(10) ** (PRICE_DIGITS["max_digits"] - PRICE_DIGITS["decimal_places"])
MAX_MODEL_ID_LENGTH = ModelOffer._meta.get_field("upstream_model_id").max_length
MAX_DISPLAY_NAME_LENGTH = ModelOffer._meta.get_field("display_name").max_length
KEY_CHECK_PROMPT = "Say OK."

CHAT = ModelOffer.Kind.CHAT.value
EMBEDDING = ModelOffer.Kind.EMBEDDING.value


class UpstreamError(Exception):
    """A provider endpoint failed or answered something Keyaos cannot read.

    ``unreachable`` is set when no answer came at all (timeout, refused connection): asking the
    same host again in this run would only wait as long again.
    """

    def __init__(
        self, message: str, *, status_code: int | None = None, unreachable: bool = False
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.unreachable = unreachable


class CatalogError(UpstreamError):
    pass


class BalanceError(UpstreamError):
    pass


@dataclass(frozen=True)
class CatalogEntry:
    upstream_model_id: str
    display_name: str = ""
    kind: str = CHAT
    input_price_per_mtok: Decimal | None = None
    output_price_per_mtok: Decimal | None = None
    cached_input_price_per_mtok: Decimal | None = None
    context_length: int | None = None
    price_tiers: dict = field(default_factory=dict)
    hugging_face_id: str = ""  # OpenRouter: the id open-weight deployments use, "" if closed
    canonical_slug: str = ""  # OpenRouter: the model's permanent slug

    @property
    def has_prices(self) -> bool:
        return any(price is not None for price in self.price_tuple())

    def price_tuple(self) -> tuple[Decimal | None, Decimal | None, Decimal | None]:
        return (
            self.input_price_per_mtok,
            self.output_price_per_mtok,
            self.cached_input_price_per_mtok,
        )


@dataclass(frozen=True)
class KeyCheckResult:
    ok: bool
    status_code: int | None
    message: str


# HTTP


def fetch_timeout() -> httpx.Timeout:
    total_s = settings.KEYAOS_FETCH_TIMEOUT_S
    return httpx.Timeout(total_s, connect=min(total_s, settings.KEYAOS_CONNECT_TIMEOUT_S))


def new_client() -> httpx.Client:
    return httpx.Client(timeout=fetch_timeout(), headers={"User-Agent": "Keyaos"})


@contextlib.contextmanager
def _client_or_new(client: httpx.Client | None) -> Iterator[httpx.Client]:
    if client is not None:
        yield client
        return
    with new_client() as fresh:
        yield fresh


def _send(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    secret: str,
    error: type[UpstreamError],
    headers: dict[str, str] | None = None,
    body: Any = None,
) -> httpx.Response:
    try:
        return client.request(method, url, headers=headers, json=body)
    except httpx.TimeoutException:
        timeout_s = settings.KEYAOS_FETCH_TIMEOUT_S
        raise error(f"{method} {url}: no answer within {timeout_s:g} s", unreachable=True) from None
    except httpx.HTTPError as exc:
        detail = redact(f"{type(exc).__name__}: {exc}", secret)
        raise error(f"{method} {url}: {detail}", unreachable=True) from None


def request_json(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    secret: str = "",
    error: type[UpstreamError] = CatalogError,
    headers: dict[str, str] | None = None,
    body: Any = None,
) -> Any:
    """The decoded JSON answer (floats as Decimal), or ``error`` with a message free of secrets."""
    response = _send(client, method, url, secret=secret, error=error, headers=headers, body=body)
    where = f"{method} {url}"
    if not response.is_success:
        message = redact(upstream_message(response.content, limit=300), secret)
        raise error(
            f"{where}: HTTP {response.status_code}: {message}", status_code=response.status_code
        )
    content_type = response.headers.get("content-type", "")
    if "html" in content_type.lower():
        raise error(f"{where}: answered an HTML page ({content_type}), not JSON")
    try:
        return json.loads(response.content, parse_float=Decimal)
    except ValueError:
        raise error(f"{where}: the answer is not valid JSON") from None


# Parsing helpers: every shape problem becomes a CatalogError naming the model.


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CatalogError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _number(value: Any, where: str) -> Decimal | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise CatalogError(f"{where}: expected a number, got {value!r}")
    try:
        number = Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation:
        raise CatalogError(f"{where}: {value!r} is not a number") from None
    if not number.is_finite():
        raise CatalogError(f"{where}: {value!r} is not a finite number")
    return number


def price_per_mtok(value: Any, where: str, *, scale: Decimal = Decimal(1)) -> Decimal | None:
    """A price per 1M tokens from ``value`` (per ``1/scale`` tokens), rounded to what is stored.

    A negative price is OpenRouter's "decided per request" marker (``openrouter/auto``): unknown.
    """
    number = _number(value, where)
    if number is None or number < 0:
        return None
    price = (number * scale).quantize(PRICE_QUANTUM)
    if price >= PRICE_LIMIT:
        raise CatalogError(f"{where}: price {value!r} is out of range")
    return price


def _context_length(value: Any, where: str) -> int | None:
    number = _number(value, where)
    if number is None or number <= 0:
        return None
    return int(number)


def _text(value: Any, limit: int) -> str:
    return value.strip()[:limit] if isinstance(value, str) else ""


def looks_like_embedding(model_id: str) -> bool:
    return "embed" in model_id.lower()


def _jsonable(value: Any) -> Any:
    """Decimals as strings, so raw tiers can be stored in a JSONField exactly."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


# Catalog adapters


class CatalogAdapter:
    """Reads one catalog format. Subclasses list their endpoints and parse one ``data[]`` item."""

    listings: ClassVar[tuple[tuple[str, str], ...]] = (("models", CHAT),)
    price_currency: ClassVar[str | None] = None  # the currency the format's prices are in

    def fetch_catalog(
        self, provider: Provider, *, secret: str = "", client: httpx.Client | None = None
    ) -> list[CatalogEntry]:
        """Every model the provider lists, once each; raises CatalogError on any failure."""
        self.check_currency(provider)
        headers = provider.auth_headers(secret) if secret else {}
        entries: dict[str, CatalogEntry] = {}
        with _client_or_new(client) as http:
            for path, kind in self.listings:
                url = provider.url(path)
                payload = request_json(http, "GET", url, secret=secret, headers=headers)
                for entry in self.parse_listing(payload, kind=kind, provider=provider, where=url):
                    entries[entry.upstream_model_id] = entry
        return list(entries.values())

    def check_currency(self, provider: Provider) -> None:
        if self.price_currency and provider.currency != self.price_currency:
            raise CatalogError(
                f"{type(self).__name__} prices are in {self.price_currency}, but provider "
                f"{provider.slug!r} is set to {provider.currency}: fix its currency."
            )

    def parse_listing(
        self, payload: Any, *, kind: str, provider: Provider, where: str = "catalog"
    ) -> list[CatalogEntry]:
        items = _mapping(payload, where).get("data")
        if not isinstance(items, list):
            raise CatalogError(f"{where}: expected a 'data' list of models")
        entries = []
        for index, item in enumerate(items):
            item = _mapping(item, f"{where} data[{index}]")
            model_id = item.get("id")
            if not isinstance(model_id, str) or not model_id.strip():
                raise CatalogError(f"{where} data[{index}]: missing model id")
            model_id = model_id.strip()
            if len(model_id) > MAX_MODEL_ID_LENGTH:
                logger.warning("%s: skipping a model id longer than %d", where, MAX_MODEL_ID_LENGTH)
                continue
            try:
                entries.append(
                    self.parse_item(item, model_id=model_id, kind=kind, provider=provider)
                )
            except (KeyError, TypeError, AttributeError, ValueError, InvalidOperation) as exc:
                raise CatalogError(f"{where} {model_id}: unexpected shape ({exc})") from None
        return entries

    def parse_item(
        self, item: dict, *, model_id: str, kind: str, provider: Provider
    ) -> CatalogEntry:
        raise NotImplementedError


class OpenRouterCatalog(CatalogAdapter):
    """Prices are USD per token, as strings ("0.000002" is 2.00 per 1M)."""

    listings = (("models", CHAT), ("embeddings/models", EMBEDDING))
    price_currency = "USD"

    def parse_item(
        self, item: dict, *, model_id: str, kind: str, provider: Provider
    ) -> CatalogEntry:
        pricing = _mapping(item.get("pricing"), f"{model_id} pricing")
        return CatalogEntry(
            upstream_model_id=model_id,
            display_name=_text(item.get("name"), MAX_DISPLAY_NAME_LENGTH),
            kind=kind,
            input_price_per_mtok=self.price(pricing, "prompt", model_id),
            output_price_per_mtok=self.price(pricing, "completion", model_id),
            cached_input_price_per_mtok=self.price(pricing, "input_cache_read", model_id),
            context_length=_context_length(item.get("context_length"), f"{model_id} context"),
            hugging_face_id=_text(item.get("hugging_face_id"), MAX_MODEL_ID_LENGTH),
            canonical_slug=_text(item.get("canonical_slug"), MAX_MODEL_ID_LENGTH),
        )

    @staticmethod
    def price(pricing: dict, name: str, model_id: str) -> Decimal | None:
        return price_per_mtok(pricing.get(name), f"{model_id} pricing.{name}", scale=PER_MTOK)


class DeepInfraCatalog(CatalogAdapter):
    """Prices are USD per 1M tokens, as numbers, under ``metadata.pricing``.

    A model whose ``metadata`` is null (or has no pricing) is kept without prices: it is listed,
    so it exists, and an operator can price it by hand; a refresh never wipes prices it lacks.
    Embedding models are recognised by an "embed" tag or id, or by a price for input only.
    """

    price_currency = "USD"

    def parse_item(
        self, item: dict, *, model_id: str, kind: str, provider: Provider
    ) -> CatalogEntry:
        metadata = _mapping(item.get("metadata"), f"{model_id} metadata")
        pricing = _mapping(metadata.get("pricing"), f"{model_id} metadata.pricing")
        where = f"{model_id} metadata.pricing"
        input_price = price_per_mtok(pricing.get("input_tokens"), f"{where}.input_tokens")
        output_price = price_per_mtok(pricing.get("output_tokens"), f"{where}.output_tokens")
        tags = [tag.lower() for tag in metadata.get("tags") or [] if isinstance(tag, str)]
        embedding = (
            looks_like_embedding(model_id)
            or any("embed" in tag for tag in tags)
            or (input_price is not None and "output_tokens" not in pricing)
        )
        return CatalogEntry(
            upstream_model_id=model_id,
            kind=EMBEDDING if embedding else kind,
            input_price_per_mtok=input_price,
            output_price_per_mtok=output_price,
            cached_input_price_per_mtok=price_per_mtok(
                pricing.get("cache_read_tokens"), f"{where}.cache_read_tokens"
            ),
            context_length=_context_length(metadata.get("context_length"), f"{model_id} context"),
        )


class ZenMuxCatalog(CatalogAdapter):
    """``pricings`` (with an s) holds arrays of tiers per field; the first tier is the base price.

    Every tier is kept in ``price_tiers`` (values as strings) for costs of long prompts.
    """

    price_fields = {"prompt": "input", "completion": "output", "input_cache_read": "cached_input"}

    def parse_item(
        self, item: dict, *, model_id: str, kind: str, provider: Provider
    ) -> CatalogEntry:
        pricings = _mapping(item.get("pricings"), f"{model_id} pricings")
        base = {
            name: self.base_price(pricings.get(name), f"{model_id} pricings.{name}", provider)
            for name in self.price_fields
        }
        return CatalogEntry(
            upstream_model_id=model_id,
            display_name=_text(item.get("display_name"), MAX_DISPLAY_NAME_LENGTH),
            kind=EMBEDDING if looks_like_embedding(model_id) else kind,
            input_price_per_mtok=base["prompt"],
            output_price_per_mtok=base["completion"],
            cached_input_price_per_mtok=base["input_cache_read"],
            context_length=_context_length(item.get("context_length"), f"{model_id} context"),
            price_tiers=_jsonable(pricings),
        )

    @staticmethod
    def base_price(tiers: Any, where: str, provider: Provider) -> Decimal | None:
        if tiers is None or tiers == []:
            return None
        if not isinstance(tiers, list):
            raise CatalogError(f"{where}: expected a list of price tiers")
        for index, tier in enumerate(tiers):
            tier = _mapping(tier, f"{where}[{index}]")
            unit = tier.get("unit", "perMTokens")
            if unit != "perMTokens":
                raise CatalogError(f"{where}[{index}]: unknown price unit {unit!r}")
            currency = tier.get("currency", provider.currency)
            if currency != provider.currency:
                raise CatalogError(
                    f"{where}[{index}]: price in {currency!r}, but provider {provider.slug!r} "
                    f"is set to {provider.currency}"
                )
        return price_per_mtok(_mapping(tiers[0], where).get("value"), f"{where}[0].value")


class OpenAIListCatalog(CatalogAdapter):
    """Ids only (DeepSeek, vLLM, Ollama...): prices are the operator's and stay as they are."""

    def parse_item(
        self, item: dict, *, model_id: str, kind: str, provider: Provider
    ) -> CatalogEntry:
        context = item.get("context_length", item.get("max_model_len"))
        return CatalogEntry(
            upstream_model_id=model_id,
            kind=EMBEDDING if looks_like_embedding(model_id) else kind,
            context_length=_context_length(context, f"{model_id} context"),
        )


class AnthropicCatalog(CatalogAdapter):
    """Anthropic's ``GET /v1/models``: ids and display names, no prices (set by hand)."""

    listings = (("models?limit=1000", CHAT),)

    def parse_item(
        self, item: dict, *, model_id: str, kind: str, provider: Provider
    ) -> CatalogEntry:
        return CatalogEntry(
            upstream_model_id=model_id,
            display_name=_text(item.get("display_name"), MAX_DISPLAY_NAME_LENGTH),
            kind=kind,
        )


ADAPTERS: dict[str, CatalogAdapter] = {
    Provider.CatalogFormat.OPENROUTER: OpenRouterCatalog(),
    Provider.CatalogFormat.DEEPINFRA: DeepInfraCatalog(),
    Provider.CatalogFormat.ZENMUX: ZenMuxCatalog(),
    Provider.CatalogFormat.OPENAI: OpenAIListCatalog(),
    Provider.CatalogFormat.ANTHROPIC: AnthropicCatalog(),
}


def adapter_for(provider: Provider) -> CatalogAdapter:
    try:
        return ADAPTERS[provider.catalog_format]
    except KeyError:
        raise CatalogError(f"unknown catalog format {provider.catalog_format!r}") from None


def fetch_catalog(
    provider: Provider, *, secret: str = "", client: httpx.Client | None = None
) -> list[CatalogEntry]:
    return adapter_for(provider).fetch_catalog(provider, secret=secret, client=client)


# Balances


def fetch_balance(
    provider: Provider, secret: str, *, client: httpx.Client | None = None
) -> Decimal | None:
    """The key's remaining credit in the provider's currency; None when the provider has no
    balance endpoint. Raises BalanceError when the endpoint fails or answers in another currency."""
    method = provider.balance_method
    if method == Provider.BalanceMethod.NONE:
        return None
    readers = {
        Provider.BalanceMethod.OPENROUTER: ("credits", _openrouter_balance),
        Provider.BalanceMethod.DEEPSEEK: ("user/balance", _deepseek_balance),
    }
    if method not in readers:
        raise BalanceError(f"unknown balance method {method!r}")
    path, read = readers[method]
    url = provider.url(path)
    with _client_or_new(client) as http:
        payload = request_json(
            http,
            "GET",
            url,
            secret=secret,
            error=BalanceError,
            headers=provider.auth_headers(secret),
        )
    try:
        return read(payload, provider, url)
    except CatalogError as exc:
        raise BalanceError(str(exc)) from None


def _openrouter_balance(payload: Any, provider: Provider, where: str) -> Decimal:
    if provider.currency != "USD":
        raise BalanceError(
            f"OpenRouter credits are in USD, but {provider.slug!r} is set to {provider.currency}"
        )
    data = _mapping(_mapping(payload, where).get("data"), f"{where} data")
    total = _number(data.get("total_credits"), f"{where} data.total_credits")
    used = _number(data.get("total_usage"), f"{where} data.total_usage")
    if total is None or used is None:
        raise BalanceError(f"{where}: missing data.total_credits or data.total_usage")
    return total - used


def _deepseek_balance(payload: Any, provider: Provider, where: str) -> Decimal:
    infos = _mapping(payload, where).get("balance_infos")
    if not isinstance(infos, list):
        raise BalanceError(f"{where}: expected a 'balance_infos' list")
    for index, info in enumerate(infos):
        info = _mapping(info, f"{where} balance_infos[{index}]")
        if info.get("currency") == provider.currency:
            balance = _number(info.get("total_balance"), f"{where} total_balance")
            if balance is None:
                raise BalanceError(f"{where}: the {provider.currency} entry has no total_balance")
            return balance
    found = ", ".join(str(_mapping(i, where).get("currency")) for i in infos) or "none"
    raise BalanceError(
        f"{where}: no balance in {provider.currency} (found: {found}); "
        "set the provider's currency to the account's"
    )


# Key checks


def check_key(
    provider: Provider, secret: str, *, client: httpx.Client | None = None
) -> KeyCheckResult:
    """Ask the provider whether it accepts ``secret``, as cheaply as the provider allows."""
    headers = provider.auth_headers(secret)
    body = None
    if provider.key_check == Provider.KeyCheck.OPENROUTER:
        method, path = "GET", "key"
    elif provider.key_check == Provider.KeyCheck.CHAT:
        if not provider.key_check_model:
            return KeyCheckResult(False, None, "set the provider's key check model first")
        method, path = "POST", "chat/completions"
        body = {
            "model": provider.key_check_model,
            "max_tokens": 1,
            "messages": [{"role": "user", "content": KEY_CHECK_PROMPT}],
        }
    else:
        method, path = "GET", "models"
    url = provider.url(path)
    with _client_or_new(client) as http:
        try:
            response = _send(
                http, method, url, secret=secret, error=UpstreamError, headers=headers, body=body
            )
        except UpstreamError as exc:
            return KeyCheckResult(False, None, str(exc))
    status = response.status_code
    if not response.is_success:
        detail = redact(upstream_message(response.content, limit=300), secret)
        return KeyCheckResult(False, status, f"{method} {url}: HTTP {status}: {detail}")
    if "html" in response.headers.get("content-type", "").lower():
        return KeyCheckResult(False, status, f"{method} {url}: answered an HTML page, not JSON")
    return KeyCheckResult(True, status, f"{method} {url}: key accepted")


def fetch_public_catalog(url: str, *, client: httpx.Client | None = None) -> list[CatalogEntry]:
    """OpenRouter's public model list (no key): the identity source when no OpenRouter
    provider is configured."""
    with _client_or_new(client) as http:
        payload = request_json(http, "GET", url)
    return ADAPTERS[Provider.CatalogFormat.OPENROUTER].parse_listing(
        payload, kind=CHAT, provider=None, where=url
    )

"""Reading a client's request: just enough of the body to route it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from billing.usage import estimate_text_tokens
from keyaos.lib import jsonbody
from routing.dispatcher import ProviderPreferences
from routing.errors import GatewayError, body_too_large

MAX_JSON_DEPTH = 64
# Integer fields the gateway reads: the range it accepts (beyond it a request is a 400, never a
# number too large for the counters or the ledger).
_RANGES = {
    "max_tokens": (1, 2**31 - 1),
    "max_completion_tokens": (1, 2**31 - 1),
    "n": (1, 128),
}

# endpoint -> (offer kind, body field holding the prompt)
ENDPOINTS = {
    "chat/completions": ("chat", "messages"),
    "completions": ("chat", "prompt"),
    "embeddings": ("embedding", "input"),
}


@dataclass
class NativeCall:
    """The client's request as an upstream that speaks the client's protocol takes it."""

    protocol: str  # a name in Provider.native_protocols
    path: str  # below the native base URL
    body: dict[str, Any]  # forwarded as is, but for the model id
    headers: dict[str, str]  # the client's protocol headers worth forwarding

    def upstream_body(self, upstream_model_id: str) -> bytes:
        return jsonbody.encode({**self.body, "model": upstream_model_id})

    def headers_for(self, base_url: str) -> dict[str, str]:
        return self.headers


@dataclass
class ClientRequest:
    endpoint: str
    body: dict[str, Any]
    model: str
    stream: bool
    kind: str
    prompt_tokens: int
    output_tokens: int
    preferences: ProviderPreferences
    added_usage_option: bool = False
    context: Any = None  # what the client's protocol keeps to translate the answer back
    native: NativeCall | None = None  # for upstreams that speak the client's protocol
    reasoning: dict[str, Any] | None = None  # OpenRouter-style, where the upstream takes it

    def upstream_body(self, upstream_model_id: str, reasoning_parameter: str = "") -> bytes:
        body = {**self.body, "model": upstream_model_id}
        if self.reasoning is not None and reasoning_parameter:
            body[reasoning_parameter] = self.reasoning
        return jsonbody.encode(body)


def load_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, for every protocol."""
    if len(raw) > settings.KEYAOS_MAX_BODY_BYTES:
        raise body_too_large()
    try:
        body = jsonbody.decode(_DECODER, raw)
    except (ValueError, UnicodeDecodeError):
        raise GatewayError(
            400, "The request body is not valid JSON.", code="invalid_json"
        ) from None
    except RecursionError:
        raise _too_deep() from None
    if not isinstance(body, dict):
        raise GatewayError(400, "The request body must be a JSON object.", code="invalid_json")
    if _depth_exceeds(body, MAX_JSON_DEPTH):
        raise _too_deep()
    return body


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise GatewayError(400, f"The number {text[:40]} is out of range.", code="invalid_json")
    return number


def _no_constant(text: str) -> float:
    raise GatewayError(400, f"{text} is not a JSON number.", code="invalid_json")


_DECODER = json.JSONDecoder(parse_float=_finite_float, parse_constant=_no_constant)


def _too_deep() -> GatewayError:
    return GatewayError(
        400,
        f"The request body is nested more than {MAX_JSON_DEPTH} levels deep.",
        code="invalid_json",
    )


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Iterative, so that depth itself cannot exhaust the stack."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend(
                (child, depth + 1) for child in item.values() if isinstance(child, (dict, list))
            )
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item if isinstance(child, (dict, list)))
    return False


def parse_client_request(endpoint: str, raw: bytes) -> ClientRequest:
    kind, prompt_field = ENDPOINTS[endpoint]
    body = load_body(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise GatewayError(
            400, "'model' is required and must be a non-empty string.", param="model"
        )
    if prompt_field not in body:
        raise GatewayError(400, f"'{prompt_field}' is required.", param=prompt_field)
    _check_types(body, endpoint)
    stream = bool(body.get("stream", False)) and kind == "chat"
    preferences = _preferences(body.pop("provider", None))
    added_usage_option = False
    if stream:
        options = body.get("stream_options") or {}
        if not options.get("include_usage"):
            body["stream_options"] = {**options, "include_usage": True}
            added_usage_option = True
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    choices = body.get("n") or 1
    return ClientRequest(
        endpoint=endpoint,
        body=body,
        model=model.strip(),
        stream=stream,
        kind=kind,
        prompt_tokens=prompt_token_estimate(body.get(prompt_field)),
        # each of the n choices may use max_tokens
        output_tokens=0
        if kind == "embedding"
        else (max_tokens or settings.KEYAOS_DEFAULT_MAX_TOKENS) * choices,
        preferences=preferences,
        added_usage_option=added_usage_option,
    )


def prompt_token_estimate(prompt: Any) -> int:
    """Estimated prompt tokens: text parts of messages, prompts or embedding inputs."""
    if isinstance(prompt, str):
        return estimate_text_tokens(prompt)
    if isinstance(prompt, list):
        if prompt and all(isinstance(item, int) for item in prompt):
            return len(prompt)  # already tokens
        return sum(prompt_token_estimate(item) for item in prompt)
    if isinstance(prompt, dict):
        overhead = 4 if "role" in prompt else 0
        return overhead + prompt_token_estimate(prompt.get("content", prompt.get("text", "")))
    return 0


_TYPES: dict[str, tuple[type | tuple[type, ...], str]] = {
    "stream": (bool, "a boolean"),
    "max_tokens": (int, "an integer"),
    "max_completion_tokens": (int, "an integer"),
    "temperature": ((int, float), "a number"),
    "top_p": ((int, float), "a number"),
    "n": (int, "an integer"),
    "stream_options": (dict, "an object"),
}


def _check_types(body: dict[str, Any], endpoint: str) -> None:
    for field, (types, description) in _TYPES.items():
        value = body.get(field)
        if value is None:
            continue
        if isinstance(value, bool) and types is not bool or not isinstance(value, types):
            raise GatewayError(400, f"'{field}' must be {description}.", param=field)
        if field in _RANGES:
            low, high = _RANGES[field]
            if not low <= value <= high:
                raise GatewayError(400, f"'{field}' must be between {low} and {high}.", param=field)
    if endpoint == "chat/completions":
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise GatewayError(400, "'messages' must be a non-empty array.", param="messages")
        if not all(isinstance(message, dict) for message in messages):
            raise GatewayError(400, "Each message must be an object.", param="messages")


def _preferences(value: Any) -> ProviderPreferences:
    if value is None:
        return ProviderPreferences()
    if not isinstance(value, dict):
        raise GatewayError(400, "'provider' must be an object.", param="provider")
    lists = {}
    for name in ("only", "ignore", "order"):
        items = value.get(name) or []
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise GatewayError(
                400, f"'provider.{name}' must be an array of provider slugs.", param="provider"
            )
        lists[name] = [item.lower() for item in items]
    return ProviderPreferences(
        only=frozenset(lists["only"]),
        ignore=frozenset(lists["ignore"]),
        order=tuple(lists["order"]),
    )

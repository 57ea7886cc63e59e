"""Provider answers in the shapes of /work/shared/PROVIDERS.md, for the fake upstream to serve.

Chat answers (whole and streamed), catalogs in each provider's own id style and price units, and
balances. Each builder gives the documented shape with plain defaults; a test passes only what
its behaviour is about.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from tests.fake_upstream import FakeUpstream, sse

# Chat answers (OpenAI's shape, which every provider here speaks)


def chat_completion(model: str, content: str = "Hello!", **usage: Any) -> dict[str, Any]:
    """A non-streaming chat answer in OpenAI's shape, ``usage`` as the provider sends it."""
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1760000000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": usage or {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


def chat_chunks(
    model: str,
    words: list[str],
    usage: dict[str, Any] | None = None,
    *,
    done: bool = True,
    finish: str = "stop",
    usage_in_last_chunk: bool = False,
) -> list[bytes]:
    """A streamed chat answer: a role chunk, one chunk per word, a finish chunk, a usage chunk
    (or, with ``usage_in_last_chunk``, the usage on the finish chunk as some providers send it)."""
    payloads = [chunk(model, {"role": "assistant", "content": ""})]
    payloads += [chunk(model, {"content": word}) for word in words]
    if usage is not None and usage_in_last_chunk:
        payloads.append(chunk(model, {}, finish, usage=usage))
    else:
        payloads.append(chunk(model, {}, finish))
        if usage is not None:
            payloads.append({**chunk(model, {}), "choices": [], "usage": usage})
    return sse(*payloads, done=done)


def tool_call_chunks(
    model: str,
    calls: list[tuple[str, str, list[str]]],
    usage: dict[str, Any] | None = None,
    *,
    text: str = "",
) -> list[bytes]:
    """A streamed answer that calls tools: for each (id, name, argument pieces) a first delta
    with the id and name, then one delta per piece of the arguments, as OpenAI streams them."""
    payloads = [chunk(model, {"role": "assistant", "content": text or None})]
    for index, (call_id, name, pieces) in enumerate(calls):
        first = {"index": index, "id": call_id, "type": "function"}
        payloads.append(
            chunk(model, {"tool_calls": [{**first, "function": {"name": name, "arguments": ""}}]})
        )
        payloads += [
            chunk(model, {"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
            for piece in pieces
        ]
    payloads.append(chunk(model, {}, "tool_calls"))
    if usage is not None:
        payloads.append({**chunk(model, {}), "choices": [], "usage": usage})
    return sse(*payloads)


def chunk(
    model: str,
    delta: dict[str, Any],
    finish: str | None = None,
    *,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One ``chat.completion.chunk``."""
    payload = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1760000000,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        payload["usage"] = usage
    return payload


def upstream_error(message: str) -> dict[str, Any]:
    """An error answer in OpenAI's shape, the body a provider sends with a 4xx or 5xx status."""
    return {"error": {"message": message}}


def tool_completion(
    model: str, calls: list[tuple[str, str, dict[str, Any]]], **usage: Any
) -> dict[str, Any]:
    """A non-streaming answer that calls tools: (id, name, arguments) each."""
    answer = chat_completion(model, **usage)
    answer["choices"][0]["message"] = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments)},
            }
            for call_id, name, arguments in calls
        ],
    }
    answer["choices"][0]["finish_reason"] = "tool_calls"
    return answer


# Catalogs: OpenRouter lists USD per token as strings


def token_prices(prompt: Any, completion: Any, cache_read: Any | None) -> dict[str, Any]:
    """The price names OpenRouter and ZenMux share; a model without a cache price has no
    ``input_cache_read``."""
    prices = {"prompt": prompt, "completion": completion}
    if cache_read is not None:
        prices["input_cache_read"] = cache_read
    return prices


def openrouter_model(
    model_id: str,
    *,
    prompt: str = "0.000001",
    completion: str = "0.000002",
    cache_read: str | None = "0.0000001",
    name: str | None = None,
    context_length: int = 128000,
    modality: str = "text->text",
    hugging_face_id: str = "",
    canonical_slug: str | None = None,
    **pricing: str,
) -> dict[str, Any]:
    """One ``GET /models`` item: the permanent ``canonical_slug``, and for open-weight models the
    ``hugging_face_id`` others serve it as; ``pricing`` adds prices (``image``, ``request``...)."""
    return {
        "id": model_id,
        "canonical_slug": model_id if canonical_slug is None else canonical_slug,
        "hugging_face_id": hugging_face_id,
        "name": model_id.split("/")[-1].title() if name is None else name,
        "context_length": context_length,
        "architecture": {"modality": modality},
        "pricing": token_prices(prompt, completion, cache_read) | pricing,
    }


def serve_openrouter(
    fake: FakeUpstream,
    *models: dict[str, Any],
    embeddings: tuple[dict[str, Any], ...] = (),
    prefix: str = "openrouter",
) -> None:
    fake.reply("GET", f"/{prefix}/models", json_body={"data": list(models)})
    fake.reply("GET", f"/{prefix}/embeddings/models", json_body={"data": list(embeddings)})


def openrouter_credits(total_credits: float, total_usage: float) -> dict[str, Any]:
    """``GET /credits``: the balance is total_credits - total_usage, USD."""
    return {"data": {"total_credits": total_credits, "total_usage": total_usage}}


# DeepInfra: HuggingFace-cased ids, USD per 1M tokens as numbers


def deepinfra_model(
    model_id: str,
    input_price: float = 0.5,
    output_price: float | None = 1.5,
    *,
    cache_read: float | None = None,
    context_length: int = 32768,
    **metadata: Any,
) -> dict[str, Any]:
    pricing: dict[str, Any] = {"input_tokens": input_price}
    if output_price is not None:
        pricing["output_tokens"] = output_price
    if cache_read is not None:
        pricing["cache_read_tokens"] = cache_read
    return {
        "id": model_id,
        "object": "model",
        "metadata": {"context_length": context_length, "pricing": pricing, **metadata},
    }


def serve_deepinfra(fake: FakeUpstream, *models: dict[str, Any], prefix: str = "deepinfra"):
    fake.reply("GET", f"/{prefix}/models", json_body={"object": "list", "data": list(models)})


# ZenMux: prices as tiers by prompt length, USD per 1M tokens


def serve_zenmux(fake: FakeUpstream, *models: dict[str, Any], prefix: str = "zenmux") -> None:
    fake.reply("GET", f"/{prefix}/models", json_body={"data": list(models)})


def zenmux_tier(value: float, gte: int, lt: int | None = None) -> dict[str, Any]:
    prompt_tokens = {"unit": "kTokens", "gte": gte} | ({"lt": lt} if lt is not None else {})
    return {
        "value": value,
        "unit": "perMTokens",
        "currency": "USD",
        "conditions": {"prompt_tokens": prompt_tokens},
    }


def zenmux_tiers(base: float, long: float, split_k: int = 200) -> list[dict[str, Any]]:
    """The base price, and a second one for prompts of ``split_k`` thousand tokens or more."""
    return [zenmux_tier(base, 0, split_k), zenmux_tier(long, split_k)]


def zenmux_model(
    model_id: str,
    *,
    prompt: list[dict[str, Any]],
    completion: list[dict[str, Any]],
    cache_read: list[dict[str, Any]] | None = None,
    display_name: str | None = None,
    context_length: int = 1048576,
) -> dict[str, Any]:
    return {
        "id": model_id,
        "display_name": model_id if display_name is None else display_name,
        "context_length": context_length,
        "pricings": token_prices(prompt, completion, cache_read),
    }


# DeepSeek: ids only, and a balance per currency


def deepseek_models(*model_ids: str) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": model_id, "object": "model", "owned_by": "deepseek"} for model_id in model_ids
        ],
    }


def deepseek_balance(*infos: dict[str, str], is_available: bool = True) -> dict[str, Any]:
    return {"is_available": is_available, "balance_infos": list(infos)}


def deepseek_balance_info(currency: str, total: str, granted: str = "0.00") -> dict[str, str]:
    """One ``balance_infos`` entry: string amounts, topped up = total - granted."""
    return {
        "currency": currency,
        "total_balance": total,
        "granted_balance": granted,
        "topped_up_balance": f"{Decimal(total) - Decimal(granted):.2f}",
    }


# Anthropic Messages answers (api.anthropic.com and Messages-compatible endpoints)


def anthropic_message(model: str, text: str = "Hello!", **usage: Any) -> dict[str, Any]:
    """A non-streaming Messages answer; ``usage`` as Anthropic reports it (input without cache)."""
    return {
        "id": "msg_upstream",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage or {"input_tokens": 10, "output_tokens": 5},
    }


def anthropic_events(model: str, words: list[str], **usage: Any) -> list[bytes]:
    """A streamed Messages answer: input usage in ``message_start``, output in ``message_delta``."""
    start_usage = {k: v for k, v in usage.items() if k != "output_tokens"}
    message = {**anthropic_message(model, ""), "content": [], "stop_reason": None}
    message["usage"] = {**start_usage, "output_tokens": 1}
    events = [
        ("message_start", {"type": "message_start", "message": message}),
        ("ping", {"type": "ping"}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        *[
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": word},
                },
            )
            for word in words
        ],
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": usage.get("output_tokens", 5)},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return [f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events]

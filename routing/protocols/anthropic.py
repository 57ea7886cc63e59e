"""Anthropic's Messages API (``/v1/messages``) over chat-completions upstreams.

A request is translated with an allow-list (what is not named here is dropped, never forwarded);
the answer and the stream are translated back as chunks arrive, into the exact event sequence
Anthropic's clients expect. Errors are in Anthropic's shape. The translation functions are pure:
``to_chat``, ``from_chat``, ``MessagesStream``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from django.http import HttpResponse, JsonResponse

from billing.usage import Usage, estimate_text_tokens, parse_anthropic_usage, parse_usage
from providers.models import ANTHROPIC_VERSION
from providers.upstream import upstream_message
from routing.errors import GatewayError, UpstreamRefused
from routing.protocols.translated import (
    INCOMPLETE,
    ChunkTranslator,
    NativeDialect,
    TranslatedFront,
)
from routing.requests import ClientRequest, NativeCall, load_body, prompt_token_estimate
from routing.sse import events_of, text_chars

ENDPOINT = "messages"
MAX_TOOL_NAME = 64  # OpenAI-compatible upstreams refuse longer function names

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def error_type(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def error_response(error: GatewayError) -> HttpResponse:
    message = error.message
    if isinstance(error, UpstreamRefused):
        message = upstream_message(error.body) or message
    response = JsonResponse(error_body(error.status, message), status=error.status)
    for name, value in error.headers.items():
        response[name] = value
    return response


def _invalid(message: str) -> GatewayError:
    return GatewayError(400, message)


@dataclass
class Translation:
    """What answering a translated request needs: the client's model id and its tool names."""

    model: str
    tool_names: dict[str, str] = field(default_factory=dict)  # upstream name -> client's name
    stop_sequences: tuple[str, ...] = ()
    message_id: str = ""
    reasoning: dict[str, Any] | None = None  # for upstreams with a reasoning parameter


# --- request: Anthropic Messages -> chat completions -------------------------------------------


def to_chat(body: dict[str, Any]) -> tuple[dict[str, Any], Translation]:
    """The chat-completions body for a Messages request, and what translating back needs."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _invalid("model: Field required (a non-empty string).")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _invalid("max_tokens: Field required (an integer of at least 1).")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages: Field required (a non-empty array).")
    translation = Translation(model=model.strip(), message_id=_message_id())
    names = _ToolNames(translation)
    chat_messages = _system_messages(body.get("system"))
    for message in messages:
        chat_messages += _chat_messages(message, names)
    if not any(m["role"] != "system" for m in chat_messages):
        raise _invalid("messages: nothing left to send after translation.")
    chat: dict[str, Any] = {"model": translation.model, "messages": chat_messages}
    chat["max_tokens"] = max_tokens
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _invalid(f"{name}: Input should be a number.")
            chat[name] = value
    stops = body.get("stop_sequences")
    if stops:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _invalid("stop_sequences: Input should be an array of strings.")
        chat["stop"] = stops
        translation.stop_sequences = tuple(stops)
    metadata = body.get("metadata")
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    if isinstance(user_id, str) and user_id:
        chat["user"] = user_id
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise _invalid("tools: Input should be an array.")
        functions = [_function(tool, names) for tool in tools if _is_client_tool(tool)]
        if functions:
            chat["tools"] = functions
    tool_choice = _tool_choice(body.get("tool_choice"), names)
    if tool_choice is not None and chat.get("tools"):
        choice, parallel = tool_choice
        chat["tool_choice"] = choice
        if parallel is False:
            chat["parallel_tool_calls"] = False
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive"):
        budget = thinking.get("budget_tokens")
        valid = isinstance(budget, int) and not isinstance(budget, bool) and budget > 0
        translation.reasoning = {"max_tokens": budget} if valid else {"enabled": True}
    if body.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat, translation


def input_tokens(body: dict[str, Any]) -> int:
    """The router's estimate of a Messages request's input: system, tools and messages."""
    tokens = prompt_token_estimate(_system_text(body.get("system")))
    messages = body.get("messages")
    tokens += prompt_token_estimate(messages if isinstance(messages, list) else [])
    for message in messages if isinstance(messages, list) else []:
        for block in _blocks(message.get("content") if isinstance(message, dict) else None):
            if block.get("type") == "tool_use":
                tokens += estimate_text_tokens(json.dumps(block.get("input", {})))
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        tokens += estimate_text_tokens(json.dumps(tools))
    return tokens


class _ToolNames:
    """Names over 64 characters are shortened on the way up and restored on the way back."""

    def __init__(self, translation: Translation) -> None:
        self.translation = translation

    def up(self, name: str) -> str:
        if len(name) <= MAX_TOOL_NAME:
            return name
        short = name[: MAX_TOOL_NAME - 9] + "_" + hashlib.sha1(name.encode()).hexdigest()[:8]
        self.translation.tool_names[short] = name
        return short


def _system_text(system: Any) -> str:
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        return "\n\n".join(
            block.get("text", "")
            for block in system
            if isinstance(block, dict) and block.get("type") == "text"
        )
    return ""


def _system_messages(system: Any) -> list[dict[str, Any]]:
    if system is not None and not isinstance(system, str | list):
        raise _invalid("system: Input should be a string or an array of text blocks.")
    text = _system_text(system)
    return [{"role": "system", "content": text}] if text else []


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return [block for block in content if isinstance(block, dict)]
    return []


def _chat_messages(message: Any, names: _ToolNames) -> list[dict[str, Any]]:
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        raise _invalid("messages: each message needs a role of 'user' or 'assistant'.")
    content = message.get("content")
    if not isinstance(content, str | list):
        raise _invalid("messages: content should be a string or an array of blocks.")
    if message["role"] == "assistant":
        return _assistant_message(_blocks(content), names)
    return _user_messages(_blocks(content))


def _assistant_message(blocks: list[dict[str, Any]], names: _ToolNames) -> list[dict[str, Any]]:
    text = "".join(block.get("text", "") for block in blocks if block.get("type") == "text")
    calls = [
        {
            "id": block.get("id", ""),
            "type": "function",
            "function": {
                "name": names.up(str(block.get("name", ""))),
                "arguments": json.dumps(block.get("input", {})),
            },
        }
        for block in blocks
        if block.get("type") == "tool_use"
    ]
    if not text and not calls:
        return []
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return [message]


def _user_messages(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool results first (each a ``tool`` message answering its call), then the user's parts."""
    results = [
        {
            "role": "tool",
            "tool_call_id": block.get("tool_use_id", ""),
            "content": _tool_result_text(block),
        }
        for block in blocks
        if block.get("type") == "tool_result"
    ]
    parts = [part for block in blocks if (part := _user_part(block)) is not None]
    if not parts:
        return results
    if all(part["type"] == "text" for part in parts):
        return [*results, {"role": "user", "content": "".join(p["text"] for p in parts)}]
    return [*results, {"role": "user", "content": parts}]


def _user_part(block: dict[str, Any]) -> dict[str, Any] | None:
    kind = block.get("type")
    if kind == "text":
        return {"type": "text", "text": str(block.get("text", ""))}
    if kind == "image":
        source = block.get("source") or {}
        if source.get("type") == "base64":
            url = f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
        elif source.get("type") == "url":
            url = str(source.get("url", ""))
        else:
            return None
        return {"type": "image_url", "image_url": {"url": url}}
    return None


def _tool_result_text(block: dict[str, Any]) -> str:
    content = block.get("content", "")
    text = content if isinstance(content, str) else _system_text(content)
    return f"Error: {text}" if block.get("is_error") and text else text


def _is_client_tool(tool: Any) -> bool:
    """A function tool the client runs (server tools such as web search are Anthropic's own)."""
    return isinstance(tool, dict) and tool.get("type") in (None, "custom") and "name" in tool


def _function(tool: dict[str, Any], names: _ToolNames) -> dict[str, Any]:
    function: dict[str, Any] = {"name": names.up(str(tool["name"]))}
    if tool.get("description"):
        function["description"] = tool["description"]
    function["parameters"] = tool.get("input_schema") or {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


def _tool_choice(choice: Any, names: _ToolNames) -> tuple[Any, bool | None] | None:
    if not isinstance(choice, dict):
        return None
    parallel = False if choice.get("disable_parallel_tool_use") else None
    kind = choice.get("type")
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", None
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": names.up(choice["name"])}}, parallel
    raise _invalid("tool_choice: type should be 'auto', 'any', 'tool' or 'none'.")


# --- answer: chat completions -> Anthropic Messages --------------------------------------------


def from_chat(chat: dict[str, Any], translation: Translation) -> dict[str, Any]:
    """The Messages answer for a chat-completions answer."""
    choice = (chat.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or _tool_id(),
                "name": translation.tool_names.get(function.get("name"), function.get("name")),
                "input": _arguments(function.get("arguments")),
            }
        )
    stop_reason, stop_sequence = _stop(choice, translation)
    return {
        "id": translation.message_id,
        "type": "message",
        "role": "assistant",
        "model": translation.model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage_body(parse_usage(chat.get("usage")) or Usage()),
    }


def usage_body(usage: Usage) -> dict[str, int]:
    """Anthropic's usage: ``input_tokens`` excludes the cached part, which is reported apart."""
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    return {
        "input_tokens": usage.prompt_tokens - cached,
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


def _stop(choice: dict[str, Any], translation: Translation) -> tuple[str | None, str | None]:
    finish = choice.get("finish_reason")
    if finish is None:
        return None, None
    # vLLM-based servers name the stop string that ended the answer.
    matched = choice.get("stop_reason")
    if finish == "stop" and isinstance(matched, str) and matched in translation.stop_sequences:
        return "stop_sequence", matched
    return STOP_REASONS.get(finish, "end_turn"), None


def _arguments(arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments or "{}")
    except (TypeError, ValueError):
        return {"_raw": arguments}
    return value if isinstance(value, dict) else {"_value": value}


def _message_id() -> str:
    return "msg_" + os.urandom(12).hex()


def _tool_id() -> str:
    return "toolu_" + os.urandom(12).hex()


# --- stream: chat-completion chunks -> Messages events -----------------------------------------


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(payload).encode() + b"\n\n"


PING_INTERVAL_S = 10.0  # a stream silent this long gets a ping event
PING = b'event: ping\ndata: {"type": "ping"}\n\n'

_TEXT_DELTA = (
    b"event: content_block_delta\ndata: "
    b'{"type": "content_block_delta", "index": %d, "delta": {"type": "text_delta", "text": %s}}\n\n'
)


class MessagesStream(ChunkTranslator):
    """Translates a chat-completions stream into Messages events, one upstream chunk at a time.

    Blocks are split by kind (thinking, text, each tool call); ``message_start`` carries the
    router's input estimate until the upstream's usage arrives in ``message_delta``.
    """

    def __init__(self, request: ClientRequest) -> None:
        super().__init__(request)
        self.keepalive = (PING, PING_INTERVAL_S)
        self.block: str | None = None  # "thinking", "text" or "tool:N"
        self.index = -1
        self.tool_blocks: dict[int, int] = {}  # upstream tool call index -> block index

    def _failed(self, message: str, status: int) -> bytes:
        self.done = True
        return _event("error", error_body(status, message))

    def _start(self) -> bytes:
        self.started = True
        message = {
            "id": self.translation.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.translation.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": self.estimated_input,
                "output_tokens": 0,
                "cache_read_input_tokens": 0,
                "cache_creation_input_tokens": 0,
            },
        }
        return _event("message_start", {"type": "message_start", "message": message}) + _event(
            "ping", {"type": "ping"}
        )

    def _choice(self, choice: dict[str, Any]) -> bytes:
        out = []
        delta = choice.get("delta") or {}
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            out.append(self._delta("thinking", {"type": "thinking_delta", "thinking": reasoning}))
            self.text_chars += len(reasoning)
        text = delta.get("content")
        if isinstance(text, str) and text:
            out.append(self._delta("text", {"type": "text_delta", "text": text}))
            self.text_chars += len(text)
        for call in delta.get("tool_calls") or ():
            out.append(self._tool_delta(call))
        return b"".join(out)

    def _open(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close_block()
        self.index += 1
        self.block = kind
        return out + _event(
            "content_block_start",
            {"type": "content_block_start", "index": self.index, "content_block": block},
        )

    def _close_block(self) -> bytes:
        if self.block is None:
            return b""
        self.block = None
        return _event("content_block_stop", {"type": "content_block_stop", "index": self.index})

    def _text_json(self, text: bytes) -> bytes:
        out = b"" if self.block == "text" else self._open("text", {"type": "text", "text": ""})
        return out + _TEXT_DELTA % (self.index, text)

    def _delta(self, kind: str, delta: dict[str, Any], index: int | None = None) -> bytes:
        out = b""
        if index is None and self.block != kind:
            empty = {"type": "text", "text": ""}
            if kind == "thinking":
                empty = {"type": "thinking", "thinking": "", "signature": ""}
            out = self._open(kind, empty)
        payload = {
            "type": "content_block_delta",
            "index": self.index if index is None else index,
            "delta": delta,
        }
        return out + _event("content_block_delta", payload)

    def _tool_delta(self, call: dict[str, Any]) -> bytes:
        position = call.get("index", 0)
        function = call.get("function") or {}
        out = b""
        if position not in self.tool_blocks:
            name = function.get("name") or ""
            block = {
                "type": "tool_use",
                "id": call.get("id") or _tool_id(),
                "name": self.translation.tool_names.get(name, name),
                "input": {},
            }
            out = self._open(f"tool:{position}", block)
            self.tool_blocks[position] = self.index
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            self.text_chars += len(arguments)
            delta = {"type": "input_json_delta", "partial_json": arguments}
            out += self._delta("", delta, index=self.tool_blocks[position])
        return out

    def _end(self) -> bytes:
        self.done = True
        finish = self.finish or {"finish_reason": "stop"}
        stop_reason, stop_sequence = _stop(finish, self.translation)
        usage = usage_body(self.usage) if self.usage is not None else None
        if usage is None:
            usage = {"input_tokens": self.estimated_input, "output_tokens": 0}
        delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
        return (
            self._close_block()
            + _event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})
            + _event("message_stop", {"type": "message_stop"})
        )


# --- the front ---------------------------------------------------------------------------------


# --- native pass-through: upstreams that speak Messages themselves ------------------------------

# Betas each native host is known to refuse; to any other host no beta is forwarded.
ACCEPTED_BETAS = {"api.anthropic.com": lambda beta: not beta.startswith("oauth-")}


class MessagesCall(NativeCall):
    def headers_for(self, base_url: str) -> dict[str, str]:
        headers = {"anthropic-version": self.headers.get("anthropic-version", ANTHROPIC_VERSION)}
        accepts = ACCEPTED_BETAS.get(httpx.URL(base_url).host)
        betas = [b.strip() for b in self.headers.get("anthropic-beta", "").split(",") if b.strip()]
        kept = [beta for beta in betas if accepts is not None and accepts(beta)]
        if kept:
            headers["anthropic-beta"] = ",".join(kept)
        return headers


def native_call(body: dict[str, Any], headers: Mapping[str, str]) -> NativeCall:
    forwarded = {
        name: headers[name] for name in ("anthropic-version", "anthropic-beta") if name in headers
    }
    return MessagesCall(protocol="anthropic", path="messages", body=body, headers=forwarded)


def native_json(content: bytes) -> tuple[bytes, Usage | None, int]:
    try:
        answer = json.loads(content)
    except ValueError:
        answer = None
    usage = parse_anthropic_usage(answer.get("usage")) if isinstance(answer, dict) else None
    return content, usage, 0 if usage is not None else text_chars(content)


class NativeMessagesStream:
    """A Messages stream from an upstream that speaks it: forwarded byte for byte, its usage read
    from ``message_start`` and ``message_delta`` (cumulative counts replace earlier ones)."""

    def __init__(self, request: ClientRequest) -> None:
        self.buffer = b""
        self.counts: dict[str, Any] = {}
        self.usage: Usage | None = None
        self.text_chars = 0
        self.error = ""
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        payloads, self.buffer = events_of(self.buffer + chunk)
        for payload in payloads:
            self._read(payload)
        return chunk

    def close(self) -> bytes:
        payloads, _ = events_of(self.buffer + b"\n\n")
        self.buffer = b""
        for payload in payloads:
            self._read(payload)
        if self.done or self.error:
            return b""
        self.error = INCOMPLETE
        return self.fail(GatewayError(502, self.error), "")

    def fail(self, error: GatewayError, request_id: str) -> bytes:
        self.done = True
        return _event("error", error_body(error.status, error.message))

    def _read(self, payload: bytes) -> None:
        if b'"usage"' not in payload and b'"error"' not in payload:
            if b"message_stop" in payload:
                self.done = True
            else:
                self.text_chars += text_chars(payload)
            return
        try:
            event = json.loads(payload)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        if event.get("type") == "error":
            self.error = upstream_message(payload)
            return
        usage = event.get("usage") or (event.get("message") or {}).get("usage")
        if isinstance(usage, dict):
            self.counts.update({k: v for k, v in usage.items() if v is not None})
            self.usage = parse_anthropic_usage(self.counts)


MESSAGES = TranslatedFront(
    endpoint=ENDPOINT,
    to_chat=to_chat,
    input_tokens=input_tokens,
    from_chat=from_chat,
    stream=MessagesStream,
    render_error=error_response,
    native=NativeDialect(call=native_call, read_json=native_json, stream=NativeMessagesStream),
)


def count_tokens(raw: bytes) -> dict[str, int]:
    body = load_body(raw)
    if not isinstance(body.get("messages"), list):
        raise _invalid("messages: Field required (an array).")
    return {"input_tokens": input_tokens(body)}


def model_list(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """``GET /v1/models`` in Anthropic's shape (asked for with an ``anthropic-version`` header)."""
    data = [
        {
            "type": "model",
            "id": entry["id"],
            "display_name": entry["id"],
            "created_at": datetime.fromtimestamp(entry.get("created") or 0, UTC)
            .isoformat()
            .replace("+00:00", "Z"),
            "lifecycle": "active",
        }
        for entry in entries
    ]
    return {
        "data": data,
        "has_more": False,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }

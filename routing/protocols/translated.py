"""What every protocol translated to and from chat completions shares: reading the request into a
``ClientRequest`` that carries its translation, the non-streamed answer, and a stream translator
that parses each upstream chunk once and hands its choices to the protocol's event writer."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.http import HttpResponse

from billing.usage import Usage, parse_usage
from providers.upstream import upstream_message
from routing.dispatcher import ProviderPreferences
from routing.errors import GatewayError
from routing.requests import ClientRequest, NativeCall, load_body
from routing.sse import events_of, text_chars

if TYPE_CHECKING:
    from routing.protocols import StreamTranslator

INCOMPLETE = "the upstream stream ended before the answer was complete"

# Most chunks of a stream carry a piece of text and nothing else: those are translated from their
# bytes, the JSON string spliced into the protocol's event, without parsing the chunk.
# (One regex for the markers and possessive runs in the string: half the CPU of a chunk's test.)
_CONTENT = re.compile(rb'"content"\s*:\s*("[^"\\]*+(?:\\.[^"\\]*+)*+")')
_OPEN_FINISH = re.compile(rb'"finish_reason"\s*:\s*null')
_NOT_ONLY_TEXT = re.compile(rb'"(?:tool_calls"|reasoning|usage"|error"|refusal")')


def only_text(payload: bytes) -> bytes | None:
    """The JSON string of a chunk whose one choice carries text alone, or None."""
    if (
        _NOT_ONLY_TEXT.search(payload)
        or payload.count(b'"delta"') != 1
        or not _OPEN_FINISH.search(payload)
    ):
        return None
    match = _CONTENT.search(payload)
    return match.group(1) if match else None


class ChunkTranslator:
    """A stream translated from chat-completion chunks as they arrive.

    Subclasses write the protocol's events: ``_start`` (before the first chunk), ``_choice`` (each
    choice of each chunk), ``_end`` (the upstream finished) and ``_failed`` (it did not).
    """

    def __init__(self, request: ClientRequest) -> None:
        self.translation = request.context
        self.estimated_input = request.prompt_tokens
        self.buffer = b""
        self.usage: Usage | None = None
        self.text_chars = 0
        self.error = ""
        self.done = False
        self.started = False
        self.finish: dict[str, Any] | None = None  # the choice that carried finish_reason

    def feed(self, chunk: bytes) -> bytes:
        data = self.buffer + chunk if self.buffer else chunk
        payloads, self.buffer = events_of(data)
        out = [] if self.started else [self._start()]
        out += [self._translate(payload) for payload in payloads]
        return b"".join(out)

    def close(self) -> bytes:
        out = []
        if self.buffer.strip():
            payloads, _ = events_of(self.buffer + b"\n\n")
            out += [self._translate(payload) for payload in payloads]
        self.buffer = b""
        if not self.done:
            if self.finish is not None:
                out.append(self._end())
            else:
                self.error = INCOMPLETE
                out.append(self._failed(self.error, 502))
        return b"".join(out)

    def fail(self, error: GatewayError, request_id: str) -> bytes:
        start = b"" if self.started else self._start()
        return start + self._failed(error.message, error.status)

    def _translate(self, payload: bytes) -> bytes:
        if self.done:
            return b""
        if payload == b"[DONE]":
            return self._end()
        text = only_text(payload)
        if text is not None:
            if len(text) == 2:  # ""
                return b""
            self.text_chars += len(text) - 2
            return self._text_json(text)
        try:
            chunk = json.loads(payload)
        except ValueError:
            return b""
        if not isinstance(chunk, dict):
            return b""
        if "error" in chunk:
            self.error = upstream_message(payload)
            return self._failed(self.error, 502)
        if chunk.get("usage"):
            self.usage = parse_usage(chunk["usage"]) or self.usage
        out = []
        for choice in chunk.get("choices") or ():
            out.append(self._choice(choice))
            if choice.get("finish_reason"):
                self.finish = choice
        return b"".join(out)

    def _start(self) -> bytes:
        raise NotImplementedError

    def _choice(self, choice: dict[str, Any]) -> bytes:
        raise NotImplementedError

    def _text_json(self, text: bytes) -> bytes:
        """The events for a piece of text, given as its JSON string."""
        raise NotImplementedError

    def _end(self) -> bytes:
        raise NotImplementedError

    def _failed(self, message: str, status: int) -> bytes:
        raise NotImplementedError


@dataclass(frozen=True)
class NativeDialect:
    """How a protocol passes through to an upstream that speaks it: the call to forward, and the
    readers of its answer (the client's bytes unchanged, usage read on the way)."""

    call: Callable[[dict[str, Any], Mapping[str, str]], NativeCall]
    read_json: Callable[[bytes], tuple[bytes, Usage | None, int]]
    stream: Callable[[ClientRequest], StreamTranslator]


@dataclass(frozen=True)
class TranslatedFront:
    """A client protocol answered by chat-completions upstreams, from its pure translations."""

    endpoint: str
    to_chat: Callable[[dict[str, Any]], tuple[dict[str, Any], Any]]
    input_tokens: Callable[[dict[str, Any]], int]
    from_chat: Callable[[dict[str, Any], Any], dict[str, Any]]
    stream: type[ChunkTranslator]
    render_error: Callable[[GatewayError], HttpResponse]
    native: NativeDialect | None = None  # for upstreams that speak this protocol themselves

    def parse(self, raw: bytes, headers: Mapping[str, str] | None = None) -> ClientRequest:
        body = load_body(raw)
        chat, translation = self.to_chat(body)
        native = self.native.call(body, headers or {}) if self.native is not None else None
        return ClientRequest(
            endpoint="chat/completions",
            body=chat,
            model=chat["model"],
            stream=bool(chat.get("stream")),
            kind="chat",
            prompt_tokens=self.input_tokens(body),
            output_tokens=chat.get("max_tokens") or settings.KEYAOS_DEFAULT_MAX_TOKENS,
            preferences=ProviderPreferences(),
            context=translation,
            native=native,
            reasoning=translation.reasoning,
        )

    def read_json(
        self, request: ClientRequest, content: bytes, native: bool = False
    ) -> tuple[bytes, Usage | None, int]:
        if native:
            return self.native.read_json(content)
        try:
            chat = json.loads(content)
        except ValueError:
            chat = None
        if not isinstance(chat, dict):
            chat = {}
        answer = self.from_chat(chat, request.context)
        usage = parse_usage(chat.get("usage"))
        return json.dumps(answer).encode(), usage, 0 if usage is not None else text_chars(content)

    def stream_translator(self, request: ClientRequest, native: bool = False) -> StreamTranslator:
        return self.native.stream(request) if native else self.stream(request)

    def error_response(self, error: GatewayError) -> HttpResponse:
        return self.render_error(error)

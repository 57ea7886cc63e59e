"""Client protocols of ``/v1``: each one is a module that reads a request into a ``ClientRequest``,
turns the upstream's answer (and stream) into its own shape and renders errors in it, around the
protocol-free ``routing.failover.Exchange``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from django.http import HttpResponse

from billing.usage import Usage
from routing.errors import GatewayError
from routing.protocols import anthropic, openai, responses  # noqa: F401  (the fronts)
from routing.requests import ClientRequest


class StreamTranslator(Protocol):
    """Reads an upstream stream as it arrives and returns what the client is sent."""

    usage: Usage | None
    text_chars: int  # completion characters seen, for an estimate when usage never came
    error: str  # an error the upstream reported inside the stream
    done: bool  # the stream's proper end was seen

    def feed(self, chunk: bytes) -> bytes: ...

    def close(self) -> bytes: ...

    def fail(self, error: GatewayError, request_id: str) -> bytes:
        """The event that ends a stream interrupted by ``error``."""
        ...


class Front(Protocol):
    endpoint: str  # the ledger's name for it

    def parse(self, raw: bytes, headers: Mapping[str, str] | None = None) -> ClientRequest: ...

    def read_json(
        self, request: ClientRequest, content: bytes, native: bool = False
    ) -> tuple[bytes, Usage | None, int]:
        """An upstream's non-streamed answer: the client's body, its usage, completion chars."""
        ...

    def stream_translator(
        self, request: ClientRequest, native: bool = False
    ) -> StreamTranslator: ...

    def error_response(self, error: GatewayError) -> HttpResponse: ...


def front_for_path(path: str) -> Front:
    """The protocol whose error shape answers ``path``, for errors raised before any view."""
    if path.startswith("/v1/messages"):
        return anthropic.MESSAGES
    return openai.CHAT

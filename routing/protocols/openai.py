"""OpenAI's Chat Completions, Completions and Embeddings: the upstreams' own protocol, so the
request and the answer pass through; the stream is forwarded byte for byte (``routing.sse``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.http import HttpResponse, JsonResponse

from billing.usage import Usage, parse_usage_json
from routing.errors import GatewayError, UpstreamRefused
from routing.requests import ClientRequest, parse_client_request
from routing.sse import StreamReader, text_chars


def error_body(error: GatewayError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": error.type,
            "param": error.param,
            "code": error.code,
        }
    }


def error_response(error: GatewayError) -> HttpResponse:
    if isinstance(error, UpstreamRefused):
        response = HttpResponse(error.body, status=error.status, content_type=error.content_type)
    else:
        response = JsonResponse(error_body(error), status=error.status)
    for name, value in error.headers.items():
        response[name] = value
    return response


class ChatStream(StreamReader):
    def __init__(self, request: ClientRequest) -> None:
        super().__init__(drop_usage_only=request.added_usage_option)

    def fail(self, error: GatewayError, request_id: str) -> bytes:
        body = error_body(error)
        del body["error"]["param"]
        body["error"]["request_id"] = request_id
        return b"data: " + json.dumps(body).encode() + b"\n\n"


@dataclass(frozen=True)
class OpenAIFront:
    endpoint: str

    def parse(self, raw: bytes, headers: Mapping[str, str] | None = None) -> ClientRequest:
        return parse_client_request(self.endpoint, raw)

    def read_json(
        self, request: ClientRequest, content: bytes, native: bool = False
    ) -> tuple[bytes, Usage | None, int]:
        usage = parse_usage_json(content)
        return content, usage, 0 if usage is not None else text_chars(content)

    def stream_translator(self, request: ClientRequest, native: bool = False) -> ChatStream:
        return ChatStream(request)

    def error_response(self, error: GatewayError) -> HttpResponse:
        return error_response(error)


CHAT = OpenAIFront("chat/completions")
COMPLETIONS = OpenAIFront("completions")
EMBEDDINGS = OpenAIFront("embeddings")

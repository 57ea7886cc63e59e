"""The ASGI application that serves ``/v1``, without Django's per-request machinery.

Django's ``ASGIHandler`` runs every request in a new thread-sensitive context, sends the
``request_started``/``request_finished`` signals (which touch database connections), spools the
body to a temporary file and closes the response through ``sync_to_async``: about a fifth of the
gateway's CPU per request, for features ``/v1`` does not use. This handler reads the body (with
the size limit), builds a Django ``ASGIRequest``, calls the resolved django-ninja view and sends
its answer; a streamed answer stops at once when the client disconnects, which cancels the
stream's generator (its ``finally`` closes the upstream and records the request).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time

from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.urls import Resolver404, resolve

from routing.proxy import error_response
from routing.requests import GatewayError, body_too_large

logger = logging.getLogger("keyaos.gateway")

_JSON_TYPES = ("application/json", "text/event-stream")


class BodyTooLarge(Exception):
    pass


class GatewayApplication:
    async def __call__(self, scope, receive, send) -> None:
        started = time.perf_counter()
        try:
            body = await _read_body(receive, settings.KEYAOS_MAX_BODY_BYTES)
        except BodyTooLarge:
            await _send_response(error_response(body_too_large()), send, receive)
            return
        except _Disconnected:
            return
        request = ASGIRequest(scope, io.BytesIO(body))
        request.started = started
        response = await self.get_response(request)
        await _send_response(response, send, receive)

    async def get_response(self, request: HttpRequest) -> HttpResponse:
        try:
            match = resolve(request.path_info)
        except Resolver404:
            return error_response(_error_for(request, 404))
        try:
            response = await match.func(request, *match.args, **match.kwargs)
        except GatewayError as error:
            return error_response(error)
        except Exception:
            logger.exception("unhandled error on %s %s", request.method, request.path)
            return error_response(_error_for(request, 500))
        if response.status_code >= 400 and not response.get("Content-Type", "").startswith(
            _JSON_TYPES
        ):
            return error_response(_error_for(request, response.status_code, response))
        return response


class _Disconnected(Exception):
    pass


async def _read_body(receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _send_response(response: HttpResponse, send, receive) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.items()]
    if not response.streaming:
        content = response.content
        headers.append((b"content-length", str(len(content)).encode()))
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        await send({"type": "http.response.body", "body": content})
        return
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    streaming = asyncio.ensure_future(_send_stream(response, send))
    disconnect = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait({streaming, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (streaming, disconnect):
            if not task.done():
                task.cancel()
        await asyncio.gather(streaming, disconnect, return_exceptions=True)


async def _send_stream(response: StreamingHttpResponse, send) -> None:
    async for chunk in response.streaming_content:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _wait_for_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _error_for(
    request: HttpRequest, status: int, response: HttpResponse | None = None
) -> GatewayError:
    if status == 404:
        return GatewayError(
            404, f"Unknown endpoint: {request.method} {request.path}", code="unknown_url"
        )
    if status == 405:
        allow = response.get("Allow", "") if response is not None else ""
        return GatewayError(
            405,
            f"Method {request.method} is not allowed on {request.path}.",
            code="method_not_allowed",
            headers={"Allow": allow},
        )
    if status >= 500:
        return GatewayError(
            500, "Internal gateway error.", type="server_error", code="internal_error"
        )
    return GatewayError(status, f"The request was rejected ({status}).")

"""The ASGI application that serves ``/v1``, without Django's per-request machinery.

Django's ``ASGIHandler`` runs every request in a new thread-sensitive context, sends the
``request_started``/``request_finished`` signals (which touch database connections), spools the
body to a temporary file and closes the response through ``sync_to_async``: about a fifth of the
gateway's CPU per request, for features ``/v1`` does not use. This handler reads the body (with
the size limit), builds a Django ``ASGIRequest``, calls the resolved django-ninja view and sends
its answer. A client that disconnects cancels the work for it at once: before the answer, the
view (and the upstream call, recorded as ``disconnected``); during a stream, the stream's generator
(its ``finally`` closes the upstream and records the request).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time

from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.urls import Resolver404, resolve

from routing import errors
from routing.errors import GatewayError
from routing.protocols import front_for_path

logger = logging.getLogger("keyaos.gateway")

_JSON_TYPES = ("application/json", "text/event-stream")


class BodyTooLarge(Exception):
    pass


class GatewayApplication:
    async def __call__(self, scope, receive, send) -> None:
        started = time.perf_counter()
        request_id = new_request_id()
        try:
            async with asyncio.timeout(settings.KEYAOS_BODY_TIMEOUT_S):
                body = await _read_body(receive, settings.KEYAOS_MAX_BODY_BYTES)
        except BodyTooLarge:
            response = front_for_path(scope["path"]).error_response(errors.body_too_large())
            await _send_response(response, request_id, send)
            return
        except TimeoutError:
            # Answered without waiting for the rest; uvicorn closes the connection, whose body
            # was never read to its end.
            response = front_for_path(scope["path"]).error_response(errors.body_too_slow())
            response["Connection"] = "close"
            await _send_response(response, request_id, send)
            return
        except _Disconnected:
            return
        request = ASGIRequest(scope, io.BytesIO(body))
        request.started = started
        request.request_id = request_id
        hang_up = _HangUp(receive)
        try:
            response = await self.get_response(request)
            await _send_response(response, request_id, send)
        except asyncio.CancelledError:
            if hang_up.cancelled_us():
                return
            raise
        finally:
            hang_up.stop()

    async def get_response(self, request: HttpRequest) -> HttpResponse:
        """The view's answer; errors (the views' GatewayErrors and the rest) in the path's
        protocol."""
        try:
            match = resolve(request.path_info)
        except Resolver404:
            return _error_response(request, errors.unknown_endpoint(request.method, request.path))
        try:
            response = await match.func(request, *match.args, **match.kwargs)
        except GatewayError as error:  # raised outside django-ninja's exception handler
            return _error_response(request, error)
        except Http404:  # django-ninja's root view: /v1/ itself is no endpoint
            return _error_response(request, errors.unknown_endpoint(request.method, request.path))
        except Exception:
            logger.exception("unhandled error on %s %s", request.method, request.path)
            return _error_response(request, errors.internal_error())
        if response.status_code >= 400 and not response.get("Content-Type", "").startswith(
            _JSON_TYPES
        ):
            return _error_response(request, _error_for(request, response))
        return response


async def refuse_websocket(scope, receive, send) -> None:
    """No WebSocket anywhere: a 426 (Codex then falls back to HTTP at once), or a plain close
    where the server cannot send an HTTP answer to an upgrade."""
    if (await receive())["type"] != "websocket.connect":
        return
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    response = front_for_path(scope["path"]).error_response(errors.upgrade_refused())
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.items()]
    headers.append((b"x-request-id", new_request_id().encode()))
    await send({"type": "websocket.http.response.start", "status": 426, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": response.content})


def new_request_id() -> str:
    return "req_" + os.urandom(16).hex()


def _error_response(request: HttpRequest, error: GatewayError) -> HttpResponse:
    return front_for_path(request.path).error_response(error)


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


async def _send_response(response: HttpResponse, request_id: str, send) -> None:
    if "x-request-id" not in response:
        response["x-request-id"] = request_id
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
    await _send_stream(response, send)


async def _send_stream(response: StreamingHttpResponse, send) -> None:
    keepalive = getattr(response, "keepalive", None)
    if keepalive is None:
        async for chunk in response.streaming_content:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    else:
        await _send_with_keepalive(response, send, *keepalive)
    await send({"type": "http.response.body", "body": b""})


async def _send_with_keepalive(
    response: StreamingHttpResponse, send, event: bytes, interval_s: float
) -> None:
    """Relay the stream, sending ``event`` whenever nothing went out for ``interval_s``.

    The stream yields whole events, so a keep-alive event never lands inside another. A timer,
    not a task: a stream that is never silent that long costs one timer, not a task to cancel.
    """
    loop = asyncio.get_running_loop()
    sent = True
    pings: set[asyncio.Task] = set()

    def tick() -> None:
        nonlocal sent, timer
        if not sent:
            ping = loop.create_task(
                send({"type": "http.response.body", "body": event, "more_body": True})
            )
            pings.add(ping)
            ping.add_done_callback(pings.discard)
        sent = False
        timer = loop.call_later(interval_s, tick)

    timer = loop.call_later(interval_s, tick)
    try:
        async for chunk in response.streaming_content:
            sent = True
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    finally:
        timer.cancel()
        for ping in pings:
            ping.cancel()


class _HangUp:
    """Cancels the request's own task when its client disconnects while it is served, streamed
    or not: the upstream call stops with it and the exchange records the request as
    disconnected. One watching task per request, and the view runs in the request's task: a
    task of its own and ``asyncio.wait`` cost a tenth of the gateway's CPU per request."""

    def __init__(self, receive) -> None:
        self.task = asyncio.current_task()
        self.serving = True
        self.hung_up = False
        self.watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        self.watcher.add_done_callback(self._watched)

    def _watched(self, watcher: asyncio.Future) -> None:
        # uvicorn also answers "disconnect" once the response is complete: by then
        # ``serving`` is off.
        if self.serving and not watcher.cancelled() and watcher.exception() is None:
            self.hung_up = True
            self.task.cancel()

    def cancelled_us(self) -> bool:
        """Whether the CancelledError being handled is the hang-up's (then it is absorbed)."""
        return self.hung_up and self.task.uncancel() == 0

    def stop(self) -> None:
        self.serving = False
        self.watcher.cancel()


async def _wait_for_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _error_for(request: HttpRequest, response: HttpResponse) -> GatewayError:
    """A non-JSON error answer from below the views (django-ninja's 404 and 405)."""
    status = response.status_code
    if status == 404:
        return errors.unknown_endpoint(request.method, request.path)
    if status == 405:
        return errors.method_not_allowed(request.method, request.path, response.get("Allow", ""))
    if status >= 500:
        return errors.internal_error()
    return errors.rejected(status)

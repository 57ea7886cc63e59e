"""ASGI entry point: ``/v1`` gets a lean handler, everything else the full Django stack.

Django's middleware and request handling cost many sync/async thread hops per request; the gateway
needs none of it (it authenticates with API keys and answers JSON), while the admin needs all of
it. A small lifespan wrapper starts and stops the per-process gateway runtime.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "keyaos.settings")

import django

django.setup(set_prefix=False)

from django.conf import settings  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.core.handlers.asgi import ASGIHandler  # noqa: E402

from keyaos.lib import metrics  # noqa: E402
from routing import ops, runtime  # noqa: E402
from routing.asgi import GatewayApplication, refuse_websocket  # noqa: E402

django_application = ASGIHandler()
gateway_application = GatewayApplication()


async def application(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    elif scope["type"] == "http" and scope["path"].startswith("/v1"):
        if not settings.KEYAOS_METRICS:
            await gateway_application(scope, receive, send)
            return
        metrics.IN_FLIGHT.inc()
        try:
            await gateway_application(scope, receive, send)
        finally:
            metrics.IN_FLIGHT.dec()
    elif scope["type"] == "http" and scope["method"] == "HEAD" and scope["path"] == "/":
        await _alive(send)  # Claude Code probes its base URL before the first request
    elif scope["type"] == "websocket":
        await refuse_websocket(scope, receive, send)
    elif scope["type"] == "http" and scope["path"] in ops.PATHS:
        await ops.application(scope, receive, send)
    else:
        await django_application(scope, receive, send)


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await runtime.startup()
            except ImproperlyConfigured as error:  # the server must not start, and say why
                await send({"type": "lifespan.startup.failed", "message": str(error)})
                return
            ops.install_drain()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await runtime.shutdown()
            metrics.forget_this_process()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _alive(send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})

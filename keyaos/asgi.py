"""ASGI entry point: ``/v1`` gets a lean handler, everything else the full Django stack.

Django's default middleware costs about fifteen sync/async thread hops per request; the gateway
needs none of it (it authenticates with API keys and answers JSON), while the admin needs all of
it. A small lifespan wrapper opens and closes the per-process upstream client.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "keyaos.settings")

import django

django.setup(set_prefix=False)

from django.core.handlers.asgi import ASGIHandler  # noqa: E402
from django.core.handlers.exception import convert_exception_to_response  # noqa: E402

from routing import runtime  # noqa: E402
from routing.middleware import openai_errors  # noqa: E402


class GatewayASGIHandler(ASGIHandler):
    """Django's ASGI handler without middleware, for the ``/v1`` API."""

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        self._middleware_chain = convert_exception_to_response(
            openai_errors(convert_exception_to_response(self._get_response_async))
        )


django_application = ASGIHandler()
gateway_application = GatewayASGIHandler()


async def application(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    elif scope["type"] == "http" and scope["path"].startswith("/v1"):
        await gateway_application(scope, receive, send)
    else:
        await django_application(scope, receive, send)


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await runtime.startup()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await runtime.shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return

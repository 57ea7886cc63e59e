"""Bench-only experiment: the gateway with httpx's API on aiohttp's engine (``httpx-aiohttp``).

``make bench TRANSPORT=aiohttp`` serves ``bench.aiohttp_gateway:application``: Keyaos unchanged,
except that the per-process upstream client gets an ``AiohttpTransport``. It measures the idea
without changing the project's code; ``httpx-aiohttp`` is installed for the experiment only.
"""

from __future__ import annotations

import httpx
from django.conf import settings
from httpx_aiohttp import AiohttpTransport

from keyaos.asgi import application
from routing import runtime


def new_upstream_client() -> httpx.AsyncClient:
    """Same limits and timeouts as ``routing.runtime.new_upstream_client``."""
    timeout = httpx.Timeout(
        connect=settings.KEYAOS_CONNECT_TIMEOUT_S,
        read=settings.KEYAOS_READ_TIMEOUT_S,
        write=30.0,
        pool=settings.KEYAOS_CONNECT_TIMEOUT_S,
    )
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200, keepalive_expiry=60)
    return httpx.AsyncClient(
        transport=AiohttpTransport(limits=limits, trust_env=False),
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
    )


runtime.new_upstream_client = new_upstream_client

__all__ = ["application"]

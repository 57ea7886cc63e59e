"""Who is calling ``/v1`` and whether that key may call from here, now: a client API key (keyed
hash, looked up in the snapshot), its expiry and its allowed client IPs.

The client IP is the ASGI peer address (``REMOTE_ADDR``). Behind a reverse proxy, uvicorn's
``--proxy-headers`` with ``--forwarded-allow-ips`` (``FORWARDED_ALLOW_IPS``) decides whether it is
the proxy's address or the one the proxy forwards.
"""

from __future__ import annotations

import hmac

from django.conf import settings
from django.http import HttpRequest

from billing.models import hash_api_key
from routing.errors import invalid_api_key, missing_api_key
from routing.snapshot import ClientKey, Snapshot

ADMIN_TOKEN_CLIENT = ClientKey(id=0, name="KEYAOS_ADMIN_TOKEN")


def presented_key(request: HttpRequest) -> str:
    authorization = request.headers.get("Authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key", "").strip()


def authenticate(request: HttpRequest, snapshot: Snapshot) -> ClientKey:
    """The client key presented, or GatewayError 401. Expiry and IPs: ``check_access``."""
    plain = presented_key(request)
    if not plain:
        raise missing_api_key()
    admin_token = settings.KEYAOS_ADMIN_TOKEN
    if admin_token and hmac.compare_digest(plain.encode(), admin_token.encode()):
        return ADMIN_TOKEN_CLIENT
    client = snapshot.client_keys.get(hash_api_key(plain))
    if client is None:
        raise invalid_api_key()
    return client


def client_ip(request: HttpRequest) -> str | None:
    return request.META.get("REMOTE_ADDR") or None


def check_access(request: HttpRequest, client: ClientKey) -> None:
    """Raise LimitExceeded when this known key may not call now from this address."""
    if client.limits is not None:
        client.limits.check_access(client_ip(request))

"""Who is calling ``/v1``: a client API key (keyed hash, looked up in the snapshot)."""

from __future__ import annotations

import hmac

from django.conf import settings
from django.http import HttpRequest

from billing.models import hash_api_key
from routing.requests import GatewayError
from routing.snapshot import ClientKey, Snapshot

ADMIN_TOKEN_CLIENT = ClientKey(id=0, name="KEYAOS_ADMIN_TOKEN")


def presented_key(request: HttpRequest) -> str:
    authorization = request.headers.get("Authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key", "").strip()


def authenticate(request: HttpRequest, snapshot: Snapshot) -> ClientKey:
    plain = presented_key(request)
    if not plain:
        raise GatewayError(
            401,
            "Missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'.",
            code="missing_api_key",
        )
    admin_token = settings.KEYAOS_ADMIN_TOKEN
    if admin_token and hmac.compare_digest(plain.encode(), admin_token.encode()):
        return ADMIN_TOKEN_CLIENT
    client = snapshot.client_keys.get(hash_api_key(plain))
    if client is None:
        raise GatewayError(401, "Invalid API key.", code="invalid_api_key")
    return client

"""The OpenAI-compatible ``/v1`` API: thin async views over the proxy and the snapshot."""

from __future__ import annotations

import time

from django.http import HttpRequest, HttpResponse, JsonResponse
from ninja import NinjaAPI

from billing.limits import LimitExceeded
from billing.models import LedgerEntry
from routing.auth import access_denial, authenticate, limit_error
from routing.catalog import list_models, model_entry
from routing.proxy import Proxy, error_response, refuse
from routing.requests import GatewayError, parse_client_request
from routing.runtime import runtime
from routing.snapshot import ClientKey, Snapshot

api = NinjaAPI(
    title="Keyaos",
    description="OpenAI-compatible gateway over pooled provider keys.",
    urls_namespace="v1",
    docs_url=None,
    openapi_url=None,
)


async def _proxy(request: HttpRequest, endpoint: str) -> HttpResponse:
    # routing.asgi stamps the request when its first byte arrives; fall back for other servers.
    started = getattr(request, "started", None) or time.perf_counter()
    gateway = await runtime.ready()
    try:
        client = authenticate(request, gateway.snapshot)
    except GatewayError as error:
        return error_response(error)
    denial = access_denial(request, client)
    try:
        # routing.asgi read the body already, refusing one over KEYAOS_MAX_BODY_BYTES.
        client_request = parse_client_request(endpoint, request.body)
    except GatewayError as error:
        if denial is None:
            return error_response(error)
        return refuse(gateway, client, endpoint, denial, started=started)
    proxy = Proxy(gateway, client_request, client=client, started=started)
    if denial is not None:
        return proxy.fail(denial, LedgerEntry.Outcome.CLIENT_ERROR)
    return await proxy.respond()


@api.post("/chat/completions", include_in_schema=False)
async def chat_completions(request: HttpRequest) -> HttpResponse:
    return await _proxy(request, "chat/completions")


@api.post("/completions", include_in_schema=False)
async def completions(request: HttpRequest) -> HttpResponse:
    return await _proxy(request, "completions")


@api.post("/embeddings", include_in_schema=False)
async def embeddings(request: HttpRequest) -> HttpResponse:
    return await _proxy(request, "embeddings")


@api.get("/models", include_in_schema=False)
async def models(request: HttpRequest) -> HttpResponse:
    gateway = await runtime.ready()
    try:
        client = _allowed_client(request, gateway.snapshot)
    except GatewayError as error:
        return error_response(error)
    entries = list_models(gateway.snapshot, gateway.board)
    if client.limits is not None:
        entries = [entry for entry in entries if client.limits.allows_model(entry["id"])]
    return JsonResponse({"object": "list", "data": entries})


@api.get("/models/{path:model}", include_in_schema=False)
async def model(request: HttpRequest, model: str) -> HttpResponse:
    gateway = await runtime.ready()
    try:
        client = _allowed_client(request, gateway.snapshot)
        entry = model_entry(gateway.snapshot, gateway.board, model)
        if client.limits is not None:
            client.limits.check_model(model, entry["id"])
        return JsonResponse(entry)
    except LimitExceeded as refusal:
        return error_response(limit_error(refusal))
    except GatewayError as error:
        return error_response(error)


def _allowed_client(request: HttpRequest, snapshot: Snapshot) -> ClientKey:
    client = authenticate(request, snapshot)
    denial = access_denial(request, client)
    if denial is not None:
        raise denial
    return client

"""The ``/v1`` API: thin async views that raise; errors are rendered in the path's protocol."""

from __future__ import annotations

import time

from django.http import HttpRequest, HttpResponse, JsonResponse
from ninja import NinjaAPI

from routing.auth import authenticate, check_access
from routing.catalog import list_models, model_entry
from routing.errors import GatewayError, internal_error, upgrade_refused
from routing.failover import Exchange
from routing.protocols import Front, anthropic, front_for_path, openai, responses
from routing.runtime import runtime
from routing.snapshot import ClientKey

api = NinjaAPI(
    title="Keyaos",
    description="OpenAI-compatible gateway over pooled provider keys.",
    urls_namespace="v1",
    docs_url=None,
    openapi_url=None,
)


@api.exception_handler(GatewayError)
def gateway_error(request: HttpRequest, error: GatewayError) -> HttpResponse:
    return front_for_path(request.path).error_response(error)


async def serve(request: HttpRequest, front: Front) -> HttpResponse:
    """Any protocol's request: authenticated, recorded from here on, forwarded, translated."""
    # routing.asgi stamps the request when its first byte arrives; fall back for other servers.
    started = getattr(request, "started", None) or time.perf_counter()
    gateway = await runtime.ready()
    client = authenticate(request, gateway.snapshot)
    exchange = Exchange(
        gateway,
        client,
        endpoint=front.endpoint,
        request_id=request_id(request),
        started=started,
    )
    try:
        _begin(exchange, request, front)
        answer = await exchange.forward()
        if exchange.request.stream:
            return exchange.stream_response(answer, front)
        return await exchange.json_response(answer, front)
    except GatewayError as error:
        raise exchange.fail(error) from None
    except Exception:
        exchange.fail(internal_error())
        raise
    except BaseException:
        exchange.abandon()
        raise


def _begin(exchange: Exchange, request: HttpRequest, front: Front) -> None:
    """Read the body; a key that may not call now is told so even when the body is wrong."""
    try:
        # routing.asgi read the body, within the size limit
        exchange.begin(front.parse(request.body, request.headers), headers=request.headers)
    except GatewayError:
        check_access(request, exchange.client)
        raise
    check_access(request, exchange.client)


def request_id(request: HttpRequest) -> str:
    return request.request_id  # set by routing.asgi for every /v1 request


@api.post("/chat/completions", include_in_schema=False)
async def chat_completions(request: HttpRequest) -> HttpResponse:
    return await serve(request, openai.CHAT)


@api.post("/completions", include_in_schema=False)
async def completions(request: HttpRequest) -> HttpResponse:
    return await serve(request, openai.COMPLETIONS)


@api.post("/embeddings", include_in_schema=False)
async def embeddings(request: HttpRequest) -> HttpResponse:
    return await serve(request, openai.EMBEDDINGS)


@api.post("/messages", include_in_schema=False)
async def messages(request: HttpRequest) -> HttpResponse:
    return await serve(request, anthropic.MESSAGES)


@api.post("/messages/count_tokens", include_in_schema=False)
async def count_tokens(request: HttpRequest) -> HttpResponse:
    await runtime.ready()
    _allowed_client(request)
    return JsonResponse(anthropic.count_tokens(request.body))


@api.post("/responses", include_in_schema=False)
async def create_response(request: HttpRequest) -> HttpResponse:
    return await serve(request, responses.RESPONSES)


@api.get("/responses", include_in_schema=False)
async def responses_websocket(request: HttpRequest) -> HttpResponse:
    """Codex tries a WebSocket first; a 426 makes it fall back to HTTP at once."""
    raise upgrade_refused()


@api.get("/models", include_in_schema=False)
async def models(request: HttpRequest) -> HttpResponse:
    gateway = await runtime.ready()
    client = _allowed_client(request)
    entries = list_models(gateway.snapshot, gateway.board)
    if client.limits is not None:
        entries = [entry for entry in entries if client.limits.allows_model(entry["id"])]
    if "anthropic-version" in request.headers:
        return JsonResponse(anthropic.model_list(entries))
    return JsonResponse({"object": "list", "data": entries})


@api.get("/models/{path:model}", include_in_schema=False)
async def model(request: HttpRequest, model: str) -> HttpResponse:
    gateway = await runtime.ready()
    client = _allowed_client(request)
    entry = model_entry(gateway.snapshot, gateway.board, model)
    if client.limits is not None:
        client.limits.check_model(model, entry["id"])
    return JsonResponse(entry)


def _allowed_client(request: HttpRequest) -> ClientKey:
    client = authenticate(request, runtime.snapshot)
    check_access(request, client)
    return client

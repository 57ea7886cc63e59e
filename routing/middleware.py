"""Every ``/v1`` answer is JSON: unknown routes, wrong methods and crashes in the OpenAI format."""

from __future__ import annotations

import logging

from django.http import HttpRequest, HttpResponse

from routing.proxy import error_response
from routing.requests import GatewayError

logger = logging.getLogger("keyaos.gateway")

_JSON_TYPES = ("application/json", "text/event-stream")


def openai_errors(get_response):
    async def middleware(request: HttpRequest) -> HttpResponse:
        response = await get_response(request)
        if response.status_code < 400 or response.get("Content-Type", "").startswith(_JSON_TYPES):
            return response
        return error_response(_error_for(request, response))

    return middleware


def _error_for(request: HttpRequest, response: HttpResponse) -> GatewayError:
    status = response.status_code
    if status == 404:
        return GatewayError(
            404, f"Unknown endpoint: {request.method} {request.path}", code="unknown_url"
        )
    if status == 405:
        return GatewayError(
            405,
            f"Method {request.method} is not allowed on {request.path}.",
            code="method_not_allowed",
            headers={"Allow": response.get("Allow", "")},
        )
    if status == 413:
        return GatewayError(413, "The request body is too large.", code="request_too_large")
    if status >= 500:
        return GatewayError(
            500, "Internal gateway error.", type="server_error", code="internal_error"
        )
    return GatewayError(status, f"The request was rejected ({status}).")

"""Every error ``/v1`` answers, decided here and rendered by the client's protocol.

Views and the failover loop raise a ``GatewayError`` (``keyaos.lib.errors``; the limits' refusals
are one too); the protocol of the path renders it (``routing.protocols``). A failed attempt is an
``AttemptFailure``, typed by its failure class, and what the client sees when every attempt
failed is chosen from those types alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings

from keyaos.lib.errors import GatewayError
from providers.upstream import Failure
from routing.dispatcher import Refusal

__all__ = ["AttemptFailure", "GatewayError", "UpstreamRefused", "UpstreamUnavailable"]

# What the client sees when every candidate failed this way, most telling first.
_ALL_FAILED_STATUS = (
    (Failure.RATE_LIMITED, 429),
    (Failure.TRANSIENT, 502),
    (Failure.EXHAUSTED, 402),
    (Failure.INVALID, 503),
)


class UpstreamUnavailable(GatewayError):
    """No upstream could answer: the gateway's side of the failure, not the client's."""

    def __init__(self, status: int, message: str, *, code: str, retry_after_s: int | None = None):
        super().__init__(
            status, message, type="upstream_error", code=code, retry_after_s=retry_after_s
        )


@dataclass
class AttemptFailure:
    """Why one attempt at one candidate did not answer."""

    failure: Failure
    status: int | None  # the upstream's HTTP status; None when no answer came
    message: str
    retry_after_s: float | None = None
    timed_out: bool = False
    body: bytes = b""  # the upstream's answer, passed back when the request itself was wrong
    content_type: str = "application/json"


class UpstreamRefused(GatewayError):
    """The upstream says the request itself is wrong: its status and message, and its answer
    to pass back to a client of the same protocol."""

    def __init__(self, failure: AttemptFailure) -> None:
        super().__init__(failure.status or 400, failure.message)
        self.body = failure.body
        self.content_type = failure.content_type


def all_attempts_failed(failures: list[AttemptFailure]) -> UpstreamUnavailable:
    classes = {failure.failure for failure in failures}
    status = next((status for kind, status in _ALL_FAILED_STATUS if kind in classes), 502)
    last = failures[-1] if failures else None
    if status == 502 and last is not None and last.timed_out:
        status = 504
    retry_after_s = None
    if status == 429:
        waits = [f.retry_after_s for f in failures if f.retry_after_s is not None]
        if waits:
            retry_after_s = int(min(waits)) + 1
    return UpstreamUnavailable(
        status,
        f"All {len(failures)} attempts failed; last upstream error: "
        f"{last.message if last else '-'}",
        code="upstream_failed",
        retry_after_s=retry_after_s,
    )


def no_candidate(refusal: Refusal) -> GatewayError:
    """No pair could serve: the dispatcher says whose side it is on."""
    if refusal.status < 500 and refusal.status != 429:
        return GatewayError(refusal.status, refusal.message, code=refusal.code, param=refusal.param)
    return UpstreamUnavailable(
        refusal.status, refusal.message, code=refusal.code, retry_after_s=refusal.retry_after_s
    )


def answer_dropped(provider_slug: str, error: Exception) -> UpstreamUnavailable:
    return UpstreamUnavailable(
        502,
        f"{provider_slug} dropped the answer: {type(error).__name__}",
        code="upstream_failed",
    )


def stream_interrupted(message: str) -> UpstreamUnavailable:
    return UpstreamUnavailable(502, message, code="stream_interrupted")


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model {model!r} does not exist or no provider offers it.",
        code="model_not_found",
        param="model",
    )


def ambiguous_model(message: str) -> GatewayError:
    return GatewayError(400, message, code="ambiguous_model", param="model")


def missing_api_key() -> GatewayError:
    return GatewayError(
        401,
        "Missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'.",
        code="missing_api_key",
    )


def invalid_api_key() -> GatewayError:
    return GatewayError(401, "Invalid API key.", code="invalid_api_key")


def invalid_request(
    message: str, *, param: str | None = None, code: str | None = None
) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def body_too_large() -> GatewayError:
    return GatewayError(
        413,
        f"The request body is larger than {settings.KEYAOS_MAX_BODY_BYTES} bytes.",
        code="request_too_large",
    )


def body_too_slow() -> GatewayError:
    return GatewayError(
        408,
        f"The request body did not arrive within {settings.KEYAOS_BODY_TIMEOUT_S:g} s.",
        code="request_timeout",
    )


def unknown_endpoint(method: str, path: str) -> GatewayError:
    return GatewayError(404, f"Unknown endpoint: {method} {path}", code="unknown_url")


def method_not_allowed(method: str, path: str, allow: str) -> GatewayError:
    return GatewayError(
        405,
        f"Method {method} is not allowed on {path}.",
        code="method_not_allowed",
        headers={"Allow": allow},
    )


def upgrade_refused() -> GatewayError:
    return GatewayError(
        426,
        "WebSocket is not supported here: send the request over HTTP (POST).",
        code="upgrade_required",
    )


def internal_error() -> GatewayError:
    return GatewayError(500, "Internal gateway error.", type="server_error", code="internal_error")


def rejected(status: int) -> GatewayError:
    return GatewayError(status, f"The request was rejected ({status}).")

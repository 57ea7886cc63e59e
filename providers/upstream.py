"""What an upstream's answer means: its failure class (DESIGN.md), its message, its Retry-After."""

from __future__ import annotations

import json
import re
from email.utils import parsedate_to_datetime
from enum import StrEnum

import httpx
from django.utils import timezone

from providers.models import Health


class Failure(StrEnum):
    CLIENT = "client"  # the request is wrong: pass the answer back, leave the key alone
    INVALID = "invalid"  # 401/403: the key is rejected
    EXHAUSTED = "exhausted"  # 402 or a quota message: no credit left
    RATE_LIMITED = "rate_limited"  # 429: cool down for Retry-After
    TRANSIENT = "transient"  # 5xx, timeouts, connection errors, a 200 with the wrong body


_HEALTH_AFTER = {
    Failure.INVALID: Health.INVALID,
    Failure.EXHAUSTED: Health.EXHAUSTED,
    Failure.RATE_LIMITED: Health.COOLING,
    Failure.TRANSIENT: Health.COOLING,
}


def health_after(failure: Failure | None) -> str | None:
    """The key health a failure calls for; None when the key is not to blame."""
    return _HEALTH_AFTER.get(failure) if failure is not None else None


CLIENT_STATUSES = {400, 404, 413, 422}
_QUOTA_WORDS = re.compile(
    r"insufficient[_ ](quota|balance|credits?)|quota exceeded|out of credits", re.I
)
_SECRET_LIKE = re.compile(r"\b(sk|key|pk|api)[-_][A-Za-z0-9_\-]{8,}")


def classify(status: int, message: str = "") -> Failure:
    if status in CLIENT_STATUSES:
        return Failure.CLIENT
    if status == 402 or (status in (403, 429) and _QUOTA_WORDS.search(message)):
        return Failure.EXHAUSTED
    if status in (401, 403):
        return Failure.INVALID
    if status == 429:
        return Failure.RATE_LIMITED
    return Failure.TRANSIENT


def upstream_message(body: bytes, limit: int = 500) -> str:
    """The human part of an upstream error body (OpenAI format or not), shortened."""
    text = body[:4096].decode("utf-8", "replace")
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict):
            text = str(error.get("message") or error.get("detail") or error)
        elif isinstance(error, str):
            text = error
    elif "<html" in text.lower():
        text = "an HTML page instead of an API answer"
    return " ".join(text.split())[:limit]


def redact(text: str, *secrets: str) -> str:
    """Remove any secret (and anything shaped like one) an upstream echoed back."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return _SECRET_LIKE.sub(lambda m: m.group(1) + "-[redacted]", text)


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max((when - timezone.now()).total_seconds(), 0.0)


def unreachable(error: BaseException) -> tuple[str, bool]:
    """What went wrong reaching an upstream (words after its name), and whether it timed out.

    httpx-aiohttp reports every aiohttp connection error as ``httpx.ConnectTimeout``, so the
    exception's cause chain, not its type, tells a refused or reset connection from a timeout.
    """
    chain = []
    cause: BaseException | None = error
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for cause in chain[1:] or chain:
        if isinstance(cause, TimeoutError):
            return "timed out before answering", True
        if isinstance(cause, ConnectionRefusedError):
            return "refused the connection", False
        if isinstance(cause, ConnectionResetError):
            return "reset the connection", False
        if type(cause).__name__ == "ServerDisconnectedError":
            return "closed the connection without answering", False
    if len(chain) == 1 and isinstance(error, httpx.TimeoutException):
        return "timed out before answering", True
    return f"could not be reached: {type(chain[-1]).__name__}", False

"""The error a client is answered with, in no protocol's shape: each ``/v1`` protocol renders it."""

from __future__ import annotations


class GatewayError(Exception):
    """A refusal the client sees: HTTP status, a message, and OpenAI-style ``type`` and ``code``.

    ``retry_after_s`` becomes a ``Retry-After`` header; protocols whose error shape has no
    ``type`` of this kind (Anthropic's) derive theirs from the status.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after_s: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s
        self.headers = dict(headers or {})
        if retry_after_s is not None:
            self.headers["Retry-After"] = str(retry_after_s)

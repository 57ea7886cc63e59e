"""Sends a request to its cheapest healthy candidate, fails over, and relays the answer.

Before the first byte reaches the client any failure moves on to the next candidate; after it, a
stream ends with an SSE error event. Stream bytes are forwarded as they arrive; only events that
mention usage are parsed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal

import httpx
from django.conf import settings
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse

from billing.currency import usd_per_unit
from billing.limits import LimitExceeded, Reservation, admit, persisted_spend, settle
from billing.models import LedgerEntry
from billing.recorder import AttemptRecord, RequestRecord
from billing.usage import Usage, estimate_usage, parse_usage_json
from keyaos.db import db_task
from routing.auth import limit_error
from routing.dispatcher import (
    AmbiguousModel,
    Candidate,
    Decision,
    ModelNotFound,
    rank_candidates,
    resolve_model,
)
from routing.failures import Failure, classify, redact, retry_after_seconds, upstream_message
from routing.requests import ClientRequest, GatewayError
from routing.runtime import Runtime
from routing.snapshot import ClientKey

Outcome = LedgerEntry.Outcome
USER_AGENT = "Keyaos"

_EVENT_END = re.compile(rb"\r?\n\r?\n")
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_TEXT_FIELD = re.compile(
    rb'"(?:content|text|reasoning|reasoning_content)"\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"'
)
_ERROR_EVENT = re.compile(rb'^data:\s*\{\s*"error"')
_DONE_EVENT = re.compile(rb"^data:\s*\[DONE\]")
# Bytes that only an event worth reading holds (usage, an error, the end of the stream); a
# plain bytes search for them is far faster than any regex over every event.
_NOTABLE = (b'"usage"', b'"error"', b"[DONE]")
_FAILURE_STATUS = {  # what the client sees when every candidate failed this way
    Failure.RATE_LIMITED: 429,
    Failure.EXHAUSTED: 402,
    Failure.INVALID: 503,
    Failure.TRANSIENT: 502,
}


@dataclass
class AttemptFailure:
    failure: Failure
    status: int | None
    message: str
    retry_after_s: float | None = None
    body: bytes = b""


class Proxy:
    """One client request on its way through the gateway."""

    def __init__(
        self, runtime: Runtime, request: ClientRequest, *, client: ClientKey, started: float
    ) -> None:
        self.runtime = runtime
        self.request = request
        self.client = client
        self.started = started
        self.overhead_ms: float | None = None
        self.reservation: Reservation | None = None
        self.request_id = new_request_id()
        self.record = RequestRecord(
            request_id=self.request_id,
            api_key_id=client.id or None,
            requested_model=request.model,
            endpoint=request.endpoint,
            streamed=request.stream,
            outcome=Outcome.UPSTREAM_ERROR,
            status_code=502,
            budget_period=client.budget_period,
        )

    async def respond(self) -> HttpResponse:
        try:
            decision = self._decide()
            self._check_model(decision)
        except GatewayError as error:
            return self.fail(error, Outcome.CLIENT_ERROR)
        if not decision.candidates:
            return self.fail(_no_candidate_error(decision), Outcome.UPSTREAM_ERROR)
        try:
            await self._admit(decision.candidates[0])
        except GatewayError as error:
            return self.fail(error, Outcome.CLIENT_ERROR)
        try:
            return await self._try_candidates(decision)
        except BaseException:
            self._settle(cost_usd=Decimal(0), tokens=0)
            raise

    def _check_model(self, decision: Decision) -> None:
        limits = self.client.limits
        if limits is None:
            return
        try:
            limits.check_model(self.request.model, decision.model)
        except LimitExceeded as refusal:
            raise limit_error(refusal) from None

    async def _admit(self, top: Candidate) -> None:
        """Count the request against the key's rates and reserve its estimated cost."""
        limits = self.client.limits
        if limits is None or not limits.metered:
            return
        try:
            self.reservation = await admit(
                limits,
                estimated_cost_usd=top.estimated_cost_usd,
                estimated_tokens=self.request.prompt_tokens,
                load_spent=db_task(persisted_spend),
            )
        except LimitExceeded as refusal:
            raise limit_error(refusal) from None

    def _settle(self, *, cost_usd: Decimal, tokens: int) -> None:
        if self.reservation is not None and not self.reservation.settled:
            self.runtime.spawn(settle(self.reservation, cost_usd=cost_usd, tokens=tokens))

    async def _try_candidates(self, decision: Decision) -> HttpResponse:
        last: AttemptFailure | None = None
        failures: list[AttemptFailure] = []
        for candidate in decision.candidates[: settings.KEYAOS_MAX_ATTEMPTS]:
            response = await self._attempt(candidate)
            if not isinstance(response, AttemptFailure):
                return response
            last = response
            failures.append(response)
        return self.fail(_all_failed_error(failures, last), Outcome.UPSTREAM_ERROR)

    def _decide(self) -> Decision:
        snapshot = self.runtime.snapshot
        try:
            model = resolve_model(snapshot, self.request.model)
        except ModelNotFound:
            raise GatewayError(
                404,
                f"The model {self.request.model!r} does not exist or no provider offers it.",
                code="model_not_found",
                param="model",
            ) from None
        except AmbiguousModel as error:
            raise GatewayError(400, str(error), code="ambiguous_model", param="model") from None
        return rank_candidates(
            snapshot,
            model,
            board=self.runtime.board,
            prompt_tokens=self.request.prompt_tokens,
            output_tokens=self.request.output_tokens,
            kind=self.request.kind,
            preferences=self.request.preferences,
        )

    async def _attempt(self, candidate: Candidate) -> HttpResponse | AttemptFailure:
        offer, key = candidate.offer, candidate.key
        provider = offer.provider
        headers = {
            **provider.auth_headers(key.secret),
            "Content-Type": "application/json",
            "Accept": "text/event-stream" if self.request.stream else "application/json",
            # Bytes are relayed as they come: a compressed answer would reach the client unread.
            "Accept-Encoding": "identity",
            "X-Request-Id": self.request_id,
            "User-Agent": USER_AGENT,
        }
        # Built directly rather than by the client: merging its defaults and parsing the URL
        # took a third of the gateway's own time on the way out.
        upstream = httpx.Request(
            "POST",
            provider.request_url(self.request.endpoint),
            content=self.request.upstream_body(offer.upstream_model_id),
            headers=headers,
            extensions={"timeout": provider.timeouts},
        )
        attempt_started = time.perf_counter()
        if self.overhead_ms is None:
            self.overhead_ms = (attempt_started - self.started) * 1000
        try:
            response = await self.runtime.client.send(upstream, stream=True)
        except httpx.TimeoutException:
            failure = AttemptFailure(
                Failure.TRANSIENT, None, f"{provider.slug} timed out before answering"
            )
            return self._failed(candidate, failure, attempt_started)
        except httpx.HTTPError as error:
            message = f"{provider.slug} could not be reached: {type(error).__name__}"
            return self._failed(
                candidate, AttemptFailure(Failure.TRANSIENT, None, message), attempt_started
            )
        failure = await self._check_answer(response, candidate)
        if failure is not None:
            await response.aclose()
            if failure.failure == Failure.CLIENT:
                return await self._client_error(candidate, response, failure, attempt_started)
            return self._failed(candidate, failure, attempt_started)
        self.runtime.board.record_success(key)
        self._chosen(candidate)
        if self.request.stream:
            return self._stream_response(candidate, response, attempt_started)
        return await self._json_response(candidate, response, attempt_started)

    async def _check_answer(
        self, response: httpx.Response, candidate: Candidate
    ) -> AttemptFailure | None:
        content_type = response.headers.get("content-type", "")
        if response.is_success:
            expected = "text/event-stream" if self.request.stream else "application/json"
            if expected in content_type:
                return None
            await _read_some(response)
            return AttemptFailure(
                Failure.TRANSIENT,
                response.status_code,
                f"{candidate.provider.slug} answered {response.status_code} with "
                f"{content_type or 'no content type'} instead of {expected}",
            )
        body = await _read_some(response)
        message = redact(upstream_message(body), candidate.key.secret)
        failure = classify(response.status_code, message)
        retry_after = retry_after_seconds(response.headers.get("retry-after"))
        return AttemptFailure(failure, response.status_code, message, retry_after, body)

    def _failed(
        self, candidate: Candidate, failure: AttemptFailure, attempt_started: float
    ) -> AttemptFailure:
        self._add_attempt(
            candidate, failure.status, failure.failure.value, failure.message, attempt_started
        )
        self._blame(candidate, failure.failure, failure.message, failure.retry_after_s)
        return failure

    def _blame(
        self,
        candidate: Candidate,
        failure: Failure,
        message: str,
        retry_after_s: float | None = None,
    ) -> None:
        """Out of this process's routing at once; shared and persisted in the background."""
        board = self.runtime.board
        outcome = board.note_failure(candidate.key, failure, retry_after_s)
        if outcome is not None:
            self.runtime.spawn(board.share_failure(candidate.key, outcome, message))

    async def _client_error(
        self,
        candidate: Candidate,
        response: httpx.Response,
        failure: AttemptFailure,
        attempt_started: float,
    ) -> HttpResponse:
        """The upstream says the request itself is wrong: pass its answer back unchanged."""
        self._add_attempt(
            candidate, failure.status, failure.failure.value, failure.message, attempt_started
        )
        self._chosen(candidate)
        self.record.outcome = Outcome.CLIENT_ERROR
        self.record.status_code = response.status_code
        self.record.error = failure.message
        self._finish()
        answer = HttpResponse(
            failure.body,
            status=response.status_code,
            content_type=response.headers.get("content-type", "application/json"),
        )
        return self._with_headers(answer, candidate)

    async def _json_response(
        self, candidate: Candidate, response: httpx.Response, attempt_started: float
    ) -> HttpResponse:
        try:
            content = await response.aread()
        except httpx.HTTPError as error:
            await response.aclose()
            message = f"{candidate.provider.slug} dropped the answer: {type(error).__name__}"
            self._blame(candidate, Failure.TRANSIENT, message)
            return self.fail(
                GatewayError(502, message, type="upstream_error"), Outcome.UPSTREAM_ERROR
            )
        self.record.ttfb_ms = _ms_since(self.started)
        self.record.outcome = Outcome.OK
        self.record.status_code = response.status_code
        self.record.usage = parse_usage_json(content) or self._estimated_usage(_text_chars(content))
        self._add_attempt(candidate, response.status_code, "", "", attempt_started)
        self._finish()
        answer = HttpResponse(
            content,
            status=response.status_code,
            content_type=response.headers.get("content-type", "application/json"),
        )
        return self._with_headers(answer, candidate)

    def _stream_response(
        self, candidate: Candidate, response: httpx.Response, attempt_started: float
    ) -> HttpResponse:
        self.record.status_code = response.status_code
        self._add_attempt(candidate, response.status_code, "", "", attempt_started)
        answer = StreamingHttpResponse(
            self._relay(candidate, response),
            status=response.status_code,
            content_type=response.headers.get("content-type", "text/event-stream"),
        )
        answer["Cache-Control"] = "no-cache"
        answer["X-Accel-Buffering"] = "no"
        return self._with_headers(answer, candidate)

    async def _relay(self, candidate: Candidate, response: httpx.Response) -> AsyncIterator[bytes]:
        reader = StreamReader(drop_usage_only=self.request.added_usage_option)
        outcome = Outcome.OK
        try:
            async for chunk in response.aiter_raw():
                if self.record.ttfb_ms is None:
                    self.record.ttfb_ms = _ms_since(self.started)
                forward = reader.feed(chunk)
                if forward:
                    yield forward
            tail = reader.close()
            if tail:
                yield tail
            if reader.error:
                outcome = Outcome.STREAM_FAILED
                self.record.error = redact(reader.error, candidate.key.secret)
        except (asyncio.CancelledError, GeneratorExit):
            # A client that hangs up right after [DONE] got the whole answer.
            outcome = Outcome.OK if reader.done else Outcome.DISCONNECTED
            raise
        except httpx.HTTPError as error:
            outcome = Outcome.STREAM_FAILED
            message = f"{candidate.provider.slug} failed mid-stream: {type(error).__name__}"
            self.record.error = message
            self._blame(candidate, Failure.TRANSIENT, message)
            yield _sse_error(message, self.request_id)
        finally:
            # Record first: closing the upstream may wait, and the record must not.
            self.record.outcome = outcome
            self.record.usage = reader.usage or self._estimated_usage(reader.text_chars)
            self._finish()
            await asyncio.shield(response.aclose())

    def _estimated_usage(self, completion_chars: int) -> Usage:
        return estimate_usage(
            prompt_tokens=self.request.prompt_tokens, completion_chars=completion_chars
        )

    def _chosen(self, candidate: Candidate) -> None:
        offer = candidate.offer
        self.record.provider_id = offer.provider.id
        self.record.upstream_key_id = candidate.key.id
        self.record.upstream_model = offer.upstream_model_id
        self.record.prices = offer.prices
        self.record.multiplier = candidate.key.multiplier
        self.record.usd_per_unit = usd_per_unit(offer.prices.currency, self.runtime.snapshot.rates)

    def _add_attempt(
        self,
        candidate: Candidate,
        status: int | None,
        failure: str,
        message: str,
        attempt_started: float,
    ) -> None:
        self.record.attempts.append(
            AttemptRecord(
                provider_id=candidate.provider.id,
                upstream_key_id=candidate.key.id,
                upstream_model=candidate.offer.upstream_model_id,
                status_code=status,
                failure=failure,
                error=message,
                duration_ms=_ms_since(attempt_started),
            )
        )

    def _with_headers(self, response: HttpResponse, candidate: Candidate) -> HttpResponse:
        response["x-request-id"] = self.request_id
        response["x-keyaos-provider"] = candidate.provider.slug
        response["x-keyaos-key"] = candidate.key.name
        response["x-keyaos-attempts"] = str(len(self.record.attempts))
        if self.overhead_ms is not None:
            response["x-keyaos-overhead-ms"] = f"{self.overhead_ms:.3f}"
        return response

    def fail(self, error: GatewayError, outcome: str) -> HttpResponse:
        self.record.outcome = outcome
        self.record.status_code = error.status
        self.record.error = error.message
        self._finish()
        response = error_response(error)
        response["x-request-id"] = self.request_id
        response["x-keyaos-attempts"] = str(len(self.record.attempts))
        return response

    def _finish(self) -> None:
        self.record.latency_ms = _ms_since(self.started)
        self.record.overhead_ms = self.overhead_ms
        self.runtime.ledger.submit(self.record)
        if self.reservation is not None:
            cost = self.record.cost()
            self._settle(
                cost_usd=cost.cost_usd if cost is not None else Decimal(0),
                tokens=self.record.usage.total_tokens,
            )


def refuse(
    runtime: Runtime, client: ClientKey, endpoint: str, error: GatewayError, *, started: float
) -> HttpResponse:
    """Answer a refused request whose body could not be read, still leaving a ledger row."""
    request_id = new_request_id()
    runtime.ledger.submit(
        RequestRecord(
            request_id=request_id,
            api_key_id=client.id or None,
            requested_model="",
            endpoint=endpoint,
            streamed=False,
            outcome=Outcome.CLIENT_ERROR,
            status_code=error.status,
            error=error.message,
            latency_ms=_ms_since(started),
        )
    )
    response = error_response(error)
    response["x-request-id"] = request_id
    return response


class StreamReader:
    """Splits SSE bytes into whole events, reads usage once, drops what the client did not ask for.

    Whole events pass through byte for byte; only the few that matter (usage, an error,
    ``[DONE]``) are cut out and read, found by a plain bytes search over what arrived.
    """

    def __init__(self, *, drop_usage_only: bool) -> None:
        self.drop_usage_only = drop_usage_only
        self.buffer = b""
        self.usage: Usage | None = None
        self.text_chars = 0
        self.error = ""
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        data = self.buffer + chunk if self.buffer else chunk
        end = _last_event_end(data)
        self.buffer = data[end:]
        return self._forward(data[:end]) if end else b""

    def close(self) -> bytes:
        tail, self.buffer = self.buffer, b""
        if not tail.strip():
            return b""
        return self._forward(tail)

    def _forward(self, events: bytes) -> bytes:
        """``events`` holds whole events; returns them without the ones to drop."""
        self.text_chars += sum(len(text) for text in _TEXT_FIELD.findall(events))
        dropped = []
        read_until = 0
        for index in _notable_positions(events):
            if index < read_until:
                continue
            begin, read_until = _event_bounds(events, index)
            if not self._keep(events[begin:read_until]):
                dropped.append((begin, read_until))
        if not dropped:
            return events
        parts, position = [], 0
        for begin, end in dropped:
            parts.append(events[position:begin])
            position = end
        parts.append(events[position:])
        return b"".join(parts)

    def _keep(self, event: bytes) -> bool:
        if _DONE_EVENT.match(event):
            self.done = True
            return True
        if _ERROR_EVENT.match(event):
            self.error = upstream_message(event.split(b":", 1)[1])
        if not _USAGE_OBJECT.search(event):
            return True
        usage = parse_usage_json(event.split(b":", 1)[1].strip())
        if usage is not None:
            self.usage = usage  # a repeated usage event replaces, never adds
        return not (self.drop_usage_only and _EMPTY_CHOICES.search(event))


def _last_event_end(data: bytes, before: int | None = None) -> int:
    """Where the last whole event in ``data[:before]`` ends (after its blank line), or 0."""
    lf = data.rfind(b"\n\n", 0, before)
    crlf = data.rfind(b"\n\r\n", 0, before)
    return max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)


def _notable_positions(events: bytes) -> list[int]:
    positions = []
    for needle in _NOTABLE:
        index = events.find(needle)
        while index >= 0:
            positions.append(index)
            index = events.find(needle, index + 1)
    return sorted(positions)


def _event_bounds(events: bytes, index: int) -> tuple[int, int]:
    """The start and end of the event that holds ``events[index]``."""
    following = _EVENT_END.search(events, index)
    return _last_event_end(events, index), following.end() if following else len(events)


def error_response(error: GatewayError) -> JsonResponse:
    response = JsonResponse(error.body(), status=error.status)
    for name, value in error.headers.items():
        response[name] = value
    return response


def _no_candidate_error(decision: Decision) -> GatewayError:
    reasons = sorted({f"{e.provider_slug} {e.key_name}: {e.reason}" for e in decision.excluded})
    detail = "; ".join(reasons[:10]) or "no active offer"
    return GatewayError(
        503,
        f"No usable upstream key serves {decision.model!r} right now ({detail}).",
        type="upstream_error",
        code="no_available_key",
    )


def _all_failed_error(failures: list[AttemptFailure], last: AttemptFailure | None) -> GatewayError:
    classes = {failure.failure for failure in failures}
    status = 502
    for failure_class in (
        Failure.RATE_LIMITED,
        Failure.TRANSIENT,
        Failure.EXHAUSTED,
        Failure.INVALID,
    ):
        if failure_class in classes:
            status = _FAILURE_STATUS[failure_class]
            break
    if status == 502 and last is not None and last.status is None and "timed out" in last.message:
        status = 504
    headers = {}
    if status == 429:
        waits = [f.retry_after_s for f in failures if f.retry_after_s is not None]
        if waits:
            headers["Retry-After"] = str(int(min(waits)) + 1)
    return GatewayError(
        status,
        f"All {len(failures)} attempts failed; last upstream error: "
        f"{last.message if last else '-'}",
        type="upstream_error",
        code="upstream_failed",
        headers=headers,
    )


def _sse_error(message: str, request_id: str) -> bytes:
    payload = {
        "error": {
            "message": message,
            "type": "upstream_error",
            "code": "stream_interrupted",
            "request_id": request_id,
        }
    }
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _text_chars(content: bytes) -> int:
    return sum(len(match.group(1)) for match in _TEXT_FIELD.finditer(content))


async def _read_some(response: httpx.Response, limit: int = 65536) -> bytes:
    body = b""
    try:
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) >= limit:
                break
    except httpx.HTTPError:
        pass
    return body[:limit]


def new_request_id() -> str:
    return "req_" + os.urandom(16).hex()


def _ms_since(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)

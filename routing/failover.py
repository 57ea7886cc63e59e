"""One ``/v1`` request's way through the gateway, the same for every client protocol.

``Exchange`` resolves the model, applies the key's limits, runs the failover loop over the ranked
candidates and relays the answer through the protocol's translation (``routing.protocols``). Each
attempt ends in an ``Answer`` (an open upstream response) or a typed ``AttemptFailure``; before
the first byte reaches the client any failure moves on to the next candidate, after it a stream
ends with the protocol's error event. The request's ledger record is written in one place,
``Exchange.finish``, however the request ends.

Per-attempt hooks: ``_admit`` (limits, once, before the first attempt), ``_attempted`` (every
attempt's end: its record and the key's health) and ``finish`` (the request's end).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

import httpx
from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse

from billing.costs import tokens_cost
from billing.currency import usd_per_unit
from billing.limits import Reservation, admit, cover, settle_soon
from billing.models import LedgerEntry
from billing.recorder import AttemptRecord, RequestRecord
from billing.services import persisted_spend
from billing.usage import Usage, estimate_usage
from keyaos.lib.db import db_task
from providers.upstream import (
    Failure,
    classify,
    redact,
    retry_after_seconds,
    unreachable,
    upstream_message,
)
from routing.dispatcher import (
    AmbiguousModel,
    Candidate,
    Decision,
    ModelNotFound,
    attempt_order,
    rank_candidates,
    resolve_model,
)
from routing.errors import (
    AttemptFailure,
    GatewayError,
    UpstreamRefused,
    UpstreamUnavailable,
    all_attempts_failed,
    ambiguous_model,
    answer_dropped,
    model_not_found,
    no_candidate,
    stream_interrupted,
)
from routing.requests import ClientRequest
from routing.runtime import Runtime
from routing.sessions import SessionState, session_id
from routing.snapshot import ClientKey

if TYPE_CHECKING:
    from routing.protocols import Front, StreamTranslator

Outcome = LedgerEntry.Outcome
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer
USER_AGENT = "Keyaos"
# Built once, not a sync_to_async wrapper per limited request.
_load_persisted_spend = db_task(persisted_spend)


@dataclass
class Answer:
    """An upstream's accepted answer, still open: its body is relayed by the protocol."""

    candidate: Candidate
    response: httpx.Response
    native: bool = False  # the upstream answered in the client's protocol, untranslated


class Exchange:
    """One client request on its way through the gateway, from authentication to its record."""

    def __init__(
        self,
        runtime: Runtime,
        client: ClientKey,
        *,
        endpoint: str,
        request_id: str,
        started: float,
    ) -> None:
        self.runtime = runtime
        self.client = client
        self.started = started
        self.request: ClientRequest | None = None
        self.overhead_ms: float | None = None
        self.reservation: Reservation | None = None
        self.chosen: Candidate | None = None
        self.decision: Decision | None = None
        self.session = ""  # routing.sessions' id of the conversation, then of it and the model
        self.held: Candidate | None = None  # whose estimated cost is reserved on its key now
        self.finished = False
        self.record = RequestRecord(
            request_id=request_id,
            api_key_id=client.id or None,
            requested_model="",
            endpoint=endpoint,
            streamed=False,
            outcome=Outcome.UPSTREAM_ERROR,
            status_code=502,
            budget_period=client.budget_period,
        )

    @property
    def request_id(self) -> str:
        return self.record.request_id

    def begin(self, request: ClientRequest, *, headers: Mapping[str, str]) -> None:
        self.request = request
        self.session = session_id(headers, request.body, client_id=self.client.id)
        self.record.requested_model = request.model
        self.record.streamed = request.stream

    async def forward(self) -> Answer:
        """The first candidate's answer, or a GatewayError for the client."""
        decision = await self._decide()
        self._check_model(decision)
        if not decision.candidates and not decision.last_resort:
            raise no_candidate(decision.refusal)
        self.decision = decision
        await self._admit(decision)
        failures: list[AttemptFailure] = []
        for candidate, started in attempt_order(self.runtime.board, decision):
            await self._cover(candidate)
            result = await self._attempt(candidate, started)
            if isinstance(result, Answer):
                return result
            if result.failure == Failure.CLIENT:
                self._choose(candidate)
                raise UpstreamRefused(result)
            failures.append(result)
            if len(failures) >= settings.KEYAOS_MAX_ATTEMPTS:
                break  # before the next candidate is taken (that may claim its probe)
        raise all_attempts_failed(failures)

    def fail(self, error: GatewayError) -> GatewayError:
        """Record a request that ends with ``error``; returns it with the exchange's headers."""
        upstream = isinstance(error, UpstreamUnavailable)
        outcome = Outcome.UPSTREAM_ERROR if upstream else Outcome.CLIENT_ERROR
        self.finish(outcome, status=error.status, error=error.message)
        error.headers.update(self.headers())
        return error

    def abandon(self) -> None:
        """The client left before an answer (the upstream call is cancelled with it). An
        upstream that had accepted the request may bill its prompt: estimated, not free."""
        usage = self._estimated_usage(0) if self.chosen is not None else None
        self.finish(
            Outcome.DISCONNECTED,
            status=CLIENT_CLOSED_REQUEST,
            error="the client disconnected before the answer",
            usage=usage,
        )

    def _hold(self, candidate: Candidate) -> None:
        """Count the attempt's estimated cost against its key's balance while it runs."""
        self._release()
        self.held = candidate
        self.runtime.in_flight.reserve(candidate.key.id, candidate.list_cost)

    def _release(self) -> None:
        if self.held is not None:
            self.runtime.in_flight.release(self.held.key.id, self.held.list_cost)
            self.held = None

    def _remember_session(self, usage: Usage) -> None:
        """The key that answered now holds this conversation's prompt in its provider's cache."""
        candidate = self.chosen
        state = SessionState(
            key_id=candidate.key.id,
            offer_id=candidate.offer.id,
            served_at=time.time(),
            prompt_tokens=usage.prompt_tokens or self.request.prompt_tokens,
            ttl_s=candidate.provider.prompt_cache_ttl_s,
        )
        share = self.runtime.sessions.remember(self.session, state)
        if share is not None:
            self.runtime.spawn(share)

    def finish(
        self, outcome: str, *, status: int, error: str = "", usage: Usage | None = None
    ) -> None:
        """The one place a request's record is completed and handed to the ledger."""
        if self.finished:
            return
        self.finished = True
        record = self.record
        record.outcome = outcome
        record.status_code = status
        record.error = error
        if usage is not None:
            record.usage = usage
        record.latency_ms = _ms_since(self.started)
        record.overhead_ms = self.overhead_ms
        self._release()
        if outcome == Outcome.OK and self.chosen is not None:
            self._remember_session(record.usage)
            self._calibrate(record.usage)
        self.runtime.submit(record)
        if self.reservation is not None:
            cost = record.cost()
            self._settle(
                cost_usd=cost.cost_usd if cost is not None else Decimal(0),
                tokens=record.usage.total_tokens,
            )

    def headers(self) -> dict[str, str]:
        headers = {"x-keyaos-attempts": str(len(self.record.attempts))}
        if self.chosen is not None:
            headers["x-keyaos-provider"] = self.chosen.provider.slug
            headers["x-keyaos-key"] = self.chosen.key.name
            if self.overhead_ms is not None:
                headers["x-keyaos-overhead-ms"] = f"{self.overhead_ms:.3f}"
        return headers

    async def json_response(self, answer: Answer, front: Front) -> HttpResponse:
        response = answer.response
        try:
            content = await response.aread()
        except httpx.HTTPError as error:
            await response.aclose()
            refusal = answer_dropped(answer.candidate.provider.slug, error)
            self._blame(answer.candidate, Failure.TRANSIENT, refusal.message)
            raise refusal from None
        except BaseException:  # the client went away: stop the upstream too
            await asyncio.shield(response.aclose())
            raise
        self.record.ttfb_ms = _ms_since(self.started)
        content, usage, completion_chars = front.read_json(self.request, content, answer.native)
        self.finish(
            Outcome.OK,
            status=response.status_code,
            usage=usage or self._estimated_usage(completion_chars),
        )
        return self._with_headers(
            HttpResponse(
                content,
                status=response.status_code,
                content_type=response.headers.get("content-type", "application/json"),
            )
        )

    def stream_response(self, answer: Answer, front: Front) -> HttpResponse:
        response = answer.response
        self.record.status_code = response.status_code
        reader: StreamTranslator = front.stream_translator(self.request, answer.native)
        streamed = StreamingHttpResponse(
            self._relay(answer, reader),
            status=response.status_code,
            content_type=response.headers.get("content-type", "text/event-stream"),
        )
        # (event, seconds): routing.asgi sends the event when the stream is silent that long.
        streamed.keepalive = getattr(reader, "keepalive", None)
        streamed["Cache-Control"] = "no-cache"
        streamed["X-Accel-Buffering"] = "no"
        return self._with_headers(streamed)

    async def _relay(self, answer: Answer, reader: StreamTranslator) -> AsyncIterator[bytes]:
        candidate, response = answer.candidate, answer.response
        outcome = Outcome.OK
        error = ""
        try:
            opening = reader.feed(
                b""
            )  # a translated stream starts before the upstream's first byte
            if opening:
                yield opening
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
                error = redact(reader.error, candidate.key.secret)
        except (asyncio.CancelledError, GeneratorExit):
            # A client that hangs up right after the end of the stream got the whole answer.
            outcome = Outcome.OK if reader.done else Outcome.DISCONNECTED
            raise
        except httpx.HTTPError as failure:
            outcome = Outcome.STREAM_FAILED
            interrupted = stream_interrupted(
                f"{candidate.provider.slug} failed mid-stream: {type(failure).__name__}"
            )
            error = interrupted.message
            self._blame(candidate, Failure.TRANSIENT, error)
            yield reader.fail(interrupted, self.request_id)
        finally:
            # Record first: closing the upstream may wait, and the record must not.
            self.finish(
                outcome,
                status=response.status_code,
                error=error,
                usage=reader.usage or self._estimated_usage(reader.text_chars),
            )
            await asyncio.shield(response.aclose())

    async def _decide(self) -> Decision:
        snapshot = self.runtime.snapshot
        try:
            model = resolve_model(snapshot, self.request.model)
        except ModelNotFound:
            raise model_not_found(self.request.model) from None
        except AmbiguousModel as error:
            raise ambiguous_model(str(error)) from None
        self.session = f"{self.session}|{model}"
        return rank_candidates(
            snapshot,
            model,
            board=self.runtime.board,
            prompt_tokens=self.request.prompt_tokens,
            output_tokens=self.request.output_tokens,
            kind=self.request.kind,
            preferences=self.request.preferences,
            session=await self.runtime.sessions.get(self.session),
            in_flight=self.runtime.in_flight,
            limit=settings.KEYAOS_MAX_ATTEMPTS,
        )

    def _check_model(self, decision: Decision) -> None:
        if self.client.limits is not None:
            self.client.limits.check_model(self.request.model, decision.model)

    async def _admit(self, decision: Decision) -> None:
        """Count the request against the key's rates and reserve its estimated cost: the dearest
        of the candidates it may try, so that failing over rarely needs more (``_cover``)."""
        limits = self.client.limits
        if limits is None or not limits.metered:
            return
        self.reservation = await admit(
            self.runtime.counters,
            limits,
            estimated_cost_usd=max(
                self._expected_charge(candidate)
                for candidate in (decision.candidates or decision.last_resort)[
                    : settings.KEYAOS_MAX_ATTEMPTS
                ]
            ),
            estimated_tokens=self.request.prompt_tokens,
            load_spent=_load_persisted_spend,
        )

    async def _cover(self, candidate: Candidate) -> None:
        """Before an attempt: the budget reservation grows to this candidate's estimate, or the
        request stops here with the budget error (LimitExceeded) when that no longer fits."""
        if self.reservation is not None:
            await cover(self.runtime.counters, self.reservation, self._expected_charge(candidate))

    def _expected_charge(self, candidate: Candidate) -> Decimal:
        return candidate.estimated_cost_usd * self.runtime.calibration.ratio(candidate.offer.id)

    def _calibrate(self, usage: Usage) -> None:
        """What the upstream reported against the list price of the same usage."""
        record = self.record
        if usage.reported_cost is None or record.prices is None:
            return
        self.runtime.calibration.observe(
            self.chosen.offer.id,
            reported_usd=usage.reported_cost,
            list_usd=tokens_cost(usage, record.prices) * record.usd_per_unit,
        )

    def _settle(self, *, cost_usd: Decimal, tokens: int) -> None:
        if self.reservation is not None:
            settle_soon(self.runtime.counters, self.reservation, cost_usd=cost_usd, tokens=tokens)

    async def _attempt(self, candidate: Candidate, started: float) -> Answer | AttemptFailure:
        offer, key = candidate.offer, candidate.key
        provider = offer.provider
        request = self.request
        headers = {
            **provider.auth_headers(key.secret),
            "Content-Type": "application/json",
            "Accept": "text/event-stream" if request.stream else "application/json",
            # Bytes are relayed as they come: a compressed answer would reach the client unread.
            "Accept-Encoding": "identity",
            "X-Request-Id": self.request_id,
            "User-Agent": USER_AGENT,
        }
        native = request.native
        base = native and provider.native_base(native.protocol)
        if base:
            url = httpx.URL(base.rstrip("/") + "/" + native.path)
            content = native.upstream_body(offer.upstream_model_id)
            headers.update(native.headers_for(base))
        else:
            url = provider.request_url(request.endpoint)
            content = request.upstream_body(offer.upstream_model_id, provider.reasoning_parameter)
        # Built directly rather than by the client: merging its defaults and parsing the URL
        # took a third of the gateway's own time on the way out.
        upstream = httpx.Request(
            "POST", url, content=content, headers=headers, extensions={"timeout": provider.timeouts}
        )
        attempt_started = time.perf_counter()
        if self.overhead_ms is None:
            self.overhead_ms = (attempt_started - self.started) * 1000
        self._hold(candidate)
        try:
            response = await self.runtime.client.send(upstream, stream=True)
        except httpx.HTTPError as error:
            what, timed_out = unreachable(error)
            failure = AttemptFailure(
                Failure.TRANSIENT, None, f"{provider.slug} {what}", timed_out=timed_out
            )
            return self._attempted(candidate, started, attempt_started, failure)
        except BaseException:
            self.runtime.board.abandon(key, started)
            raise
        failure = await self._check_answer(response, candidate)
        if failure is not None:
            await response.aclose()
            return self._attempted(candidate, started, attempt_started, failure)
        self._attempted(candidate, started, attempt_started, None, status=response.status_code)
        self._choose(candidate)
        return Answer(candidate, response, native=bool(base))

    def _attempted(
        self,
        candidate: Candidate,
        started: float,
        attempt_started: float,
        failure: AttemptFailure | None,
        *,
        status: int | None = None,
    ) -> AttemptFailure | None:
        """An attempt ended: its record, and what it tells about the key's health."""
        self.record.attempts.append(
            AttemptRecord(
                provider_id=candidate.provider.id,
                upstream_key_id=candidate.key.id,
                upstream_model=candidate.offer.upstream_model_id,
                status_code=failure.status if failure is not None else status,
                failure=failure.failure.value if failure is not None else "",
                error=failure.message if failure is not None else "",
                duration_ms=_ms_since(attempt_started),
            )
        )
        board = self.runtime.board
        if failure is None or failure.failure == Failure.CLIENT:
            # A client error too: the upstream works, the request does not.
            ended = board.record_success(candidate.key, started)
            if ended is not None:
                self.runtime.spawn(board.share_close(candidate.key, ended))
        else:
            self._blame(candidate, failure.failure, failure.message, failure.retry_after_s, started)
        if failure is not None:
            self._release()
        return failure

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
        return AttemptFailure(
            classify(response.status_code, message),
            response.status_code,
            message,
            retry_after_seconds(response.headers.get("retry-after")),
            body=body,
            content_type=content_type or "application/json",
        )

    def _blame(
        self,
        candidate: Candidate,
        failure: Failure,
        message: str,
        retry_after_s: float | None = None,
        started: float | None = None,
    ) -> None:
        """Out of this process's routing at once; shared and persisted in the background."""
        board = self.runtime.board
        outcome = board.note_failure(candidate.key, failure, retry_after_s, started=started)
        if outcome is not None:
            self.runtime.spawn(board.share_failure(candidate.key, outcome, message))

    def _choose(self, candidate: Candidate) -> None:
        self.chosen = candidate
        offer = candidate.offer
        record = self.record
        record.provider_id = offer.provider.id
        record.upstream_key_id = candidate.key.id
        record.upstream_model = offer.upstream_model_id
        record.prices = offer.prices
        record.multiplier = candidate.key.multiplier
        record.expected_cache_saving_usd = candidate.cache_saving_usd
        record.usd_per_unit = usd_per_unit(offer.prices.currency, self.runtime.snapshot.rates)

    def _estimated_usage(self, completion_chars: int) -> Usage:
        return estimate_usage(
            prompt_tokens=self.request.prompt_tokens, completion_chars=completion_chars
        )

    def _with_headers(self, response: HttpResponse) -> HttpResponse:
        for name, value in self.headers().items():
            response[name] = value
        return response


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


def _ms_since(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)

"""What a finished client request tells the operator: Prometheus metrics and the JSON log line.

``request_finished`` is called once per request record, where the record goes to the ledger, so
the request path pays one call: a few counter increments and, with ``KEYAOS_LOG_FORMAT=json``,
one log line. Labels come from the routing snapshot (provider slug, key label), never from what
the client sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from billing.costs import Cost
from billing.recorder import RequestRecord
from billing.usage import ESTIMATED
from keyaos.lib import metrics
from routing.snapshot import Snapshot

request_logger = logging.getLogger("keyaos.requests")

_NO_PROVIDER = ""


@dataclass
class _Names:
    """Provider slugs, key labels and client key names of one snapshot, by id."""

    snapshot: Snapshot | None
    providers: dict[int, str]
    keys: dict[int, str]
    clients: dict[int, str]

    @classmethod
    def of(cls, snapshot: Snapshot | None) -> _Names:
        if snapshot is None:
            return cls(None, {}, {}, {})
        providers = {
            offer.provider.id: offer.provider.slug
            for offers in snapshot.offers.values()
            for offer in offers
        }
        keys = {key.id: key.name for keys in snapshot.keys.values() for key in keys}
        clients = {client.id: client.name for client in snapshot.client_keys.values()}
        return cls(snapshot, providers, keys, clients)

    def provider(self, provider_id: int | None) -> str:
        if provider_id is None:
            return _NO_PROVIDER
        return self.providers.get(provider_id) or f"provider-{provider_id}"

    def key(self, key_id: int | None) -> str:
        if key_id is None:
            return ""
        return self.keys.get(key_id) or f"key-{key_id}"


_names = _Names.of(None)
_children: dict[tuple, Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, kept: label sets are bounded (see ``keyaos.lib.metrics``),
    and the library's lookup (checks and a lock) costs as much as the increment."""
    key = (metric, labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


FLUSH_S = 1.0  # the most a request's counts wait before the metrics (and other workers) see them


class _Pending:
    """Metric updates gathered on the event loop and applied to the library at most ``FLUSH_S``
    later, summed per labelled child. A request then adds to a few dict entries instead of
    making a dozen library calls, each of which takes a lock, checks the process id and writes
    the multiprocess file. ``/metrics`` on this process applies them first (``flush``), and so
    does the runtime when it stops."""

    def __init__(self) -> None:
        self.increments: defaultdict[Any, float] = defaultdict(float)
        self.observations: defaultdict[Any, list[float]] = defaultdict(list)
        self.timer: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def inc(self, child: Any, amount: float = 1.0) -> None:
        self.increments[child] += amount
        if self.timer is None or self.loop.is_closed():
            self._schedule()

    def observe(self, child: Any, value: float) -> None:
        self.observations[child].append(value)
        if self.timer is None or self.loop.is_closed():
            self._schedule()

    def _schedule(self) -> None:
        if self.timer is not None:  # its event loop ended before the timer fired
            self.flush()
            return
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop in this thread: nothing would flush later
            self.flush()
            return
        self.timer = self.loop.call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        increments, self.increments = self.increments, defaultdict(float)
        observations, self.observations = self.observations, defaultdict(list)
        for child, amount in increments.items():
            child.inc(amount)
        for child, values in observations.items():
            for value in values:
                child.observe(value)


_pending = _Pending()


def flush() -> None:
    """Apply the request metrics gathered so far (before a scrape, and when stopping)."""
    _pending.flush()


def _names_for(snapshot: Snapshot | None) -> _Names:
    global _names
    if _names.snapshot is not snapshot:
        _names = _Names.of(snapshot)
    return _names


def request_finished(snapshot: Snapshot | None, record: RequestRecord) -> None:
    if not settings.KEYAOS_METRICS:
        if settings.KEYAOS_LOG_FORMAT == "json":
            _log_request(_names_for(snapshot), record, record.cost())
        return
    names = _names_for(snapshot)
    endpoint = record.endpoint
    _pending.inc(_child(metrics.REQUESTS, endpoint, str(record.status_code), record.outcome))
    for attempt in record.attempts:
        _pending.inc(
            _child(
                metrics.UPSTREAM_ATTEMPTS,
                names.provider(attempt.provider_id),
                names.key(attempt.upstream_key_id),
                attempt.failure or "ok",
            )
        )
    _pending.observe(_child(metrics.REQUEST_DURATION, endpoint), record.latency_ms / 1000)
    if record.overhead_ms is not None:
        _pending.observe(_child(metrics.OVERHEAD, endpoint), record.overhead_ms / 1000)
    if record.streamed and record.ttfb_ms is not None:
        _pending.observe(_child(metrics.TIME_TO_FIRST_TOKEN, endpoint), record.ttfb_ms / 1000)
    cost = None
    if record.provider_id is not None:
        provider = names.provider(record.provider_id)
        usage = record.usage
        for kind, count in (
            ("prompt", usage.prompt_tokens),
            ("completion", usage.completion_tokens),
            ("cached", usage.cached_tokens),
        ):
            if count:
                _pending.inc(_child(metrics.TOKENS, provider, kind), count)
        cost = record.cost()
        if cost is not None:
            _pending.inc(_child(metrics.COST, provider, cost.currency), float(cost.list_cost))
            _pending.inc(_child(metrics.COST_USD, provider), float(cost.cost_usd))
        if record.outcome != "client_error":
            reason = _zero_cost_reason(record, cost)
            if reason:
                _pending.inc(_child(metrics.ZERO_COST, reason))
        if usage.source == ESTIMATED:
            _pending.inc(_child(metrics.ESTIMATED, record.outcome))
    if settings.KEYAOS_LOG_FORMAT == "json":
        _log_request(names, record, cost)


def _zero_cost_reason(record: RequestRecord, cost: Cost | None) -> str | None:
    if cost is not None and cost.cost_usd:
        return None
    if record.prices is None:
        return "unpriced"
    if cost is None:
        return "no_tokens"
    if record.usage.reported_cost is not None and not record.usage.reported_cost:
        return "reported_zero"
    if not record.multiplier:
        return "free_key"
    return "unpriced" if not cost.list_cost else "rounded_to_zero"


def _log_request(names: _Names, record: RequestRecord, cost: Cost | None) -> None:
    usage = record.usage
    data = {
        "event": "request",
        "request_id": record.request_id,
        "client_key_id": record.api_key_id,
        "client_key": names.clients.get(record.api_key_id, "") if record.api_key_id else "",
        "endpoint": record.endpoint,
        "requested_model": record.requested_model,
        "served_model": record.upstream_model,
        "provider": names.provider(record.provider_id),
        "key": names.key(record.upstream_key_id),
        "status": record.status_code,
        "outcome": record.outcome,
        "streamed": record.streamed,
        "attempts": len(record.attempts),
        "latency_ms": record.latency_ms,
        "overhead_ms": None if record.overhead_ms is None else round(record.overhead_ms, 3),
        "ttfb_ms": record.ttfb_ms,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.cached_tokens,
        "usage_source": usage.source,
        "cost": None if cost is None else str(cost.list_cost),
        "currency": None if cost is None else cost.currency,
        "cost_usd": None if cost is None else str(cost.cost_usd),
        "error": record.error,
    }
    request_logger.info("request %s", record.request_id, extra={"data": data})

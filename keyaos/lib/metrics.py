"""Prometheus metrics of a Keyaos process, counted with the official ``prometheus_client``.

Under ``manage.py serve`` every process (each uvicorn worker, the task cluster) writes its samples
to files in ``PROMETHEUS_MULTIPROC_DIR`` (the library's multiprocess mode), so whichever worker
answers ``/metrics`` reports the sum of all of them. Without that variable (tests, a bare uvicorn
with one worker) the process's own registry is reported.

Labels are bounded by what the operator configures (endpoints, providers, key labels, currencies,
failure classes): never a request id, a client-supplied model name or a secret.
"""

from __future__ import annotations

import os
import time

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_OVERHEAD_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
_TTFT_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)

REQUESTS = Counter(
    "keyaos_requests",
    "Client requests to /v1 that left a ledger record, by endpoint, HTTP status and outcome.",
    ["endpoint", "status", "outcome"],
)
UPSTREAM_ATTEMPTS = Counter(
    "keyaos_upstream_attempts",
    "Upstream attempts by provider, key label and result (ok, or the failure class).",
    ["provider", "key", "result"],
)
REQUEST_DURATION = Histogram(
    "keyaos_request_duration_seconds",
    "Total time of a client request, from its first byte to the end of the answer.",
    ["endpoint"],
    buckets=_LATENCY_BUCKETS_S,
)
OVERHEAD = Histogram(
    "keyaos_overhead_seconds",
    "Time Keyaos spent on a request before its first upstream request left.",
    ["endpoint"],
    buckets=_OVERHEAD_BUCKETS_S,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "keyaos_time_to_first_token_seconds",
    "Time from a streamed request's first byte to the first bytes of its answer.",
    ["endpoint"],
    buckets=_TTFT_BUCKETS_S,
)
TOKENS = Counter(
    "keyaos_tokens",
    "Tokens served (prompt, completion, cached prompt), by provider.",
    ["provider", "type"],
)
COST = Counter(
    "keyaos_cost",
    "List cost of the requests, in the provider's currency (what upstream balances lose).",
    ["provider", "currency"],
)
COST_USD = Counter(
    "keyaos_cost_usd",
    "What the requests cost the operator in USD (after key multipliers), by provider.",
    ["provider"],
)
ZERO_COST = Counter(
    "keyaos_requests_zero_cost",
    "Answered requests billed at zero, by reason (free_key, unpriced, no_tokens, reported_zero).",
    ["reason"],
)
ESTIMATED = Counter(
    "keyaos_requests_estimated_usage",
    "Requests billed on estimated usage (the upstream reported none), by reason (the outcome).",
    ["reason"],
)
IN_FLIGHT = Gauge(
    "keyaos_requests_in_flight",
    "Requests to /v1 being answered now, over every worker.",
    multiprocess_mode="livesum",
)
DRAINING = Gauge(
    "keyaos_draining",
    "1 while a worker drains after SIGTERM (readiness answers 503).",
    multiprocess_mode="livemax",
)
REFRESH_DURATION = Histogram(
    "keyaos_refresh_duration_seconds",
    "Duration of each provider's catalog, price and balance refresh.",
    ["provider"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120),
)
REFRESH_ERRORS = Counter(
    "keyaos_refresh_errors", "Provider refreshes that failed, by provider.", ["provider"]
)
REFRESH_LAST_SUCCESS = Gauge(
    "keyaos_refresh_last_success_timestamp_seconds",
    "Unix time of each provider's last successful refresh.",
    ["provider"],
    multiprocess_mode="max",
)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROCESS_DIR_VARIABLE) or None


def observe_refresh(provider: str, *, duration_s: float, failed: bool) -> None:
    REFRESH_DURATION.labels(provider).observe(duration_s)
    if failed:
        REFRESH_ERRORS.labels(provider).inc()
    else:
        REFRESH_LAST_SUCCESS.labels(provider).set(time.time())


def render(*collectors: object) -> bytes:
    """The text exposition of every process's metrics plus ``collectors`` (read at scrape time)."""
    registry = CollectorRegistry(auto_describe=True)
    if multiprocess_dir():
        _multiprocess.MultiProcessCollector(registry)
        output = b""
    else:
        output = generate_latest(REGISTRY)
    for collector in collectors:
        registry.register(collector)
    return output + generate_latest(registry)


def forget_this_process() -> None:
    """Drop this process's live gauges (in-flight, draining) when it stops."""
    if multiprocess_dir():
        _multiprocess.mark_process_dead(os.getpid())

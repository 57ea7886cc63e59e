"""``/health``, ``/ready`` and ``/metrics``, and the drain on SIGTERM.

None of them is a client request: no client key, no ledger record, not counted in the request
metrics. ``/health`` answers from the event loop alone; ``/ready`` checks what serving needs
(database, cache, a fresh routing snapshot, a ledger writer that keeps up) and answers 503 naming
what fails, at once while the process drains; ``/metrics`` is the Prometheus text exposition,
for a bearer token (``KEYAOS_METRICS_TOKEN``) or, without one, for loopback clients only.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import signal
import threading
import time
from collections.abc import Iterator

from django.conf import settings
from django.core.cache import cache
from django.db import connection
from prometheus_client.core import GaugeMetricFamily

from billing.spool import LedgerBacklog
from billing.spool import ledger_backlog as spool_backlog
from keyaos.lib import metrics
from keyaos.lib.db import db_task
from providers.models import UpstreamKey
from routing import observe
from routing.runtime import Runtime, runtime

logger = logging.getLogger("keyaos.ops")

PATHS = frozenset({"/health", "/ready", "/metrics"})
CHECK_TIMEOUT_S = 2.0
# The poller checks every KEYAOS_SNAPSHOT_POLL_S; this many missed checks make the snapshot stale.
STALE_SNAPSHOT_POLLS = 20
MIN_STALE_SNAPSHOT_S = 10.0
LEDGER_MAX_AGE_S = 30.0


async def application(scope, receive, send) -> None:
    """The ASGI app behind the three paths (``keyaos.asgi`` dispatches here)."""
    if scope["method"] not in ("GET", "HEAD"):
        await _send(send, 405, {"error": "method not allowed"}, headers=[(b"allow", b"GET, HEAD")])
        return
    path = scope["path"]
    if path == "/health":
        await _send(send, 200, {"status": "ok"})
    elif path == "/ready":
        status, body = await readiness(runtime)
        await _send(send, status, body)
    elif not settings.KEYAOS_METRICS:
        await _send(send, 404, {"error": "metrics are off (KEYAOS_METRICS=false)"})
    elif not _may_scrape(scope):
        await _send(send, 403, {"error": "metrics: a bearer token or a loopback client is needed"})
    else:
        observe.flush()
        output = await asyncio.to_thread(metrics.render, GatewayCollector(runtime))
        await _send_bytes(send, 200, output, metrics.CONTENT_TYPE.encode())


async def readiness(gateway: Runtime) -> tuple[int, dict]:
    if gateway.draining:
        return 503, {"status": "draining", "failing": {"draining": "the process is stopping"}}
    failing: dict[str, str] = {}
    checks = await asyncio.gather(
        _check("database", db_task(_query_database)()),
        _check("cache", _query_cache()),
        _check("snapshot", gateway.ready()),
    )
    failing.update(problem for problem in checks if problem is not None)
    age = gateway.snapshot_age_s()
    if "snapshot" not in failing and (age is None or age > _stale_after_s()):
        failing["snapshot"] = f"not refreshed for {age:.0f} s" if age else "not loaded"
    backlog = ledger_backlog(gateway)
    if backlog.oldest_age_s is not None and backlog.oldest_age_s > LEDGER_MAX_AGE_S:
        failing["ledger"] = (
            f"{backlog.records} records wait, the oldest for {backlog.oldest_age_s:.0f} s"
        )
    body = {
        "status": "unready" if failing else "ready",
        "failing": failing,
        "snapshot_age_s": None if age is None else round(age, 3),
        "ledger_backlog": backlog.records,
        "degraded": degraded(gateway),
    }
    return (503 if failing else 200), body


def degraded(gateway: Runtime) -> list[str]:
    """What works in a reduced way: shown by /ready and /metrics, not a reason to be unready."""
    found = []
    if gateway.secret_problem:
        found.append(gateway.secret_problem)
    counters = gateway.counters.state()
    if counters.degraded:
        found.append(
            f"client key limits count in this process only, Redis unreachable: {counters.error}"
        )
    backlog = ledger_backlog(gateway)
    if backlog.dead_letters:
        found.append(f"{backlog.dead_letters} ledger records refused by the database")
    return found


def ledger_backlog(gateway: Runtime) -> LedgerBacklog:
    """What waits in this machine's spool (every worker's files) and the dead letters."""
    return spool_backlog(gateway.ledger.spool.directory)


def _stale_after_s() -> float:
    return max(MIN_STALE_SNAPSHOT_S, STALE_SNAPSHOT_POLLS * settings.KEYAOS_SNAPSHOT_POLL_S)


async def _check(name: str, awaitable) -> tuple[str, str] | None:
    try:
        await asyncio.wait_for(awaitable, CHECK_TIMEOUT_S)
    except TimeoutError:
        return name, f"no answer within {CHECK_TIMEOUT_S:.0f} s"
    except Exception as error:
        return name, f"{type(error).__name__}: {error}"[:300]
    return None


def _query_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


async def _query_cache() -> None:
    await cache.aget("ready-probe")


def _may_scrape(scope) -> bool:
    token = settings.KEYAOS_METRICS_TOKEN
    if token:
        headers = dict(scope.get("headers") or ())
        given = headers.get(b"authorization", b"").decode("latin-1")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())
    client = scope.get("client")
    try:
        return client is not None and ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False


class GatewayCollector:
    """Gauges read when scraped: this worker's view of keys, snapshot and ledger."""

    def __init__(self, gateway: Runtime) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gateway = self.gateway
        up = GaugeMetricFamily(
            "keyaos_upstream_key_up",
            "1 when an enabled upstream key can be routed to now, else 0.",
            labels=["provider", "key"],
        )
        health = GaugeMetricFamily(
            "keyaos_upstream_key_health",
            "1 for each enabled upstream key's health (ok, cooling_down, exhausted, invalid).",
            labels=["provider", "key", "health"],
        )
        balance = GaugeMetricFamily(
            "keyaos_upstream_key_balance",
            "Each upstream key's balance in its provider's currency, where known.",
            labels=["provider", "key", "currency"],
        )
        snapshot = gateway.snapshot
        if snapshot is not None:
            providers = {
                offer.provider.id: offer.provider
                for offers in snapshot.offers.values()
                for offer in offers
            }
            now = time.time()
            for provider_id, keys in sorted(snapshot.keys.items()):
                provider = providers.get(provider_id)
                slug = provider.slug if provider else f"provider-{provider_id}"
                for key in keys:
                    reason = gateway.board.unusable_reason(key, now)
                    up.add_metric([slug, key.name], 0 if reason else 1)
                    health.add_metric([slug, key.name, _health_name(reason)], 1)
                    if key.balance is not None and provider is not None:
                        balance.add_metric([slug, key.name, provider.currency], float(key.balance))
        yield from (up, health, balance)
        age = gateway.snapshot_age_s()
        yield GaugeMetricFamily(
            "keyaos_snapshot_age_seconds",
            "Seconds since this worker last saw its routing snapshot current.",
            value=age if age is not None else float("nan"),
        )
        backlog = ledger_backlog(gateway)
        yield GaugeMetricFamily(
            "keyaos_ledger_backlog_records",
            "Ledger records not yet written to the database.",
            value=backlog.records,
        )
        yield GaugeMetricFamily(
            "keyaos_ledger_oldest_unwritten_age_seconds",
            "Age of the oldest ledger record not yet written (0 when none waits).",
            value=backlog.oldest_age_s or 0.0,
        )
        yield GaugeMetricFamily(
            "keyaos_ledger_dead_letters",
            "Ledger records the database refused, kept aside for the operator.",
            value=backlog.dead_letters,
        )
        yield GaugeMetricFamily(
            "keyaos_degraded",
            "Number of features working in a reduced way (see /ready).",
            value=len(degraded(gateway)),
        )


def _health_name(reason: str | None) -> str:
    if reason is None:
        return "ok"
    if reason.startswith("invalid"):
        return UpstreamKey.Health.INVALID
    if reason.startswith(("exhausted", "balance")):
        return UpstreamKey.Health.EXHAUSTED
    return "cooling_down"


def install_drain() -> None:
    """Wrap the server's SIGTERM/SIGINT handlers: drain first, then let the server stop.

    SIGTERM turns /ready to 503 at once and keeps accepting requests for
    ``KEYAOS_DRAIN_NOTICE_S`` (load balancers notice the 503 and stop sending), then hands over
    to uvicorn, which stops accepting and waits for requests in flight up to its
    ``--timeout-graceful-shutdown`` (``KEYAOS_DRAIN_S`` under ``manage.py serve``). SIGINT
    (Ctrl-C) and a second signal skip the notice.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        original = signal.getsignal(signum)
        if callable(original):
            signal.signal(signum, _drain_handler(loop, original))


def _drain_handler(loop: asyncio.AbstractEventLoop, original):
    def handle(signum: int, frame) -> None:
        notice = settings.KEYAOS_DRAIN_NOTICE_S
        if runtime.draining or signum != signal.SIGTERM or not notice:
            start_draining()
            original(signum, frame)
            return
        start_draining()
        logger.info("draining: /ready answers 503; stopping to accept in %.1f s", notice)
        loop.call_soon_threadsafe(loop.call_later, notice, original, signum, None)

    return handle


def start_draining() -> None:
    if not runtime.draining:
        runtime.draining = True
        metrics.DRAINING.set(1)


async def _send(send, status: int, body: dict, headers: list | None = None) -> None:
    await _send_bytes(send, status, json.dumps(body).encode(), b"application/json", headers)


async def _send_bytes(send, status: int, content: bytes, content_type: bytes, headers=None):
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(content)).encode()),
                (b"cache-control", b"no-store"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": content})

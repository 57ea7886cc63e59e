"""Per-process gateway state: routing snapshot, key health, upstream client, ledger writer.

Created in the event loop that serves ``/v1`` (at ASGI lifespan start-up, or lazily by the first
request when the server runs without lifespan) and closed at shutdown.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from functools import partial

import aiohttp
import httpx
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from httpx_aiohttp import AiohttpTransport

from billing.counters import Counters
from billing.limits import CostCalibration
from billing.recorder import LedgerWriter, RequestRecord
from keyaos.lib.db import db_task
from routing.dispatcher import InFlight
from routing.health import HealthBoard
from routing.models import SnapshotVersion
from routing.observe import flush as flush_metrics
from routing.observe import request_finished
from routing.sessions import SessionMemory
from routing.snapshot import Snapshot, build_snapshot

logger = logging.getLogger("keyaos.gateway")

KEEPALIVE_S = 4.0


class Runtime:
    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        self.board = HealthBoard()
        self.ledger = LedgerWriter()
        self.counters = new_counters()
        self.calibration = CostCalibration()
        self.in_flight = InFlight()
        self.sessions = SessionMemory()
        self.client: httpx.AsyncClient | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._poller: asyncio.Task | None = None
        self._starting: asyncio.Lock | None = None
        self._reloading: asyncio.Lock | None = None
        self.background: set[asyncio.Task] = set()
        self._poll_failing = False
        self._background_failures: set[tuple[str, str]] = set()
        self.checked_at: float | None = None  # monotonic time of the last good snapshot check
        self.draining = False
        # Why some stored upstream secrets do not decrypt (None: all do); /ready shows it.
        self.secret_problem: str | None = None

    async def ready(self) -> Runtime:
        if self.loop is asyncio.get_running_loop() and self.snapshot is not None:
            return self
        await self.start()
        return self

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.loop is not loop:
            self.loop, self._starting, self._reloading = loop, asyncio.Lock(), asyncio.Lock()
            self.snapshot, self.client = None, None
            self.counters = new_counters()  # a Redis connection belongs to one event loop
            self.sessions = SessionMemory(settings.REDIS_URL)  # its connections: one loop's
        async with self._starting:
            if self.snapshot is not None:
                return
            snapshot = await db_task(build_snapshot)()
            self._check_secrets(snapshot, starting=True)
            self.client = new_upstream_client()
            self.snapshot = snapshot
            self.board.adopt(snapshot.keys)
            self.checked_at = time.monotonic()
            self.ledger.abandon()  # a writer of an earlier event loop leaves its spool files
            self.ledger = LedgerWriter()
            self.ledger.start()
            self._poller = loop.create_task(self._poll(), name="snapshot-poller")
            # Everything loaded so far lives as long as the process: keep it out of the garbage
            # collector's full passes, which otherwise show up as latency spikes.
            gc.freeze()

    async def stop(self) -> None:
        if self.loop is None:
            return
        if self._poller is not None:
            self._poller.cancel()
        if self.background:
            await asyncio.wait(self.background, timeout=5)
        await self.ledger.stop()
        flush_metrics()
        if self.client is not None:
            await self.client.aclose()
        await self.counters.close()
        await self.sessions.close()
        self.snapshot, self.client, self.loop = None, None, None

    def submit(self, record: RequestRecord) -> None:
        """The one call that hands a finished request's record over: ledger, metrics, log."""
        self.ledger.submit(record)
        request_finished(self.snapshot, record)

    def snapshot_age_s(self) -> float | None:
        """Seconds since the snapshot was last known current (None before the first build)."""
        return None if self.checked_at is None else time.monotonic() - self.checked_at

    def _check_secrets(self, snapshot: Snapshot, *, starting: bool = False) -> None:
        """Refuse to start when no stored secret decrypts (the encryption key is wrong); name
        the undecryptable keys in the log once each time the set changes."""
        check = snapshot.secret_check
        problem = check.problem()
        if starting and check.none_readable:
            raise ImproperlyConfigured(problem)
        if problem != self.secret_problem and problem is not None:
            logger.error("%s", problem)
        self.secret_problem = problem

    def spawn(self, coroutine) -> asyncio.Task:
        """Run work after the response, keeping a reference so it is not collected midway."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task) -> None:
        self.background.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        what = (task.get_coro().__qualname__, type(error).__name__)
        if what in self._background_failures:
            return
        self._background_failures.add(what)  # once per kind: a failing store is one condition
        logger.error("background work %s failed (logged once)", what[0], exc_info=error)

    async def reload(self) -> None:
        """Rebuild the snapshot; builds run one at a time, so an older one never lands last."""
        async with self._reloading:
            self.snapshot = await db_task(build_snapshot)()
            self._check_secrets(self.snapshot)
            self.board.adopt(self.snapshot.keys)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(settings.KEYAOS_SNAPSHOT_POLL_S)
            try:
                token = await db_task(SnapshotVersion.current)()
                if self.snapshot is None or token != self.snapshot.token:
                    await self.reload()
                key_ids = [k.id for keys in self.snapshot.keys.values() for k in keys]
                await self.board.merge_shared(key_ids)
            except asyncio.CancelledError:
                raise
            except Exception:
                if not self._poll_failing:
                    logger.exception("snapshot refresh failed; routing keeps the previous snapshot")
                self._poll_failing = True
            else:
                self.checked_at = time.monotonic()
                self._poll_failing = False


def new_counters() -> Counters:
    return Counters(
        settings.REDIS_URL,
        timeout_s=settings.KEYAOS_REDIS_TIMEOUT_S,
        retry_s=settings.KEYAOS_REDIS_RETRY_S,
    )


class _NoCookies(httpx.Cookies):
    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class UpstreamClient(httpx.AsyncClient):
    """An httpx client without a cookie jar. An upstream's ``Set-Cookie`` (a CDN's bot cookie,
    a session) is never sent back: requests on different keys of one provider (different
    accounts) are not tied together by a shared cookie, and no answer pays for httpx's cookie
    parsing (about 3 % of the CPU of a request)."""

    @property
    def cookies(self) -> httpx.Cookies:
        return _NO_COOKIES

    @cookies.setter
    def cookies(self, cookies: object) -> None:
        pass


_NO_COOKIES = _NoCookies()


def new_upstream_client() -> httpx.AsyncClient:
    """One pooled client per process, with a large pool. Each request carries its provider's
    timeouts (``ProviderInfo.timeouts``).

    httpx's API on aiohttp's connection pool (``httpx-aiohttp``): httpcore's pool scans every
    connection on each request, which `make bench` measured at 2-3x the CPU per request at
    concurrency 50.
    """
    # aiohttp never resends a POST on a kept-alive connection the server has just closed, so
    # idle connections are dropped before common server idle timeouts (uvicorn: 5 s) end them.
    limits = httpx.Limits(
        max_connections=1000, max_keepalive_connections=200, keepalive_expiry=KEEPALIVE_S
    )
    return UpstreamClient(
        transport=AiohttpTransport(
            limits=limits, trust_env=False, client=partial(_aiohttp_session, limits)
        ),
        follow_redirects=False,
        trust_env=False,
    )


def _aiohttp_session(limits: httpx.Limits) -> aiohttp.ClientSession:
    """The transport's own session (made on the first request, in the event loop), with
    aiohttp's cookie jar off as well."""
    connector = aiohttp.TCPConnector(
        limit=limits.max_connections,
        keepalive_timeout=limits.keepalive_expiry,
        ssl=httpx.create_ssl_context(trust_env=False),
    )
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())


runtime = Runtime()


async def startup() -> None:
    await runtime.start()


async def shutdown() -> None:
    await runtime.stop()

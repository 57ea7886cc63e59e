"""Writes the ledger after responses, in batches, off the request path.

The proxy hands each finished request to ``LedgerWriter.submit`` (no I/O); a background task
writes batches in one transaction: the ledger rows, their failed attempts, the upstream balance
debits and the client keys' last use. A database error keeps the batch and retries it with
backoff, so a short outage loses nothing; what is still queued in memory when the process is
killed is lost (a clean shutdown flushes it).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db import IntegrityError, InterfaceError, OperationalError, connection, transaction
from django.db.models import Case, DateTimeField, DecimalField, F, Value, When
from django.utils import timezone

from billing.costs import Cost, Prices, request_cost
from billing.models import ApiKey, Attempt, LedgerEntry, budget_period_start
from billing.usage import Usage
from keyaos.lib.db import insert_rows
from providers.models import MONEY_DIGITS, Provider, UpstreamKey

logger = logging.getLogger("keyaos.ledger")

BATCH_SIZE = 500
BATCH_WINDOW_S = 0.05
MAX_BACKOFF_S = 10.0


@dataclass
class AttemptRecord:
    provider_id: int | None
    upstream_key_id: int | None
    upstream_model: str
    status_code: int | None
    failure: str
    error: str
    duration_ms: int


@dataclass
class RequestRecord:
    request_id: str
    api_key_id: int | None
    requested_model: str
    endpoint: str
    streamed: bool
    outcome: str
    status_code: int
    created_at: datetime = field(default_factory=timezone.now)
    provider_id: int | None = None
    upstream_key_id: int | None = None
    upstream_model: str = ""
    usage: Usage = field(default_factory=Usage)
    prices: Prices | None = None
    multiplier: Decimal = Decimal(1)
    usd_per_unit: Decimal = Decimal(1)
    budget_period: str = ApiKey.BudgetPeriod.LIFETIME
    attempts: list[AttemptRecord] = field(default_factory=list)
    latency_ms: int = 0
    ttfb_ms: int | None = None
    overhead_ms: float | None = None
    error: str = ""
    expected_cache_saving_usd: Decimal = Decimal(0)

    def cost(self) -> Cost | None:
        if self.prices is None or (
            self.usage.total_tokens == 0 and self.usage.reported_cost is None
        ):
            return None
        return request_cost(
            self.usage, self.prices, multiplier=self.multiplier, usd_per_unit=self.usd_per_unit
        )


def write_records(records: list[RequestRecord]) -> None:
    """Write a batch: ledger rows, attempts, balance debits and last-use times, atomically."""
    debits: dict[int, Decimal] = defaultdict(Decimal)
    spends: dict[int, dict[datetime | None, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    last_used: dict[int, datetime] = {}
    rows = []
    for record in records:
        cost = record.cost()
        rows.append(_ledger_row(record, cost))
        if cost is not None and record.upstream_key_id and cost.list_cost:
            debits[record.upstream_key_id] += cost.list_cost
        if cost is not None and record.api_key_id and cost.cost_usd:
            start = budget_period_start(record.budget_period, record.created_at)
            spends[record.api_key_id][start] += cost.cost_usd
        if record.api_key_id:
            last_used[record.api_key_id] = max(
                record.created_at, last_used.get(record.api_key_id, record.created_at)
            )
    with transaction.atomic():
        insert_rows(LedgerEntry, rows)
        _insert_failed_attempts(records)
        _debit_balances(debits)
        _update_client_keys(last_used, spends)


def _insert_failed_attempts(records: list[RequestRecord]) -> None:
    """The attempt that answered is the ledger row itself; only failed ones get rows."""
    failed = {
        record.request_id: [
            (number, attempt)
            for number, attempt in enumerate(record.attempts, start=1)
            if attempt.failure
        ]
        for record in records
        if any(attempt.failure for attempt in record.attempts)
    }
    if not failed:
        return
    entry_ids = LedgerEntry.objects.filter(request_id__in=failed).values_list("request_id", "pk")
    insert_rows(
        Attempt,
        [
            {"entry": entry_id, "number": number, **vars(attempt)}
            for request_id, entry_id in entry_ids
            for number, attempt in failed[request_id]
        ],
    )


def _update_client_keys(
    last_used: dict[int, datetime], spends: dict[int, dict[datetime | None, Decimal]]
) -> None:
    """Move each key's last use and add to its spend in one UPDATE (one more per further budget
    period in the batch). F() expressions keep concurrent writers from losing an update."""
    for api_key_id, when in sorted(last_used.items()):
        updates = [
            _spend_changes(start, amount) for start, amount in spends[api_key_id].items()
        ] or [{}]
        updates[0]["last_used_at"] = when
        for changes in updates:
            ApiKey.objects.filter(pk=api_key_id).update(**changes)


def _spend_changes(start: datetime | None, amount: Decimal) -> dict[str, Any]:
    """A newer period restarts the period spend; a late record of an older period only counts
    towards the lifetime."""
    if start is None:
        period_spent, started = F("period_spent_usd") + amount, F("period_started_at")
    else:
        period_spent = Case(
            When(period_started_at=start, then=F("period_spent_usd") + amount),
            When(period_started_at__gt=start, then=F("period_spent_usd")),
            default=Value(amount),
            output_field=DecimalField(**MONEY_DIGITS),
        )
        started = Case(
            When(period_started_at__gt=start, then=F("period_started_at")),
            default=Value(start),
            output_field=DateTimeField(),
        )
    return {
        "spent_usd": F("spent_usd") + amount,
        "period_spent_usd": period_spent,
        "period_started_at": started,
    }


def _debit_balances(debits: dict[int, Decimal]) -> None:
    """Lower known balances by the list cost, atomically; a key at zero becomes exhausted."""
    if not debits:
        return
    for key_id, amount in sorted(debits.items()):
        UpstreamKey.objects.filter(pk=key_id, balance__isnull=False).update(
            balance=F("balance") - amount
        )
    UpstreamKey.objects.filter(
        pk__in=debits, balance__lte=0, health=UpstreamKey.Health.OK
    ).mark_exhausted("balance reached zero")


def _ledger_row(record: RequestRecord, cost: Cost | None) -> dict[str, Any]:
    usage = record.usage
    row = {
        "request_id": record.request_id,
        "created_at": record.created_at,
        "api_key": record.api_key_id,
        "provider": record.provider_id,
        "upstream_key": record.upstream_key_id,
        "requested_model": record.requested_model[:200],
        "upstream_model": record.upstream_model,
        "endpoint": record.endpoint,
        "streamed": record.streamed,
        "outcome": record.outcome,
        "status_code": record.status_code,
        "attempts": len(record.attempts),
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.cached_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "usage_source": usage.source,
        "latency_ms": record.latency_ms,
        "ttfb_ms": record.ttfb_ms,
        "overhead_ms": round(Decimal(record.overhead_ms), 3)
        if record.overhead_ms is not None
        else None,
        "error": record.error,
        # Decimal(): a record read back from JSON holds the figure as a string
        "expected_cache_saving_usd": Decimal(record.expected_cache_saving_usd),
    }
    if record.prices is not None:
        row["currency"] = record.prices.currency
    if cost is not None:
        row |= {
            "cost": cost.list_cost,
            "cost_source": cost.source,
            "usd_per_unit": cost.usd_per_unit,
            "cost_usd": cost.cost_usd,
            "list_cost_usd": cost.list_cost_usd,
        }
    return row


def _write_keeping_connection(batch: list[RequestRecord]) -> None:
    try:
        try:
            write_records(batch)
        except IntegrityError:
            # A client key, provider or upstream key deleted while its requests were in
            # flight: keep the rows, without the references that no longer exist.
            _forget_deleted_references(batch)
            write_records(batch)
    except Exception:
        _close_connection()  # the retry opens a fresh one
        raise


def _forget_deleted_references(records: list[RequestRecord]) -> None:
    def existing(model, ids: set[int | None]) -> set[int]:
        return set(model.objects.filter(pk__in=ids - {None}).values_list("pk", flat=True))

    attempts = [attempt for record in records for attempt in record.attempts]
    api_keys = existing(ApiKey, {r.api_key_id for r in records})
    providers = existing(Provider, {r.provider_id for r in [*records, *attempts]})
    upstream_keys = existing(UpstreamKey, {r.upstream_key_id for r in [*records, *attempts]})
    for record in records:
        if record.api_key_id not in api_keys:
            record.api_key_id = None
    for item in [*records, *attempts]:
        if item.provider_id not in providers:
            item.provider_id = None
        if item.upstream_key_id not in upstream_keys:
            item.upstream_key_id = None


def _run_when_idle() -> None:
    """Put the calling thread (not the process: Linux schedules threads) in the idle class.

    Other systems have no per-thread equivalent; there the thread keeps normal priority.
    """
    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _close_connection() -> None:
    """Close this thread's connection (``connection`` resolves per thread when called here)."""
    connection.close()


class LedgerWriter:
    """Writes queued records in batches from threads that keep their database connections.

    The first record of a batch waits ``BATCH_WINDOW_S`` for others, so a busy gateway commits
    one transaction for many requests; a thread that keeps its connection avoids reconnecting
    (and, on SQLite, a WAL checkpoint) per batch.

    Batches are written by a thread in Linux's ``SCHED_IDLE`` class: it runs only when the core
    has nothing else to do and gives the core up the moment a request needs it. At normal
    priority (even at a high nice value, since the kernel lets a running thread finish its time
    slice) its few milliseconds per batch landed in the latency of every request that overlapped
    one, which was the gateway's p99. On a saturated core that thread would only crawl, so when
    a full batch or more is waiting, the next batch goes to a second thread at normal priority.
    """

    def __init__(self) -> None:
        self.queue: asyncio.Queue[RequestRecord] = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.idle_executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="ledger-writer-idle", initializer=_run_when_idle
        )
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-writer")

    def start(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run(), name="ledger-writer")

    def submit(self, record: RequestRecord) -> None:
        self.queue.put_nowait(record)

    async def flush(self) -> None:
        await self.queue.join()

    async def stop(self, timeout_s: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self.flush(), timeout_s)
        except TimeoutError:
            logger.error("ledger: %d records not written at shutdown", self.queue.qsize())
        if self.task is not None:
            self.task.cancel()
        loop = asyncio.get_running_loop()
        for executor in (self.idle_executor, self.executor):
            await loop.run_in_executor(executor, _close_connection)
            executor.shutdown(wait=False)

    async def _run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            await asyncio.sleep(BATCH_WINDOW_S)
            while len(batch) < BATCH_SIZE and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            behind = self.queue.qsize() >= BATCH_SIZE
            await self._write_with_retries(batch, self.executor if behind else self.idle_executor)
            for _ in batch:
                self.queue.task_done()

    async def _write_with_retries(
        self, batch: list[RequestRecord], executor: ThreadPoolExecutor
    ) -> None:
        backoff = 0.2
        while True:
            try:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(executor, _write_keeping_connection, batch)
                return
            except asyncio.CancelledError:
                raise
            except (OperationalError, InterfaceError):
                logger.exception("ledger: the database is unavailable; retrying %d", len(batch))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            except Exception:
                # One record the database refuses must not hold back every later one.
                if len(batch) == 1:
                    logger.exception("ledger: cannot write %r; dropped", batch[0])
                    return
                for record in batch:
                    await self._write_with_retries([record], executor)
                return

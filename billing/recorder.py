"""The ledger: every finished request's record, spooled before its answer ends, then written to
the database in batches, off the request path.

The exchange hands each finished request to ``LedgerWriter.submit``, which appends it to this
process's spool (``billing.spool``: one ``os.write``, no ``fsync``). The writer reads batches back
from the spool, prepares them outside any transaction (costs, rows, text made storable), and writes
each in one transaction: one multi-row INSERT of the ledger rows that skips request ids already
present, their failed attempts, and the upstream balance debits and client spend of the rows
actually inserted, so writing a batch twice (a crash between commit and the spool's offset, a
replay) changes nothing. Then the spool's committed offset moves past it. A database that is away
keeps the batch in the spool and is retried with backoff; a record the database refuses is found
by splitting its batch in halves and kept in the dead-letter file with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, InterfaceError, OperationalError, connection, transaction
from django.utils import timezone

from billing.costs import Cost, Prices, request_cost
from billing.models import ApiKey, Attempt, LedgerEntry, budget_period_start
from billing.spool import Batch, Spool
from billing.usage import Usage
from keyaos.lib import jsonbody
from keyaos.lib.db import RowInserter
from providers.models import MONEY_DIGITS, Provider, UpstreamKey

logger = logging.getLogger("keyaos.ledger")

BATCH_SIZE = 500
# A batch waits this long for company once its first record is spooled (not when behind), or
# until this many records wait: under load a turn of the loop takes milliseconds, and a batch
# that waited out the window and then a turn took two.
BATCH_WINDOW_S = 0.05
BATCH_FILL = 32
BATCHES_IN_FLIGHT = 2
# Records prepared on the event loop (about 30 us each) before it takes its next turn.
PREPARE_SLICE = 100
MAX_BACKOFF_S = 10.0
ORPHAN_SCAN_S = 10.0
ERROR_MAX_CHARS = 10_000


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

    def to_json(self) -> str:
        """The spool's compact form (``jsonbody.encode``: one line, decimals as strings, so
        nothing is lost on the way; the standard library's JSON here was 4 % of a request's
        CPU)."""
        return jsonbody.encode(self).decode()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestRecord:
        known = {name: value for name, value in data.items() if name in _RECORD_FIELDS}
        known["created_at"] = datetime.fromisoformat(known["created_at"])
        for name in ("multiplier", "usd_per_unit"):
            if name in known:
                known[name] = Decimal(known[name])
        if usage := known.get("usage"):
            usage = {name: value for name, value in usage.items() if name in _USAGE_FIELDS}
            usage["reported_cost"] = _decimal_or_none(usage.get("reported_cost"))
            known["usage"] = Usage(**usage)
        if prices := known.get("prices"):
            known["prices"] = Prices(
                currency=prices["currency"],
                input_per_mtok=Decimal(prices["input_per_mtok"]),
                output_per_mtok=Decimal(prices["output_per_mtok"]),
                cached_input_per_mtok=_decimal_or_none(prices.get("cached_input_per_mtok")),
            )
        known["attempts"] = [AttemptRecord(**attempt) for attempt in known.get("attempts", [])]
        return cls(**known)


_RECORD_FIELDS = {f.name for f in fields(RequestRecord)}
_USAGE_FIELDS = {f.name for f in fields(Usage)}


def _decimal_or_none(value: str | None) -> Decimal | None:
    return None if value is None else Decimal(value)


# --- preparing and writing batches (writer threads) ---------------------------------------------

_entries = RowInserter(LedgerEntry, skip_conflicts="request_id", returning=("request_id", "id"))
_attempts = RowInserter(Attempt)
_FOREIGN_KEYS = {
    name: _entries.fields.index(LedgerEntry._meta.get_field(name))
    for name in ("api_key", "provider", "upstream_key")
}


@dataclass
class Entry:
    """One record made ready for the database: its row's values and what it moves."""

    request_id: str
    values: list[Any]
    attempts: list[dict[str, Any]]
    created_at: datetime
    api_key_id: int | None
    upstream_key_id: int | None
    debit: Decimal | None
    spend_usd: Decimal | None
    period_start: datetime | None
    source: dict[str, Any] | None = None  # the spooled form, for the dead letters
    record: RequestRecord | None = None  # or the record itself, when it was never decoded

    def spooled_form(self) -> dict[str, Any]:
        if self.source is not None:
            return self.source
        if self.record is not None:
            return json.loads(self.record.to_json())
        return {"request_id": self.request_id}


@dataclass
class Refused:
    """A record the database (or the writer) would not take, and why."""

    source: dict[str, Any] | str
    reason: str

    def dead_letter(self) -> dict[str, Any]:
        key = "record" if isinstance(self.source, dict) else "raw"
        return {"reason": self.reason, key: self.source}


def prepare(record: RequestRecord, source: dict[str, Any] | None = None) -> Entry:
    cost = record.cost()
    failed = [
        {"number": number, **vars(attempt), "error": attempt.error[:ERROR_MAX_CHARS]}
        for number, attempt in enumerate(record.attempts, start=1)
        if attempt.failure
    ]
    return Entry(
        request_id=record.request_id,
        values=_entries.values(_ledger_row(record, cost)),
        attempts=failed,
        created_at=record.created_at,
        api_key_id=record.api_key_id,
        upstream_key_id=record.upstream_key_id,
        debit=cost.list_cost if cost is not None and cost.list_cost else None,
        spend_usd=cost.cost_usd if cost is not None and cost.cost_usd else None,
        period_start=budget_period_start(record.budget_period, record.created_at),
        source=source,
        record=None if source is not None else record,
    )


def prepare_line(line: bytes) -> Entry | Refused:
    """A spool line as an entry; one that cannot be read or priced is refused, not lost."""
    try:
        data = json.loads(line)["record"]
    except (ValueError, KeyError, TypeError) as error:
        return Refused(line.decode(errors="replace"), f"unreadable: {error}")
    try:
        return prepare(RequestRecord.from_json(data), data)
    except Exception as error:
        return Refused(data, _unprepared(error))


def prepare_held(record: RequestRecord) -> Entry | Refused:
    """A record this process spooled, prepared without reading its line back."""
    try:
        return prepare(record)
    except Exception as error:
        return Refused(json.loads(record.to_json()), _unprepared(error))


def _unprepared(error: Exception) -> str:
    return f"cannot be prepared: {type(error).__name__}: {error}"


def prepare_lines(lines: list[bytes]) -> tuple[list[Entry], list[Refused]]:
    entries, refused = [], []
    for line in lines:
        prepared = prepare_line(line)
        (refused if isinstance(prepared, Refused) else entries).append(prepared)
    return entries, refused


def write_records(records: list[RequestRecord]) -> int:
    """Write records at once (no spool): returns how many rows were new."""
    return write_entries([prepare(record) for record in records])


def write_entries(entries: list[Entry]) -> int:
    """One transaction: the rows not yet present, their failed attempts, and, for those rows
    only, the balance debits, client spend and last use. Returns the rows inserted."""
    with transaction.atomic():
        inserted = dict(_entries.insert([entry.values for entry in entries]))
        new = [entry for entry in entries if entry.request_id in inserted]
        attempts = [
            _attempts.values({"entry": inserted[entry.request_id], **attempt})
            for entry in new
            for attempt in entry.attempts
        ]
        if attempts:
            _attempts.insert(attempts)
        debits: dict[int, Decimal] = defaultdict(Decimal)
        spends: dict[int, dict[datetime | None, Decimal]] = defaultdict(
            lambda: defaultdict(Decimal)
        )
        last_used: dict[int, datetime] = {}
        for entry in new:
            if entry.debit is not None and entry.upstream_key_id:
                debits[entry.upstream_key_id] += entry.debit
            if entry.api_key_id:
                if entry.spend_usd is not None:
                    spends[entry.api_key_id][entry.period_start] += entry.spend_usd
                last_used[entry.api_key_id] = max(
                    entry.created_at, last_used.get(entry.api_key_id, entry.created_at)
                )
        _debit_balances(debits)
        _update_client_keys(last_used, spends)
    return len(new)


def write_isolating(entries: list[Entry]) -> tuple[int, list[Refused]]:
    """Write ``entries``; a batch the database refuses is split in halves until the records it
    refuses stand alone, so one bad record costs a few more transactions, not one per record.

    A database that is away (``OperationalError``, ``InterfaceError``) is not the records'
    fault: that error goes to the caller, which keeps the batch and retries it.
    """
    if not entries:
        return 0, []
    try:
        return _write_keeping_connection(entries), []
    except (OperationalError, InterfaceError):
        raise
    except Exception as error:
        if len(entries) == 1:
            entry = entries[0]
            reason = f"{type(error).__name__}: {error}".strip()
            return 0, [Refused(entry.spooled_form(), reason)]
    middle = len(entries) // 2
    first, first_refused = write_isolating(entries[:middle])
    second, second_refused = write_isolating(entries[middle:])
    return first + second, first_refused + second_refused


def _write_keeping_connection(entries: list[Entry]) -> int:
    try:
        try:
            return write_entries(entries)
        except IntegrityError:
            # A client key, provider or upstream key deleted while its requests were in
            # flight: keep the rows, without the references that no longer exist.
            _forget_deleted_references(entries)
            return write_entries(entries)
    except Exception:
        _close_connection()  # the retry opens a fresh one
        raise


def _forget_deleted_references(entries: list[Entry]) -> None:
    def existing(model, ids: set[int | None]) -> set[int]:
        return set(model.objects.filter(pk__in=ids - {None}).values_list("pk", flat=True))

    attempts = [attempt for entry in entries for attempt in entry.attempts]
    present = {
        "api_key": existing(ApiKey, {entry.values[_FOREIGN_KEYS["api_key"]] for entry in entries}),
        "provider": existing(
            Provider,
            {entry.values[_FOREIGN_KEYS["provider"]] for entry in entries}
            | {attempt["provider_id"] for attempt in attempts},
        ),
        "upstream_key": existing(
            UpstreamKey,
            {entry.values[_FOREIGN_KEYS["upstream_key"]] for entry in entries}
            | {attempt["upstream_key_id"] for attempt in attempts},
        ),
    }
    for entry in entries:
        for name, index in _FOREIGN_KEYS.items():
            if entry.values[index] not in present[name]:
                entry.values[index] = None
        entry.api_key_id = entry.values[_FOREIGN_KEYS["api_key"]]
        entry.upstream_key_id = entry.values[_FOREIGN_KEYS["upstream_key"]]
    for attempt in attempts:
        for name in ("provider", "upstream_key"):
            if attempt[f"{name}_id"] not in present[name]:
                attempt[f"{name}_id"] = None


def _update_client_keys(
    last_used: dict[int, datetime], spends: dict[int, dict[datetime | None, Decimal]]
) -> None:
    """Move each key's last use and add to its spend in one UPDATE (one more per further budget
    period in the batch). The sums are computed by the database (``spent_usd = spent_usd +
    %s``), so concurrent writers never lose an update."""
    ops = connection.ops
    with connection.cursor() as cursor:
        for api_key_id, when in sorted(last_used.items()):
            changes = list(spends[api_key_id].items()) or [(None, None)]
            for number, (start, amount) in enumerate(changes):
                assignments, params = _spend_assignments(start, amount)
                if number == 0:
                    assignments.append(_sql("last_used"))
                    params.append(ops.adapt_datetimefield_value(when))
                cursor.execute(
                    _sql("update_client").format(", ".join(assignments)), [*params, api_key_id]
                )


def _spend_assignments(
    start: datetime | None, amount: Decimal | None
) -> tuple[list[str], list[Any]]:
    """A newer period restarts the period spend; a late record of an older period only counts
    towards the lifetime."""
    if amount is None:
        return [], []
    ops = connection.ops
    money = ops.adapt_decimalfield_value(amount, **MONEY_DIGITS)
    if start is None:
        return [_sql("spend_lifetime")], [money, money]
    begun = ops.adapt_datetimefield_value(start)
    return [_sql("spend_period")], [money, begun, money, begun, money, begun, begun]


def _debit_balances(debits: dict[int, Decimal]) -> None:
    """Lower known balances by the list cost, atomically; a key at zero becomes exhausted.
    Keys of unknown balance are not debited and cannot run out."""
    ops = connection.ops
    run_out = []
    with connection.cursor() as cursor:
        for key_id, amount in sorted(debits.items()):
            cursor.execute(
                _sql("debit"), [ops.adapt_decimalfield_value(amount, **MONEY_DIGITS), key_id]
            )
            returned = cursor.fetchone()
            if returned is not None and Decimal(str(returned[0])) <= 0:
                run_out.append(key_id)
    if run_out:
        UpstreamKey.objects.filter(pk__in=run_out, health=UpstreamKey.Health.OK).mark_exhausted(
            "balance reached zero"
        )


_STATEMENTS: dict[tuple[str, str], str] = {}


def _sql(name: str) -> str:
    """The writer's UPDATE statements, in the connection's quoting, built once per vendor: the
    ORM would build and compile each anew, five times the statement's own cost."""
    key = (connection.vendor, name)
    if key not in _STATEMENTS:
        quote = connection.ops.quote_name
        keys, clients = (quote(model._meta.db_table) for model in (UpstreamKey, ApiKey))
        balance, spent, period_spent, started, last_used, pk = map(
            quote,
            ("balance", "spent_usd", "period_spent_usd", "period_started_at", "last_used_at", "id"),
        )
        _STATEMENTS[key] = {
            "debit": f"UPDATE {keys} SET {balance} = {balance} - %s "
            f"WHERE {pk} = %s AND {balance} IS NOT NULL RETURNING {balance}",
            "update_client": f"UPDATE {clients} SET {{}} WHERE {pk} = %s",
            "spend_lifetime": f"{spent} = {spent} + %s, {period_spent} = {period_spent} + %s",
            "spend_period": f"{spent} = {spent} + %s, "
            f"{period_spent} = CASE WHEN {started} = %s THEN {period_spent} + %s "
            f"WHEN {started} > %s THEN {period_spent} ELSE %s END, "
            f"{started} = CASE WHEN {started} > %s THEN {started} ELSE %s END",
            "last_used": f"{last_used} = %s",
        }[name]
    return _STATEMENTS[key]


def _ledger_row(record: RequestRecord, cost: Cost | None) -> dict[str, Any]:
    usage = record.usage
    row = {
        "request_id": record.request_id,
        "created_at": record.created_at,
        "api_key": record.api_key_id,
        "provider": record.provider_id,
        "upstream_key": record.upstream_key_id,
        "requested_model": record.requested_model,
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
        "error": record.error[:ERROR_MAX_CHARS],
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


def _close_connection() -> None:
    """Close this thread's connection (``connection`` resolves per thread when called here)."""
    connection.close()


class LedgerWriter:
    """Spools records on the request path and moves them to the database in batches.

    A batch is read back from the spool and prepared (decoding, costs, row values: the Python
    work, about 30 us a record) on the event loop itself, up to ``PREPARE_SLICE`` records between
    two turns of the loop, so it takes its share of the core in small pieces. The transaction runs
    on a thread of its own that keeps its database connection: it mostly waits for the database,
    without the GIL; two batches may be in its hands at once, and the spool's committed offset
    follows them in order. Python work in a thread does not get its share: a thread waiting for the
    GIL asks for it only after a whole switch interval in which the GIL never changed hands, and
    the loop thread hands it over and takes it back at every poll, so under load such a thread
    crawled (the writer used to, at about 1,200 rows/s); in Linux's idle scheduling class it
    could even hold the GIL while preempted and stall the process until a core went idle.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.spool = Spool(directory or settings.KEYAOS_LEDGER_SPOOL_DIR)
        self.task: asyncio.Task | None = None
        self.fsync_task: asyncio.Task | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-writer")
        self.unspooled: list[RequestRecord] = []
        self._in_flight: deque[tuple[Batch, asyncio.Task]] = deque()
        self._written_early: set[int] = set()  # ids of batches in flight the thread wrote
        self._claiming = False  # the writer task prepares a batch or gives batches back
        self._loop: asyncio.AbstractEventLoop | None = None
        self.written = 0  # records moved from the spool to the database (or dead letters)
        self.dead_letters = 0
        self.largest_backlog = 0
        self._wake: asyncio.Event | None = None
        self._deadline: float | None = None
        self._unavailable = False

    def start(self) -> None:
        if self.task is not None and not self.task.done():
            return
        loop = self._loop = asyncio.get_running_loop()
        self.spool.open()
        self._wake = asyncio.Event()
        self._batch_full = asyncio.Event()
        self.task = loop.create_task(self._run(), name="ledger-writer")
        if settings.KEYAOS_LEDGER_FSYNC_S > 0:
            self.fsync_task = loop.create_task(self._fsync(), name="ledger-fsync")

    def submit(self, record: RequestRecord) -> None:
        """Spool the record: called before the answer's last byte leaves."""
        try:
            self.spool.append(record.to_json(), record)
        except OSError:
            # The spool's disk failed: keep the record in memory (written, not durable) and say so.
            logger.exception("ledger: cannot spool %s; kept in memory", record.request_id)
            self.unspooled.append(record)
        pending = self.pending
        if pending > self.largest_backlog:
            self.largest_backlog = pending
        if self._wake is not None:
            self._wake.set()
            if not self._batch_full.is_set() and self.spool.unclaimed >= BATCH_FILL:
                self._batch_full.set()

    @property
    def pending(self) -> int:
        return self.spool.pending + len(self.unspooled)

    async def flush(self) -> None:
        """Wait until every record submitted so far is in the database (or a dead letter)."""
        while self.pending and self.task is not None and not self.task.done():
            await asyncio.sleep(0.005)

    def abandon(self) -> None:
        """Let go of the spool without writing (the event loop it ran in is gone): the files stay
        and the next writer takes them over."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
        for _, task in self._in_flight:
            task.cancel()
        self.spool.close()

    async def stop(self, timeout_s: float | None = None) -> None:
        """Write what the spool holds for up to ``timeout_s`` (``KEYAOS_LEDGER_SHUTDOWN_S``);
        leave the rest in it for the next start."""
        if timeout_s is None:
            timeout_s = settings.KEYAOS_LEDGER_SHUTDOWN_S
        loop = asyncio.get_running_loop()
        written_before = self.written
        self._deadline = loop.time() + timeout_s
        if self._wake is not None:
            self._wake.set()
        if self.fsync_task is not None:
            self.fsync_task.cancel()
        if self.task is not None and not self.task.done():
            # A batch already in the database's hands may finish after the deadline.
            done, _ = await asyncio.wait({self.task}, timeout=timeout_s + 5)
            if not done:
                self.task.cancel()
        await asyncio.to_thread(self.spool.fsync)
        waiting, lost = self.spool.pending, len(self.unspooled)
        self.spool.close()
        message = "ledger: %d records written at shutdown, %d wait in the spool %s"
        log = logger.warning if waiting else logger.info
        log(message, self.written - written_before, waiting, self.spool.directory)
        if lost:
            logger.error("ledger: %d records that could not be spooled are lost", lost)
        self.executor.submit(_close_connection)
        self.executor.shutdown(wait=False)

    # --- the writer task ------------------------------------------------------------------------

    def _stopping_late(self) -> bool:
        return self._deadline is not None and asyncio.get_running_loop().time() >= self._deadline

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        await self._adopt_orphans()
        last_scan = loop.time()
        try:
            while not self._stopping_late():
                if not self.pending:
                    if self._deadline is not None:
                        return
                    await self._wait_for_work(ORPHAN_SCAN_S)
                if loop.time() - last_scan >= ORPHAN_SCAN_S:
                    await self._adopt_orphans()
                    last_scan = loop.time()
                try:
                    await self._write_next()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    logger.exception("ledger: the writer failed; retrying")
                    await self._settle_in_flight()
                    await asyncio.sleep(1)
        finally:
            await self._settle_in_flight()

    async def _wait_for_work(self, timeout_s: float) -> None:
        """Until a record is submitted or a batch in flight is written."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout_s)

    async def _adopt_orphans(self) -> None:
        adopted, torn = await asyncio.get_running_loop().run_in_executor(
            self.executor, self.spool.adopt_orphans
        )
        if torn:
            refused = [
                Refused(raw.decode(errors="replace"), "incomplete record: its process died")
                for raw in torn
            ]
            await self._add_dead_letters(refused)
        self.spool.add_adopted(adopted)
        count = sum(len(spool_file.records) for spool_file in adopted)
        if count:
            logger.warning(
                "ledger: replaying %d spooled records of %d stopped process(es)",
                count,
                len(adopted),
            )
            self._wake.set()

    async def _write_next(self) -> None:
        """Start the next batch, or wait for room for it. Up to ``BATCHES_IN_FLIGHT`` batches are
        handed to the writer's thread at once, so it starts the next as soon as it has written
        one: under load a turn of the event loop takes many milliseconds, and a batch written
        only after the last one's result came back through the loop waited several turns."""
        if self._in_flight and self._in_flight[0][1].done():
            self._in_flight[0][1].result()  # it failed (one written is committed at once): why
        if self.unspooled:
            await self._settle_in_flight()
            records = self.unspooled[:BATCH_SIZE]
            await self._write_with_retries([prepare(record) for record in records], [])
            del self.unspooled[: len(records)]
            self.written += len(records)
            return
        if len(self._in_flight) >= BATCHES_IN_FLIGHT:
            await asyncio.wait({self._in_flight[0][1]})
            return
        if not self.spool.unclaimed:
            if self._in_flight:
                await self._wait_for_work(ORPHAN_SCAN_S)
            return
        age = self.spool.unclaimed_age_s() or 0.0
        if age < BATCH_WINDOW_S and self._deadline is None and self.spool.unclaimed < BATCH_FILL:
            self._batch_full.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._batch_full.wait(), BATCH_WINDOW_S - age)
        batch = self.spool.next_batch(BATCH_SIZE)
        if batch is None:
            return
        self._claiming = True
        try:
            entries, refused = await self._prepare(batch)
        except BaseException:
            self.spool.release(batch)
            raise
        finally:
            self._claiming = False
        self._hand_over(batch, entries, refused)

    def _hand_over(self, batch: Batch, entries: list[Entry], refused: list[Refused]) -> None:
        task = asyncio.ensure_future(self._write_with_retries(entries, refused, batch))
        self._in_flight.append((batch, task))
        task.add_done_callback(self._commit_written)

    def _start_held_batch(self) -> None:
        """Behind (a full batch waits) and the writer's thread free: hand the next batch over
        from this callback, without waiting for the writer task's next turn of the loop. Only
        records this process spooled itself (prepared from memory, a few ms at most)."""
        # While the writer task prepares a batch it claimed (or gives batches back), a batch
        # claimed here would be handed over before an older one of the same file.
        if self._claiming or self.unspooled or self._unavailable or self._deadline is not None:
            return
        if len(self._in_flight) >= BATCHES_IN_FLIGHT or self.spool.unclaimed < BATCH_FILL:
            return
        batch = self.spool.next_batch(BATCH_SIZE)
        if batch is None:
            return
        if batch.held is None:
            self.spool.release(batch)  # the writer task reads it back, in slices
            return
        prepared = [prepare_held(record) for record in batch.held]
        entries = [item for item in prepared if isinstance(item, Entry)]
        self._hand_over(batch, entries, [item for item in prepared if isinstance(item, Refused)])

    def _thread_wrote(self, batch: Batch, written: Future) -> None:
        """On the writer's thread: the batch is in the database with nothing refused."""
        if not written.cancelled() and written.exception() is None and not written.result()[1]:
            self._loop.call_soon_threadsafe(self._commit_early, batch)

    def _commit_early(self, batch: Batch) -> None:
        self._written_early.add(id(batch))
        self._commit_written()

    def _commit_written(self, _task: asyncio.Task | None = None) -> None:
        """Move the spool's committed offsets past the batches written, in the order they were
        taken: a batch written after one that failed waits (it is written again later, which
        is harmless), so an offset never passes a record that is not in the database."""
        while self._in_flight:
            batch, task = self._in_flight[0]
            if id(batch) not in self._written_early:
                if not task.done():
                    break
                if task.cancelled() or task.exception() is not None:
                    return  # _settle_in_flight gives the batches back
            self._in_flight.popleft()
            self._written_early.discard(id(batch))
            self.spool.commit(batch)
            self.written += batch.count
        self._start_held_batch()
        if self._wake is not None:
            self._wake.set()

    async def _settle_in_flight(self) -> None:
        """Wait for the batches in flight; those not committed go back to the spool."""
        self._claiming = True
        try:
            tasks = [task for _, task in self._in_flight]
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._claiming = False
        for batch, _ in self._in_flight:
            self.spool.release(batch)
        self._in_flight.clear()
        self._written_early.clear()

    async def _prepare(self, batch: Batch) -> tuple[list[Entry], list[Refused]]:
        """Prepare on the loop, giving it back after every ``PREPARE_SLICE`` records. Not more
        often: under load one turn of the loop is many milliseconds, and a writer that yields
        after each millisecond of work would fall behind by a turn each time."""
        entries: list[Entry] = []
        refused: list[Refused] = []
        held = batch.held is not None
        for number, item in enumerate(batch.held if held else self.spool.read(batch), start=1):
            prepared = prepare_held(item) if held else prepare_line(item)
            (refused if isinstance(prepared, Refused) else entries).append(prepared)
            if number % PREPARE_SLICE == 0:
                await asyncio.sleep(0)
        return entries, refused

    async def _write_with_retries(
        self, entries: list[Entry], refused: list[Refused], batch: Batch | None = None
    ) -> None:
        """Write ``entries`` on the writer's thread until the database takes them. A ``batch``
        with nothing refused is committed from the thread's result at once: the result of an
        awaited call reaches the coroutine two turns of the loop later, and under load a turn
        takes a few milliseconds per request in flight."""
        backoff = 0.2
        while True:
            try:
                written = self.executor.submit(write_isolating, entries)
                if batch is not None and not refused:
                    written.add_done_callback(functools.partial(self._thread_wrote, batch))
                _, more = await asyncio.wrap_future(written)
                break
            except (OperationalError, InterfaceError) as error:
                if not self._unavailable:
                    logger.error(
                        "ledger: the database is unavailable (%s); %d records wait in the "
                        "spool and are retried",
                        error,
                        self.pending,
                    )
                self._unavailable = True
                if self._stopping_late():
                    raise
                await asyncio.sleep(min(backoff, max(self._time_left(), 0.01)))
                backoff = min(backoff * 2, MAX_BACKOFF_S)
        if self._unavailable:
            logger.warning("ledger: the database is back; writing the spool")
            self._unavailable = False
        if refused or more:
            await self._add_dead_letters(refused + more)

    def _time_left(self) -> float:
        if self._deadline is None:
            return MAX_BACKOFF_S
        return self._deadline - asyncio.get_running_loop().time()

    async def _add_dead_letters(self, refused: list[Refused]) -> None:
        for item in refused:
            logger.error("ledger: record refused, kept as a dead letter: %s", item.reason)
        await asyncio.get_running_loop().run_in_executor(
            self.executor, self.spool.add_dead_letters, [item.dead_letter() for item in refused]
        )
        self.dead_letters += len(refused)

    async def _fsync(self) -> None:
        while True:
            await asyncio.sleep(settings.KEYAOS_LEDGER_FSYNC_S)
            await asyncio.to_thread(self.spool.fsync)

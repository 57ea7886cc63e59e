"""The ledger's spool: every finished request's record on local disk before its answer ends.

Each gateway process appends its records to files of its own (``<pid>-<ns>.spool``, one JSON line
per record, one ``write`` each), which it holds under an exclusive ``flock`` for its whole life.
The ledger writer moves records to the database in batches and keeps how far it got in
``<name>.committed``. A spool file whose lock nobody holds belongs to a process that died: the
next process to look takes it over (under the lock) and writes what was left. Writing a record
twice is harmless, since the request id is unique and rows already present are skipped, so a
crash between the database's commit and the offset's update costs nothing. Files rotate at
``ROTATE_BYTES`` and are deleted once everything in them is in the database. Records the
database refuses are appended to ``dead-letter.jsonl`` with the reason.

No ``fsync`` per record: a process crash loses nothing (the kernel has the bytes), a machine
crash at most what the kernel had not written out (``KEYAOS_LEDGER_FSYNC_S`` bounds that).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.conf import settings

SUFFIX = ".spool"
COMMITTED_SUFFIX = ".committed"
DEAD_LETTER_FILE = "dead-letter.jsonl"
ROTATE_BYTES = 4 * 1024 * 1024
_READ_CHUNK = 64 * 1024


@dataclass(frozen=True)
class LedgerBacklog:
    """What waits for the database on this machine, and what it refused."""

    records: int
    oldest_age_s: float | None
    dead_letters: int
    directory: str


@dataclass
class SpoolFile:
    """One spool file held under our lock, with the records after its committed offset."""

    path: Path
    fd: int
    committed: int
    own: bool
    # (end offset, spool time, the record object when this process spooled it) of every record
    # after ``committed``, oldest first.
    records: deque[tuple[int, float, Any]] = field(default_factory=deque)
    end: int = 0
    seq: int = 0
    claimed: int = 0  # records handed to the writer and not yet committed
    committed_fd: int | None = None

    def close(self) -> None:
        for fd in (self.committed_fd, self.fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.committed_fd = None

    def remove(self) -> None:
        """Delete a file whose records are all in the database (the spool file first: a
        committed offset without its file is recognisably left over)."""
        for path in (self.path, committed_path(self.path)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.close()


@dataclass(frozen=True)
class Batch:
    """Records ``[start, stop)`` of ``file``; ``count`` of them. ``held`` are the record objects
    themselves when this process spooled them all, so the writer need not read and decode them."""

    file: SpoolFile
    start: int
    stop: int
    count: int
    held: list[Any] | None = None


def committed_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(SUFFIX) + COMMITTED_SUFFIX)


def spool_directory() -> Path:
    return Path(settings.KEYAOS_LEDGER_SPOOL_DIR)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _read_committed(path: Path) -> int:
    try:
        text = committed_path(path).read_text()
    except FileNotFoundError:
        return 0
    # A torn or empty offset only means replaying more, which is harmless.
    return int(text) if text.strip().isdigit() else 0


def _pread_all(fd: int, start: int, stop: int) -> bytes:
    parts = []
    while start < stop:
        chunk = os.pread(fd, min(stop - start, 1024 * 1024), start)
        if not chunk:
            break
        parts.append(chunk)
        start += len(chunk)
    return b"".join(parts)


class Spool:
    """This process's spool files, and the dead ones it took over.

    ``append`` and the batch bookkeeping (``next_batch``, ``commit``) run on the event loop;
    ``read``, ``adopt_orphans``, ``add_dead_letters`` and ``fsync`` run in the writer's threads.
    """

    def __init__(self, directory: Path, *, rotate_bytes: int = ROTATE_BYTES) -> None:
        self.directory = Path(directory)
        self.rotate_bytes = rotate_bytes
        self.files: list[SpoolFile] = []  # taken over first, then ours, the current one last
        self.current: SpoolFile | None = None
        self._lock = threading.Lock()

    # --- writing (event loop) ------------------------------------------------------------------

    def open(self) -> None:
        if self.current is None:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.current = self._create()
            with self._lock:
                self.files.append(self.current)

    def _create(self) -> SpoolFile:
        """A new file of ours, locked before its name appears, so nobody takes it for a dead
        process's file."""
        name = f"{os.getpid()}-{time.time_ns()}{SUFFIX}"
        hidden = self.directory / f".{name}.tmp"
        fd = os.open(hidden, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = self.directory / name
        os.rename(hidden, path)
        return SpoolFile(path=path, fd=fd, committed=0, own=True)

    def append(self, record_json: str, held: Any = None) -> None:
        """One ``write`` of one line: ``{"seq": N, "at": UNIX_TIME, "record": {...}}``; ``held``
        (the record itself) stays in memory for the writer until the line is committed."""
        if self.current is None:
            self.open()
        current = self.current
        now = time.time()
        current.seq += 1
        line = f'{{"seq":{current.seq},"at":{now:.6f},"record":{record_json}}}\n'.encode()
        written = os.write(current.fd, line)
        if written != len(line):  # a full disk part-way: the line is torn, say so
            raise OSError(errno.ENOSPC, f"short write to {current.path}")
        current.end += written
        current.records.append((current.end, now, held))
        if current.end >= self.rotate_bytes:
            fresh = self._create()
            with self._lock:
                self.files.append(fresh)
                self.current = fresh

    @property
    def pending(self) -> int:
        """Records not yet in the database (claimed ones included)."""
        return sum(len(spool_file.records) for spool_file in self.files)

    def oldest_age_s(self, now: float | None = None) -> float | None:
        for spool_file in self.files:
            if spool_file.records:
                return max((now or time.time()) - spool_file.records[0][1], 0.0)
        return None

    @property
    def unclaimed(self) -> int:
        """Records not yet handed to the writer."""
        return sum(len(spool_file.records) - spool_file.claimed for spool_file in self.files)

    def unclaimed_age_s(self, now: float | None = None) -> float | None:
        """How long the oldest record not yet handed to the writer has waited."""
        for spool_file in self.files:
            if len(spool_file.records) > spool_file.claimed:
                spooled_at = spool_file.records[spool_file.claimed][1]
                return max((now or time.time()) - spooled_at, 0.0)
        return None

    def next_batch(self, limit: int) -> Batch | None:
        """The oldest records not yet claimed, from one file."""
        for spool_file in self.files:
            if len(spool_file.records) > spool_file.claimed:
                start = (
                    spool_file.records[spool_file.claimed - 1][0]
                    if spool_file.claimed
                    else spool_file.committed
                )
                count = min(limit, len(spool_file.records) - spool_file.claimed)
                stop = spool_file.records[spool_file.claimed + count - 1][0]
                held = [
                    spool_file.records[index][2]
                    for index in range(spool_file.claimed, spool_file.claimed + count)
                ]
                spool_file.claimed += count
                if None in held:
                    held = None
                return Batch(spool_file, start, stop, count, held)
        return None

    def release(self, batch: Batch) -> None:
        """Give a batch back unwritten (the writer stopped): it stays in the spool. The batches
        claimed after it in its file must be given back too (the writer gives back every batch it
        has in flight, or the one it claimed last)."""
        batch.file.claimed = max(batch.file.claimed - batch.count, 0)

    def commit(self, batch: Batch) -> None:
        """The batch is in the database: move the committed offset past it."""
        spool_file = batch.file
        for _ in range(batch.count):
            spool_file.records.popleft()
        spool_file.claimed -= batch.count
        spool_file.committed = batch.stop
        if spool_file is not self.current and not spool_file.records:
            with self._lock:
                self.files.remove(spool_file)
            spool_file.remove()
            return
        if spool_file.committed_fd is None:
            spool_file.committed_fd = os.open(
                committed_path(spool_file.path), os.O_WRONLY | os.O_CREAT, 0o600
            )
        os.pwrite(spool_file.committed_fd, b"%020d\n" % batch.stop, 0)

    def close(self) -> None:
        """Release every lock: files whose records are all written are deleted, the others are
        left for the next process to start."""
        with self._lock:
            files, self.files, self.current = self.files, [], None
        for spool_file in files:
            if spool_file.records:
                spool_file.close()
            else:
                spool_file.remove()

    # --- threads --------------------------------------------------------------------------------

    def read(self, batch: Batch) -> list[bytes]:
        return _pread_all(batch.file.fd, batch.start, batch.stop).splitlines()

    def fsync(self) -> None:
        current = self.current
        if current is not None:
            with contextlib.suppress(OSError):
                os.fsync(current.fd)

    def adopt_orphans(self) -> tuple[list[SpoolFile], list[bytes]]:
        """Lock and take over the files of dead processes; returns them with the torn last line
        of each (a process killed in the middle of a write), which belongs in the dead letters.

        The caller hands the files to ``add_adopted`` on the event loop.
        """
        adopted, torn = [], []
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return adopted, torn
        ours = {spool_file.path.name for spool_file in list(self.files)}
        for name in sorted(names):
            path = self.directory / name
            if name.endswith(".tmp") and name.startswith("."):
                self._remove_if_unlocked(path)
            elif name.endswith(COMMITTED_SUFFIX):
                if not (self.directory / (name.removesuffix(COMMITTED_SUFFIX) + SUFFIX)).exists():
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
            elif name.endswith(SUFFIX) and name not in ours:
                found = self._adopt(path)
                if found is not None:
                    adopted.append(found[0])
                    if found[1]:
                        torn.append(found[1])
        return adopted, torn

    def add_adopted(self, adopted: list[SpoolFile]) -> None:
        with self._lock:
            self.files[:0] = [spool_file for spool_file in adopted if spool_file.records]
        for spool_file in adopted:
            if not spool_file.records:
                spool_file.remove()

    def _remove_if_unlocked(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            if _try_lock(fd):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        finally:
            os.close(fd)

    def _adopt(self, path: Path) -> tuple[SpoolFile, bytes] | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            # Locked, and still the file of that name (its owner may have just deleted it).
            if not _try_lock(fd) or os.fstat(fd).st_ino != os.stat(path).st_ino:
                os.close(fd)
                return None
        except FileNotFoundError:
            os.close(fd)
            return None
        committed = _read_committed(path)
        size = os.fstat(fd).st_size
        if committed > size:
            committed = 0
        data = _pread_all(fd, committed, size)
        complete = data.rfind(b"\n") + 1
        spool_file = SpoolFile(path=path, fd=fd, committed=committed, own=False)
        position = 0
        first_at = time.time()
        if complete:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                first_at = float(json.loads(data[: data.index(b"\n")])["at"])
        while position < complete:
            position = data.index(b"\n", position) + 1
            spool_file.records.append((committed + position, first_at, None))
        spool_file.end = committed + complete
        return spool_file, data[complete:]

    def add_dead_letters(self, entries: list[dict]) -> None:
        """Append refused records with their reasons: one line each, one ``write`` per batch."""
        if not entries:
            return
        at = datetime.now(UTC).isoformat(timespec="milliseconds")
        lines = "".join(json.dumps({"at": at, **entry}) + "\n" for entry in entries)
        fd = os.open(
            self.directory / DEAD_LETTER_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600
        )
        try:
            os.write(fd, lines.encode())
            os.fsync(fd)
        finally:
            os.close(fd)


# --- what the operator sees --------------------------------------------------------------------

_dead_letter_counts: dict[Path, tuple[int, int, int]] = {}  # path -> (size, mtime_ns, lines)


def ledger_backlog(directory: Path | None = None) -> LedgerBacklog:
    """The records every process on this machine has spooled and not yet written, the age of the
    oldest, and the dead letters. Reads the files only (no database), from any process."""
    directory = Path(directory or spool_directory())
    records, oldest = 0, None
    now = time.time()
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        names = []
    for name in names:
        if not name.endswith(SUFFIX):
            continue
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError, OSError):
            count, at = _waiting_in(directory / name)
            records += count
            if at is not None:
                oldest = at if oldest is None else min(oldest, at)
    return LedgerBacklog(
        records=records,
        oldest_age_s=None if oldest is None else round(max(now - oldest, 0.0), 3),
        dead_letters=_count_dead_letters(directory / DEAD_LETTER_FILE),
        directory=str(directory),
    )


def _waiting_in(path: Path) -> tuple[int, float | None]:
    """Records after the committed offset: the last complete line's sequence number minus the
    first one's, so only the two ends of the file are read."""
    committed = _read_committed(path)
    with open(path, "rb") as spool_file:
        size = os.fstat(spool_file.fileno()).st_size
        if size <= committed:
            return 0, None
        spool_file.seek(committed)
        first = spool_file.readline()
        if not first.endswith(b"\n"):
            return 0, None
        tail_start = max(committed, size - _READ_CHUNK)
        spool_file.seek(tail_start)
        tail = spool_file.read(size - tail_start)
    tail = tail[: tail.rfind(b"\n")]
    last = tail[tail.rfind(b"\n") + 1 :]
    if len(last) >= _READ_CHUNK - 1:  # a record longer than the tail read: count the lines
        return _count_lines(path, committed, size), float(json.loads(first)["at"])
    head = json.loads(first)
    return int(json.loads(last)["seq"]) - int(head["seq"]) + 1, float(head["at"])


def _count_lines(path: Path, start: int, stop: int) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _pread_all(fd, start, stop).count(b"\n")
    finally:
        os.close(fd)


def _count_dead_letters(path: Path) -> int:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return 0
    cached = _dead_letter_counts.get(path)
    if cached and cached[:2] == (stat.st_size, stat.st_mtime_ns):
        return cached[2]
    with open(path, "rb") as dead_letters:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: dead_letters.read(1 << 20), b""))
    _dead_letter_counts[path] = (stat.st_size, stat.st_mtime_ns, lines)
    return lines

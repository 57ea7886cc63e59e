"""``manage.py serve`` as a real process tree, sharing the test database with the test process.

The test seeds rows with the factories (under ``transactional_db``, so they are committed) and
starts ``serve``; its workers read the same database (SQLite file or PostgreSQL test database)
and reach the in-process fake upstream over 127.0.0.1. The helpers at the end serve every test
that runs several processes: waiting for a condition, killing a session, finding the shared Redis.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import httpx
from django.db import connection

from keyaos.management.commands.serve import MULTIPROCESS_DIR_VARIABLE
from tests.fake_upstream import free_port

BASE_DIR = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60


def manage_process(args: list[str], env: dict[str, str], output=subprocess.DEVNULL):
    """``manage.py ARGS`` in a session of its own (``session_processes`` finds its tree), its
    output to ``output``."""
    return subprocess.Popen(
        [sys.executable, "manage.py", *args],
        cwd=BASE_DIR,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def database_url() -> str:
    """A ``DATABASE_URL`` naming the database this test process uses (its test database)."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}?timeout=20&transaction_mode=IMMEDIATE"
    auth = quote(db["USER"] or "")
    if db.get("PASSWORD"):
        auth += ":" + quote(db["PASSWORD"])
    host = db["HOST"] or "127.0.0.1"
    return f"postgres://{auth}@{host}:{db['PORT'] or 5432}/{db['NAME']}"


class Served:
    """One ``manage.py serve`` in its own session; ``stop()`` or the fixture ends it."""

    def __init__(self, log_path: Path, *args: str, **environ: str) -> None:
        self.port = free_port()
        self.log_path = log_path
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("PROMETHEUS_MULTIPROC_DIR", "DJANGO_SETTINGS_MODULE", "REDIS_URL")
        }
        env |= {
            "DJANGO_SETTINGS_MODULE": "keyaos.settings",
            "DATABASE_URL": database_url(),
            "KEYAOS_STATE_DIR": str(log_path.parent),
            # Each instance has a spool of its own, as each machine would.
            "KEYAOS_LEDGER_SPOOL_DIR": str(log_path.with_suffix(".spool")),
            "KEYAOS_SNAPSHOT_POLL_S": "0.2",
            "KEYAOS_IDENTITY_SOURCE_URL": "",
            "PYTHONUNBUFFERED": "1",
            **environ,
        }
        with log_path.open("wb") as log:
            self.process = manage_process(["serve", "--port", str(self.port), *args], env, log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"serve did not become ready:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL every process of the session: serve, uvicorn, its workers, the cluster."""
        kill_session(self.process)


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILL every process of the session ``process`` leads (``manage_process`` starts one),
    reap ``process``, and remove the metrics directory a killed ``serve`` cannot remove."""
    pids = session_processes(process.pid)
    directories = {directory for pid in pids if (directory := _serve_metrics_directory(pid))}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=10)
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


def _serve_metrics_directory(pid: int) -> str | None:
    """The temporary ``PROMETHEUS_MULTIPROC_DIR`` that ``serve`` made for process ``pid``."""
    try:
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    prefix = f"{MULTIPROCESS_DIR_VARIABLE}=".encode()
    for entry in environment:
        if entry.startswith(prefix):
            directory = entry.removeprefix(prefix).decode()
            return directory if Path(directory).name.startswith("keyaos-metrics-") else None
    return None


def session_processes(session_id: int) -> list[int]:
    """The live processes of a session (started with ``start_new_session=True``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        state, session = fields[0], int(fields[3])
        if session == session_id and state != "Z":
            pids.append(int(entry.name))
    return pids


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` have passed; whether it held."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def redis_answers() -> bool:
    """Whether a Redis server answers on 127.0.0.1:6379, the one processes can share."""
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=0.5).close()
        return True
    except OSError:
        return False

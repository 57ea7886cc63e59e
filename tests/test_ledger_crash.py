"""The ledger survives the gateway's process being killed, stopped mid-backlog, or losing its
database: real gateway processes (uvicorn as ``manage.py serve`` runs it, or ``serve`` itself),
each with its own state folder and database, the bench's fake upstream, load from httpx.

After each scenario every request answered before the trouble has exactly one ledger row, no row
is duplicated, and the upstream key's balance went down by exactly the sum of the rows' costs
(Decimal strings from ``bench.ledger_check``), the client key's spend by their cost in USD.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from bench.run import (
    BASE_DIR,
    MODEL,
    Bench,
    Placement,
    cleanup,
    free_port,
    parse_args,
    run_module,
    seed,
    start_gateway,
    start_upstream,
)
from billing.spool import ledger_backlog

pytestmark = pytest.mark.slow
BALANCE = "1000"
POISON = ["gpt\x00nul", "gpt-\ud800-surrogate"]


def deployment(state_dir: Path, **environ: str) -> Bench:
    """A gateway's surroundings: its state folder (and spool), the fake upstream, seeded data."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("KEYAOS_", "DATABASE_URL", "DJANGO_", "SECRET_KEY", "REDIS_URL"))
    }
    env |= {
        "DJANGO_SETTINGS_MODULE": "keyaos.settings",
        "KEYAOS_STATE_DIR": str(state_dir),
        "KEYAOS_LEDGER_SPOOL_DIR": str(state_dir / "spool"),
        "PYTHONUNBUFFERED": "1",
        **environ,
    }
    args = parse_args(["--gap-ms", "1", "--chunks", "5"])
    bench = Bench(args, Placement(None, None), state_dir, env, database="sqlite")
    bench.ids_file = state_dir / "answered.txt"
    start_upstream(bench)
    seed(bench, balance=BALANCE)
    return bench


@pytest.fixture(scope="module")
def seeded():
    """Migrated and seeded once; each test gets a copy of the state folder (SQLite file and
    generated keys) and shares the fake upstream."""
    made = deployment(Path(tempfile.mkdtemp(prefix="keyaos-crash-seed-")))
    yield made
    cleanup(made)


@pytest.fixture
def bench(seeded):
    state_dir = Path(tempfile.mkdtemp(prefix="keyaos-crash-"))
    shutil.copytree(seeded.state_dir, state_dir, dirs_exist_ok=True, ignore=lambda *_: ["spool"])
    env = {
        **seeded.env,
        "KEYAOS_STATE_DIR": str(state_dir),
        "KEYAOS_LEDGER_SPOOL_DIR": str(state_dir / "spool"),
    }
    copy = Bench(seeded.args, seeded.placement, state_dir, env, database="sqlite")
    copy.ids_file, copy.api_key = state_dir / "answered.txt", seeded.api_key
    copy.upstream_port = seeded.upstream_port
    yield copy
    cleanup(copy)


def spool(bench: Bench) -> Path:
    return Path(bench.env["KEYAOS_LEDGER_SPOOL_DIR"])


class Load:
    """Clients sending chat requests (every other one streamed) until told to stop; keeps the
    request id of every complete answer, and of every poisoned request's answer."""

    def __init__(self, bench: Bench, *, clients: int = 12, poison_per_s: float = 0) -> None:
        self.bench, self.clients, self.poison_per_s = bench, clients, poison_per_s
        self.answered: list[str] = []
        self.poisoned: list[str] = []
        self.failed = 0
        self.stopped = asyncio.Event()

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.clients + 50)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            workers = [self._client(client, number) for number in range(self.clients)]
            if self.poison_per_s:
                workers.append(self._poison(client))
            await asyncio.gather(*workers)

    def stop(self) -> None:
        self.stopped.set()

    async def _client(self, client: httpx.AsyncClient, number: int) -> None:
        stream = number % 2 == 1
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        while not self.stopped.is_set():
            try:
                async with client.stream(
                    "POST", self.bench.gateway_chat_url, json=body, headers=self._headers()
                ) as response:
                    content = await response.aread()
                if response.status_code == 200 and (not stream or b"[DONE]" in content):
                    self.answered.append(response.headers["x-request-id"])
                else:
                    self.failed += 1
            except httpx.HTTPError:
                self.failed += 1
                await asyncio.sleep(0.05)

    async def _poison(self, client: httpx.AsyncClient) -> None:
        """``poison_per_s`` requests a second, each sent without waiting for the one before."""
        sent = []
        while not self.stopped.is_set():
            model = POISON[len(sent) % len(POISON)]
            sent.append(asyncio.create_task(self._poisoned(client, model)))
            await asyncio.sleep(1 / self.poison_per_s)
        await asyncio.gather(*sent)

    async def _poisoned(self, client: httpx.AsyncClient, model: str) -> None:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "x"}]})
        try:
            response = await client.post(
                self.bench.gateway_chat_url,
                content=body.encode(),
                headers={**self._headers(), "Content-Type": "application/json"},
            )
        except httpx.HTTPError:
            return
        if response.status_code == 404:
            self.poisoned.append(response.headers["x-request-id"])

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.bench.api_key}"}


async def load_while(load: Load, scenario) -> None:
    """Run ``load`` and, beside it, ``scenario()``; stop the load when the scenario ends."""
    task = asyncio.create_task(load.run())
    try:
        await scenario()
    finally:
        load.stop()
        await asyncio.wait_for(task, 60)


class DatabaseLock:
    """Holds SQLite's write lock, as a long transaction elsewhere would: the writer waits and the
    records pile up in the spool."""

    def __init__(self, bench: Bench) -> None:
        self.connection = sqlite3.connect(bench.state_dir / "keyaos.sqlite3", isolation_level=None)
        self.connection.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.connection.execute("ROLLBACK")
        self.connection.close()


def wait_for_empty_spool(bench: Bench, timeout_s: float = 60) -> float:
    started = time.monotonic()
    while ledger_backlog(spool(bench)).records:
        assert time.monotonic() - started < timeout_s, ledger_backlog(spool(bench))
        time.sleep(0.02)
    return time.monotonic() - started


def restart(bench: Bench) -> None:
    log = bench.gateway_log
    if log is not None and log.exists():
        log.rename(log.with_name(f"{log.stem}-{time.monotonic_ns()}.log"))
    start_gateway(bench)


def stop(bench: Bench, signum: int = signal.SIGINT) -> int:
    bench.gateway.send_signal(signum)
    return bench.gateway.wait(60)


def gateway_logs(bench: Bench) -> str:
    return "".join(path.read_text() for path in sorted(bench.state_dir.glob("gateway*.log")))


def check_ledger(bench: Bench, answered: list[str]) -> dict:
    bench.ids_file.write_text("".join(f"{request_id}\n" for request_id in answered))
    result = run_module(bench, "bench.ledger_check", "--ids", str(bench.ids_file), "--sent", "0")
    assert "error" not in result, result
    return result


def assert_exact(result: dict) -> None:
    assert result["answered_ids"] > 0
    assert result["answered_without_row"] == 0
    assert result["duplicate_rows"] == 0
    for key, cost in result["cost_by_upstream_key"].items():
        spent = Decimal(BALANCE) - Decimal(result["balance_by_upstream_key"][key])
        assert spent == Decimal(cost) > 0
    for key, cost in result["cost_usd_by_client_key"].items():
        assert Decimal(result["spent_usd_by_client_key"][key]) == Decimal(cost) > 0


def test_a_killed_worker_loses_no_answered_request(bench):
    """SIGKILL with records waiting for the database; the next start writes them once."""
    start_gateway(bench)
    load = Load(bench)

    async def kill_with_a_backlog():
        await asyncio.sleep(0.8)
        lock = DatabaseLock(bench)
        await asyncio.sleep(1.5)
        bench.gateway.kill()
        bench.gateway.wait(10)
        lock.release()

    asyncio.run(load_while(load, kill_with_a_backlog))
    waiting = ledger_backlog(spool(bench)).records
    assert waiting > 20, "the kill left no backlog to replay"

    restart(bench)
    wait_for_empty_spool(bench)
    assert stop(bench) in (0, -signal.SIGINT, 128 + signal.SIGINT)

    assert "replaying" in gateway_logs(bench)
    assert_exact(check_ledger(bench, load.answered))


def test_a_clean_stop_during_a_large_backlog_says_what_waits_and_the_next_start_writes_it(bench):
    """``manage.py serve`` gets SIGTERM while the database is still locked: the writer gets
    0.3 s to write, the log says how many records were written and how many wait; nothing is
    lost."""
    bench.env |= {"KEYAOS_LEDGER_SHUTDOWN_S": "0.3", "KEYAOS_DRAIN_NOTICE_S": "0"}
    port = free_port()
    bench.gateway_port = port
    log = bench.state_dir / "gateway-serve.log"
    with open(log, "wb") as output:
        serve = subprocess.Popen(
            [sys.executable, "manage.py", "serve", "--no-qcluster", "--port", str(port)],
            cwd=BASE_DIR,
            env=bench.env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        stop_serve_during_a_backlog(bench, serve, log)
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)  # serve stops its uvicorn
            serve.wait(60)


def stop_serve_during_a_backlog(bench: Bench, serve: subprocess.Popen, log: Path) -> None:
    wait_until_serving(bench)
    load = Load(bench)
    lock: list[DatabaseLock] = []

    async def stop_during_backlog():
        lock.append(DatabaseLock(bench))
        await asyncio.sleep(2.5)

    asyncio.run(load_while(load, stop_during_backlog))
    before = ledger_backlog(spool(bench)).records
    assert before > 20
    serve.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    lock[0].release()
    assert serve.wait(60) == 0

    found = re.search(r"ledger: (\d+) records written at shutdown, (\d+) wait", log.read_text())
    assert found, log.read_text()[-3000:]
    written, waiting = int(found[1]), int(found[2])
    assert waiting == ledger_backlog(spool(bench)).records
    assert written + waiting == before

    bench.env.pop("KEYAOS_LEDGER_SHUTDOWN_S")
    bench.env.pop("KEYAOS_DRAIN_NOTICE_S")
    restart(bench)
    wait_for_empty_spool(bench)
    stop(bench)
    assert_exact(check_ledger(bench, load.answered))


def wait_until_serving(bench: Bench, timeout_s: float = 30) -> None:
    started = time.monotonic()
    url = f"http://127.0.0.1:{bench.gateway_port}/v1/models"
    while time.monotonic() - started < timeout_s:
        try:
            if httpx.get(url, headers={"Authorization": f"Bearer {bench.api_key}"}).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError("the gateway did not start")


def test_poisoned_records_do_not_slow_the_others_and_each_one_is_kept(bench):
    """Model names with a NUL byte or a lone surrogate at 20/s beside normal load. Each phase
    piles up a backlog behind a locked database; the backlog with poison drains within twice the
    time of the one without (plus 0.5 s for a shared machine's noise)."""
    start_gateway(bench)
    drains = []
    loads = []
    for poison_per_s in (0, 20):
        load = Load(bench, poison_per_s=poison_per_s)
        lock: list[DatabaseLock] = []

        async def pile_up():
            lock.append(DatabaseLock(bench))  # noqa: B023
            await asyncio.sleep(1.5)

        asyncio.run(load_while(load, pile_up))
        assert ledger_backlog(spool(bench)).records > 20
        lock[0].release()
        drains.append(wait_for_empty_spool(bench))
        loads.append(load)
    stop(bench)

    baseline, poisoned = drains
    assert poisoned <= 2 * baseline + 0.5, drains
    assert len(loads[1].poisoned) >= 5  # of about 30 sent; a loaded machine answers fewer in time
    rows = dict(
        sqlite3.connect(bench.state_dir / "keyaos.sqlite3").execute(
            "SELECT request_id, requested_model FROM billing_ledgerentry"
        )
    )
    dead = spool(bench) / "dead-letter.jsonl"
    letters = {
        json.loads(line)["record"]["request_id"]
        for line in (dead.read_text().splitlines() if dead.exists() else [])
    }
    for request_id in loads[1].poisoned:
        assert request_id in rows or request_id in letters
        if request_id in rows:
            assert "\x00" not in rows[request_id] and "\ufffd" in rows[request_id]
    assert_exact(check_ledger(bench, loads[0].answered + loads[1].answered))


def postgres_binaries() -> Path | None:
    for version in sorted(Path("/usr/lib/postgresql").glob("*"), reverse=True):
        if (version / "bin" / "initdb").exists():
            return version / "bin"
    return None


class OwnPostgres:
    """A PostgreSQL cluster of this test's own, on its own port, that it may stop and start."""

    def __init__(self, root: Path) -> None:
        self.bin = postgres_binaries()
        self.data, self.port = root / "pgdata", free_port()
        root.mkdir(exist_ok=True)
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(root, "postgres")
        self._run("initdb", "-D", str(self.data), "--auth=trust", "-U", "postgres", "-E", "UTF8")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.as_user, str(self.bin / tool), *args],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-w", "-o", options, "-l", "/dev/null", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-m", "fast", "stop")

    def url(self, database: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"


@pytest.fixture
def postgres(tmp_path):
    if postgres_binaries() is None or (os.geteuid() == 0 and not shutil.which("runuser")):
        pytest.skip("needs PostgreSQL's initdb and pg_ctl (and runuser when run as root)")
    root = Path(tempfile.mkdtemp(prefix="keyaos-pg-"))
    server = OwnPostgres(root)
    yield server
    with contextlib.suppress(subprocess.CalledProcessError):
        server.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_requests_are_served_while_postgresql_is_down_and_their_rows_arrive_after(postgres):
    import psycopg
    from cryptography.fernet import Fernet

    with psycopg.connect(postgres.url("postgres"), autocommit=True) as connection:
        connection.execute("CREATE DATABASE keyaos")
    state_dir = Path(tempfile.mkdtemp(prefix="keyaos-crash-pg-"))
    bench = deployment(
        state_dir,
        DATABASE_URL=postgres.url("keyaos"),
        SECRET_KEY="crash-test-" + "k" * 40,
        KEYAOS_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
    )
    try:
        start_gateway(bench)
        load = Load(bench, clients=6)
        served_while_down: list[int] = []

        async def outage():
            await asyncio.sleep(1.0)
            await asyncio.to_thread(postgres.stop)
            answered_at_stop = len(load.answered)
            await asyncio.sleep(10)
            served_while_down.append(len(load.answered) - answered_at_stop)
            await asyncio.to_thread(postgres.start)
            await asyncio.sleep(1.0)

        asyncio.run(load_while(load, outage))
        assert served_while_down[0] > 50
        wait_for_empty_spool(bench, timeout_s=60)
        stop(bench)

        assert "the database is unavailable" in gateway_logs(bench)
        assert_exact(check_ledger(bench, load.answered))
    finally:
        cleanup(bench)

"""Serve Keyaos: uvicorn (the admin and the ``/v1`` API) and the django-q2 cluster, together.

One Ctrl-C or SIGTERM stops both. If either stops on its own, the other is stopped too and the
command exits non-zero, so a process manager (or the operator) sees the failure.
Each child runs in its own process group: a terminal Ctrl-C reaches only this command, which then
sends each child exactly one signal (a second one would make uvicorn skip its graceful shutdown).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

# After uvicorn's drain: the lifespan shutdown (the ledger's flush) and the cluster's own stop.
SHUTDOWN_MARGIN_S = 30
QCLUSTER_STOP_S = 15
POLL_S = 0.2
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
# uvicorn's own loggers (its supervisor too, which never loads Django) in KEYAOS_LOG_FORMAT=json.
JSON_LOG_CONFIG = Path(__file__).resolve().parents[2] / "lib" / "uvicorn_json_logging.json"
logger = logging.getLogger("keyaos.serve")  # prometheus_client's multiprocess mode
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# uvicorn re-raises the signal it caught once it has shut down; that is a clean stop too.
CLEAN_EXIT_CODES = {0, *(-sig for sig in STOP_SIGNALS), *(128 + sig for sig in STOP_SIGNALS)}


def uvicorn_command(
    *,
    host: str,
    port: int,
    workers: int,
    drain_s: float,
    json_logs: bool = False,
    forwarded_allow_ips: str = "",
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "keyaos.asgi:application",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        *proxy_header_options(forwarded_allow_ips),
        "--timeout-graceful-shutdown",
        str(math.ceil(drain_s)),
        "--lifespan",
        "on",
        "--no-server-header",
        *(["--log-config", str(JSON_LOG_CONFIG)] if json_logs else []),
    ]


def say(message: str, *, error: bool = False) -> None:
    """A line for the operator: plain text, or a log record (one JSON object) in JSON mode."""
    if settings.KEYAOS_LOG_FORMAT == "json":
        logger.log(logging.ERROR if error else logging.INFO, message)
        return
    stream = sys.stderr if error else sys.stdout
    stream.write(message + "\n")
    stream.flush()


def stop_timeout_s(name: str) -> float:
    """How long a child may take to stop. uvicorn: the drain notice, the drain of requests in
    flight, then the shutdown work; the cluster stops on its own (a refresh gives up)."""
    if name == "uvicorn":
        return settings.KEYAOS_DRAIN_NOTICE_S + settings.KEYAOS_DRAIN_S + SHUTDOWN_MARGIN_S
    return QCLUSTER_STOP_S


@contextlib.contextmanager
def metrics_directory() -> Iterator[dict[str, str]]:
    """The environment of the children: one prometheus_client multiprocess directory for all.

    An operator's ``PROMETHEUS_MULTIPROC_DIR`` is used (emptied of the last run's files);
    otherwise a temporary one lives as long as this command.
    """
    given = os.environ.get(MULTIPROCESS_DIR_VARIABLE)
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        for stale in Path(given).glob("*.db"):
            stale.unlink()
        yield {**os.environ}
        return
    directory = tempfile.mkdtemp(prefix="keyaos-metrics-")
    try:
        yield {**os.environ, MULTIPROCESS_DIR_VARIABLE: directory}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def proxy_header_options(forwarded_allow_ips: str) -> list[str]:
    """Trust ``X-Forwarded-For``/``-Proto`` only from the proxies the operator named.

    uvicorn's own default trusts 127.0.0.1, so any local process could claim any client address
    (and pass a key's IP allowlist); without ``FORWARDED_ALLOW_IPS`` no one is trusted.
    """
    if not forwarded_allow_ips:
        return ["--no-proxy-headers"]
    return ["--proxy-headers", "--forwarded-allow-ips", forwarded_allow_ips]


def qcluster_command() -> list[str]:
    return [sys.executable, str(settings.BASE_DIR / "manage.py"), "qcluster"]


def base_url(host: str, port: int) -> str:
    """The URL to open in a browser: a wildcard bind address is reached through loopback."""
    shown_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in shown_host:
        shown_host = f"[{shown_host.strip('[]')}]"
    return f"http://{shown_host}:{port}/"


def _positive_int_from_env(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise CommandError(f"{name} must be a positive integer, not {value!r}")
    return int(value)


class Supervisor:
    """Runs named child processes and stops all of them as soon as one stops or we are asked to."""

    def __init__(
        self, commands: dict[str, list[str]], *, env: dict[str, str] | None = None
    ) -> None:
        self.commands = commands
        self.env = env
        self.processes: dict[str, subprocess.Popen] = {}
        self.stop_signal: int | None = None

    def request_stop(self, signum: int, frame: object = None) -> None:
        if self.stop_signal is not None:
            self.kill_all()
        self.stop_signal = signum

    def run(self) -> int:
        try:
            for name, command in self.commands.items():
                if self.stop_signal is None:
                    self.processes[name] = subprocess.Popen(
                        command, stdin=subprocess.DEVNULL, process_group=0, env=self.env
                    )
            first_exit = self._wait_for_first_exit()
            clean = self._stop_all()
        finally:
            self.kill_all()
        if first_exit is not None:
            name, code = first_exit
            say(f"{name} exited with code {code}; stopped the rest.", error=True)
            return code if code > 0 else 1
        return 0 if clean else 1

    def _wait_for_first_exit(self) -> tuple[str, int] | None:
        while self.stop_signal is None:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    return name, process.returncode
            time.sleep(POLL_S)
        return None

    def _stop_all(self) -> bool:
        forwarded = self.stop_signal or signal.SIGTERM
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(forwarded)
        started = time.monotonic()
        for name, process in self.processes.items():
            timeout_s = stop_timeout_s(name)
            try:
                process.wait(timeout=max(started + timeout_s - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                say(f"{name} did not stop within {timeout_s:.0f} s; killed it.", error=True)
                return False
        return all(process.returncode in CLEAN_EXIT_CODES for process in self.processes.values())

    def kill_all(self) -> None:
        """SIGKILL every process group we started, including grandchildren left behind."""
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.poll()


class Command(BaseCommand):
    help = (
        "Serve the admin and the /v1 API with uvicorn on HOST:PORT (WEB_CONCURRENCY workers) "
        "together with the django-q2 cluster; Ctrl-C stops both."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--host", default=os.environ.get("HOST") or "127.0.0.1")
        parser.add_argument("--port", type=int, default=None, help="default: $PORT or 8000")
        parser.add_argument(
            "--workers", type=int, default=None, help="default: $WEB_CONCURRENCY or 1"
        )
        parser.add_argument(
            "--no-qcluster",
            action="store_true",
            help="serve HTTP only (when the cluster runs elsewhere)",
        )

    def handle(self, *args, host: str, port: int | None, workers: int | None, **options) -> None:
        port = port if port is not None else _positive_int_from_env("PORT", 8000)
        workers = workers if workers is not None else _positive_int_from_env("WEB_CONCURRENCY", 1)
        if not 0 < port < 65536 or workers < 1:
            raise CommandError("--port must be 1-65535 and --workers at least 1.")

        commands = {
            "uvicorn": uvicorn_command(
                host=host,
                port=port,
                workers=workers,
                drain_s=settings.KEYAOS_DRAIN_S,
                json_logs=settings.KEYAOS_LOG_FORMAT == "json",
                forwarded_allow_ips=settings.FORWARDED_ALLOW_IPS,
            )
        }
        if not options["no_qcluster"]:
            from providers.tasks import ensure_refresh_schedule  # models: after django.setup()

            commands["qcluster"] = qcluster_command()
            ensure_refresh_schedule()
        with metrics_directory() as env:
            supervisor = Supervisor(commands, env=env)
            for signum in STOP_SIGNALS:
                signal.signal(signum, supervisor.request_stop)
            code = self._run(supervisor, host, port, commands)
        if code:
            sys.exit(code)

    def _run(self, supervisor: Supervisor, host: str, port: int, commands: dict) -> int:

        self.check_migrations()
        url = base_url(host, port)
        say(f"Keyaos admin: {url}admin/  (OpenAI-compatible API: {url}v1)")
        say(f"Starting {' and '.join(commands)}; press Ctrl-C to stop.")
        return supervisor.run()

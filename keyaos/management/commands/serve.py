"""Serve Keyaos: uvicorn (the admin and the ``/v1`` API) and the django-q2 cluster, together.

One Ctrl-C or SIGTERM stops both. If either stops on its own, the other is stopped too and the
command exits non-zero, so a process manager (or the operator) sees the failure.
Each child runs in its own process group: a terminal Ctrl-C reaches only this command, which then
sends each child exactly one signal (a second one would make uvicorn skip its graceful shutdown).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

GRACEFUL_SHUTDOWN_S = 10
STOP_TIMEOUT_S = GRACEFUL_SHUTDOWN_S + 5
POLL_S = 0.2
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# uvicorn re-raises the signal it caught once it has shut down; that is a clean stop too.
CLEAN_EXIT_CODES = {0, *(-sig for sig in STOP_SIGNALS), *(128 + sig for sig in STOP_SIGNALS)}


def uvicorn_command(*, host: str, port: int, workers: int) -> list[str]:
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
        "--proxy-headers",
        "--timeout-graceful-shutdown",
        str(GRACEFUL_SHUTDOWN_S),
        "--lifespan",
        "on",
        "--no-server-header",
    ]


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

    def __init__(self, commands: dict[str, list[str]]) -> None:
        self.commands = commands
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
                        command, stdin=subprocess.DEVNULL, process_group=0
                    )
            first_exit = self._wait_for_first_exit()
            clean = self._stop_all()
        finally:
            self.kill_all()
        if first_exit is not None:
            name, code = first_exit
            sys.stderr.write(f"{name} exited with code {code}; stopped the rest.\n")
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
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for name, process in self.processes.items():
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                sys.stderr.write(f"{name} did not stop within {STOP_TIMEOUT_S} s; killed it.\n")
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

        commands = {"uvicorn": uvicorn_command(host=host, port=port, workers=workers)}
        if not options["no_qcluster"]:
            from providers.tasks import ensure_refresh_schedule  # models: after django.setup()

            commands["qcluster"] = qcluster_command()
            ensure_refresh_schedule()
        supervisor = Supervisor(commands)
        for signum in STOP_SIGNALS:
            signal.signal(signum, supervisor.request_stop)

        self.check_migrations()
        url = base_url(host, port)
        self.stdout.write(
            f"Keyaos admin: {url}admin/  (OpenAI-compatible API: {url}v1)\n"
            f"Starting {' and '.join(commands)}; press Ctrl-C to stop."
        )
        self.stdout.flush()
        code = supervisor.run()
        if code:
            sys.exit(code)

"""``make run``: the Makefile finds a recent Python, and ``manage.py serve`` (what ``make run``
ends with) runs uvicorn and the task cluster as one unit.

The serve tests start the real command in its own session on an embedded SQLite state dir, so every
process it spawns, grandchildren included, can be found afterwards by session id.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.fake_upstream import free_port
from tests.served import kill_session, manage_process, session_processes, wait_until

pytestmark = pytest.mark.slow

BASE_DIR = Path(__file__).resolve().parent.parent
STOP_WITHIN_S = 15


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve-state")
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "--verbosity", "0"],
        cwd=BASE_DIR,
        env=embedded_environment(path),
        check=True,
        timeout=120,
    )
    return path


def embedded_environment(state_dir: Path, **extra: str) -> dict[str, str]:
    # DEBUG serves the admin's static files without collectstatic writing into the checkout.
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DJANGO_SETTINGS_MODULE": "keyaos.settings",
        "KEYAOS_STATE_DIR": str(state_dir),
        "DEBUG": "true",
        "HOST": "127.0.0.1",
        **extra,
    }


def command_line(pid: int) -> str:
    return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()


def admin_login_status(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/login/", timeout=2) as resp:
            return resp.status
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


@pytest.fixture
def start_serve(state_dir, tmp_path):
    started: list[subprocess.Popen] = []

    def start(port: int) -> subprocess.Popen:
        env = embedded_environment(state_dir, PORT=str(port))
        with (tmp_path / "serve.log").open("wb") as log:
            process = manage_process(["serve"], env, log)
        started.append(process)
        return process

    yield start
    for process in started:
        kill_session(process)


def serve_log(tmp_path: Path) -> str:
    return (tmp_path / "serve.log").read_text(errors="replace")


def children_of(serve: subprocess.Popen) -> dict[str, int]:
    found = {}
    for pid in session_processes(serve.pid):
        line = command_line(pid)
        for name in ("uvicorn", "qcluster"):
            if name in line and name not in found:
                found[name] = pid
    return found


def test_it_serves_the_admin_and_stops_everything_on_one_ctrl_c(start_serve, tmp_path):
    port = free_port()
    serve = start_serve(port)

    assert wait_until(lambda: admin_login_status(port) == 200, 60), serve_log(tmp_path)
    assert wait_until(lambda: len(children_of(serve)) == 2, 10), serve_log(tmp_path)
    serve.send_signal(signal.SIGINT)

    assert serve.wait(timeout=STOP_WITHIN_S) == 0, serve_log(tmp_path)
    assert wait_until(lambda: not session_processes(serve.pid), 2), serve_log(tmp_path)
    log = serve_log(tmp_path)
    assert f"Keyaos admin: http://127.0.0.1:{port}/admin/" in log
    assert "Application shutdown complete." in log


def test_it_stops_the_cluster_and_fails_when_uvicorn_dies(start_serve, tmp_path):
    port = free_port()
    serve = start_serve(port)
    assert wait_until(lambda: admin_login_status(port) == 200, 60), serve_log(tmp_path)
    assert wait_until(lambda: len(children_of(serve)) == 2, 10), serve_log(tmp_path)

    os.kill(children_of(serve)["uvicorn"], signal.SIGKILL)

    assert serve.wait(timeout=STOP_WITHIN_S) != 0
    assert wait_until(lambda: not session_processes(serve.pid), 2), serve_log(tmp_path)
    assert "uvicorn exited with code" in serve_log(tmp_path)


def test_it_fails_and_stops_the_cluster_when_the_port_is_taken(start_serve, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        serve = start_serve(taken.getsockname()[1])

        assert serve.wait(timeout=60) != 0

    assert wait_until(lambda: not session_processes(serve.pid), 2), serve_log(tmp_path)
    assert "uvicorn exited with code" in serve_log(tmp_path)


def make_without_python(tmp_path: Path, *targets: str, **environ: str):
    """Run the repository's Makefile in an empty directory whose PATH holds only ``bin``."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    (tmp_path / "Makefile").write_bytes((BASE_DIR / "Makefile").read_bytes())
    env = {
        "PATH": str(tmp_path / "bin"),
        "HOME": str(tmp_path),
        "PYENV_ROOT": str(tmp_path / "no-pyenv"),
        **environ,
    }
    return subprocess.run(
        [shutil.which("make"), "--no-print-directory", *targets],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
class TestFindingPython:
    def test_it_explains_what_to_install_when_no_python_is_recent_enough(self, tmp_path):
        old_python = tmp_path / "bin" / "python3"
        old_python.parent.mkdir()
        old_python.write_text("#!/bin/sh\nexit 1\n")
        old_python.chmod(0o755)

        result = make_without_python(tmp_path, ".venv/bin/python")

        assert result.returncode != 0
        assert (
            "Keyaos needs Python 3.12 or newer; install it (e.g. pyenv install 3.12) or set "
            "PYTHON=/path/to/python3.12" in result.stderr
        )
        assert not (tmp_path / ".venv").exists()

    def test_it_names_an_unusable_python_given_explicitly(self, tmp_path):
        result = make_without_python(tmp_path, ".venv/bin/python", PYTHON="/nowhere/python3.12")

        assert "PYTHON=/nowhere/python3.12 is not a usable Python 3.12 or newer" in result.stderr
        assert not (tmp_path / ".venv").exists()

    def test_it_creates_the_virtualenv_with_the_first_recent_python_on_path(self, tmp_path):
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "python3.12").symlink_to(sys.executable)

        result = make_without_python(tmp_path, ".venv/bin/python")

        assert result.returncode == 0, result.stderr
        assert f"Creating .venv with {tmp_path}/bin/python3.12" in result.stdout
        assert (tmp_path / ".venv" / "bin" / "python").exists()

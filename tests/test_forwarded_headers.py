"""``X-Forwarded-For`` decides a key's client IP only when it comes from a proxy the operator
named in ``FORWARDED_ALLOW_IPS``; by default no one is trusted. Over the real ``manage.py serve``."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import httpx
import pytest

from keyaos.management.commands.serve import proxy_header_options
from tests.served import kill_session, manage_process
from tests.test_make_run import BASE_DIR, embedded_environment, free_port, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    """An embedded state dir with a client key allowed only from 10.0.0.0/8."""
    path = tmp_path_factory.mktemp("forwarded-state")
    environment = embedded_environment(path)
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "--verbosity", "0"],
        cwd=BASE_DIR,
        env=environment,
        check=True,
        timeout=120,
    )
    created = subprocess.run(
        [sys.executable, "manage.py", "create_api_key", "office", "--ips", "10.0.0.0/8"],
        cwd=BASE_DIR,
        env=environment,
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
    )
    return path, created.stdout.strip().splitlines()[-1]


@contextlib.contextmanager
def serving(state_dir, **extra: str):
    port = free_port()
    process = manage_process(
        ["serve", "--no-qcluster"], embedded_environment(state_dir, PORT=str(port), **extra)
    )
    try:
        assert wait_until(lambda: _up(port), 60)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        kill_session(process)


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 401
    except httpx.HTTPError:
        return False


def models_from(url: str, key: str, forwarded_for: str) -> httpx.Response:
    return httpx.get(
        url + "/models",
        headers={"Authorization": f"Bearer {key}", "X-Forwarded-For": forwarded_for},
        timeout=10,
    )


def test_by_default_a_forwarded_address_from_a_local_process_is_ignored(state):
    state_dir, key = state
    with serving(state_dir) as url:
        response = models_from(url, key, "10.1.2.3")

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "ip_not_allowed"
    assert "127.0.0.1" in response.json()["error"]["message"]


def test_a_forwarded_address_from_a_named_proxy_is_the_client_address(state):
    state_dir, key = state
    with serving(state_dir, FORWARDED_ALLOW_IPS="127.0.0.1") as url:
        allowed = models_from(url, key, "10.1.2.3")
        refused = models_from(url, key, "192.0.2.1")

    assert allowed.status_code == 200
    assert refused.status_code == 403
    assert "192.0.2.1" in refused.json()["error"]["message"]


def test_serve_passes_uvicorn_no_trust_unless_proxies_are_named():
    assert proxy_header_options("") == ["--no-proxy-headers"]
    assert proxy_header_options("10.0.0.5,10.0.0.6") == [
        "--proxy-headers",
        "--forwarded-allow-ips",
        "10.0.0.5,10.0.0.6",
    ]

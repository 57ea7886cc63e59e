from __future__ import annotations

import pytest

from tests.factories import World, make_world
from tests.fake_upstream import FakeUpstream


@pytest.fixture(scope="session")
def _fake_upstream_server():
    fake = FakeUpstream()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def fake_upstream(_fake_upstream_server):
    """The fake upstream, emptied of routes and recorded requests for each test."""
    _fake_upstream_server.reset()
    yield _fake_upstream_server
    _fake_upstream_server.reset()


class Gateway:
    """The real ASGI app (keyaos.asgi) served by uvicorn on 127.0.0.1, as in production."""

    def __init__(self) -> None:
        import uvicorn

        from tests.fake_upstream import free_port, start_server

        self.port = free_port()
        config = uvicorn.Config(
            "keyaos.asgi:application",
            host="127.0.0.1",
            port=self.port,
            lifespan="on",
            log_level="warning",
        )
        self.server = start_server(config)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def run(self, coroutine, timeout: float = 30):
        import asyncio

        from routing.runtime import runtime

        return asyncio.run_coroutine_threadsafe(coroutine, runtime.loop).result(timeout)

    def reload(self) -> None:
        """Make the gateway read the database now instead of at its next poll."""
        from routing.runtime import runtime

        self.run(runtime.reload())

    def flush_ledger(self) -> None:
        """Wait for the work done after responses: health updates, limit settlements, then the
        ledger writes."""
        import asyncio

        from routing.runtime import runtime

        async def settle():
            while runtime.background:
                await asyncio.wait(set(runtime.background))
            await runtime.counters.flush()
            await runtime.ledger.flush()

        self.run(settle())

    def recorded_entry(self, timeout_s: float = 5):
        """The one ledger row, once the work after the response (which may still be running for
        a stream the client left) has written it."""
        import time

        from billing.models import LedgerEntry

        deadline = time.monotonic() + timeout_s
        while not LedgerEntry.objects.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
            self.flush_ledger()
        return LedgerEntry.objects.get()

    def reset_health(self) -> None:
        from django.core.cache import cache

        from routing.health import HealthBoard
        from routing.runtime import new_counters, runtime

        cache.clear()
        runtime.board = HealthBoard()
        runtime.counters = new_counters()

    def stop(self) -> None:
        from tests.fake_upstream import stop_server

        stop_server(self.server)


@pytest.fixture(scope="session")
def _gateway_server(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock():
        gateway = Gateway()
    yield gateway
    gateway.stop()


@pytest.fixture
def gateway(_gateway_server, transactional_db):
    """The gateway over real HTTP, with a fresh snapshot and clean key health for each test."""
    _gateway_server.reset_health()
    _gateway_server.reload()
    yield _gateway_server
    _gateway_server.flush_ledger()


@pytest.fixture
def served_world(gateway, fake_upstream) -> World:
    """The default world (tests/factories.py make_world), served by the gateway."""
    return make_world(fake_upstream, gateway)


@pytest.fixture
def openrouter(fake_upstream):
    """OpenRouter added from its preset, at the fake upstream (tests/admin_client.py)."""
    from tests.admin_client import admin_provider

    return admin_provider(fake_upstream)


@pytest.fixture
def catalog(openrouter) -> dict[str, object]:
    """One row of everything the admin lists (tests/admin_client.py)."""
    from tests.admin_client import admin_catalog

    return admin_catalog(openrouter)

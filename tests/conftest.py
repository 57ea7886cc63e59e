from __future__ import annotations

import pytest

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

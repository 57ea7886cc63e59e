"""Sessions: which conversation a request belongs to, and where its last key is remembered."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import pytest
import redis

from routing.sessions import KEY_PREFIX, SessionMemory, SessionState, session_id

REDIS_URL = "redis://127.0.0.1:6379/6"


def chat(system: str, first: str, *later: str, **fields):
    messages = [{"role": "system", "content": system}, {"role": "user", "content": first}]
    messages += [{"role": "assistant", "content": text} for text in later]
    return {"model": "m", "messages": messages, **fields}


class TestSessionId:
    def test_the_client_names_it_by_header_first(self):
        ids = {
            session_id({header.lower(): "abc"}, chat("s", "u", user="other"), client_id=1)
            for header in ("X-Claude-Code-Session-Id", "session_id", "session-id")
        }
        assert len(ids) == 1 and ids.pop().startswith("1:h:")
        assert session_id({"session-id": "abd"}, chat("s", "u"), client_id=1) not in ids

    @pytest.mark.parametrize(
        "fields",
        [{"prompt_cache_key": "abc"}, {"metadata": {"user_id": "abc"}}, {"user": "abc"}],
    )
    def test_or_by_a_body_field(self, fields):
        named = session_id({}, chat("s", "u", **fields), client_id=1)
        assert named == session_id({}, chat("other", "start", user="abc"), client_id=1)
        assert named.startswith("1:b:") and "abc" not in named

    @pytest.mark.parametrize("name", ["lone \ud800", "a\nb", "x" * 500])
    def test_any_name_makes_an_ascii_key(self, name):
        named = session_id({}, chat("s", "u", user=name), client_id=1)
        assert named.isascii() and len(named) < 64
        assert named != session_id({}, chat("s", "u", user="!" + name), client_id=1)

    def test_otherwise_the_start_of_the_conversation_names_it(self):
        first = session_id({}, chat("system", "question"), client_id=1)
        later = session_id({}, chat("system", "question", "answer", "more"), client_id=1)
        assert first == later
        assert session_id({}, chat("system", "other question"), client_id=1) != first
        assert session_id({}, chat("system", "question"), client_id=2) != first

    def test_anthropic_and_responses_shapes_are_read_too(self):
        messages = {"model": "m", "system": "s", "messages": [{"role": "user", "content": "u"}]}
        responses = {"model": "m", "instructions": "s", "input": [{"role": "user", "content": "u"}]}
        assert session_id({}, messages, client_id=1) == session_id({}, responses, client_id=1)


STATE = SessionState(key_id=7, offer_id=3, served_at=1000.0, prompt_tokens=1200, ttl_s=300.0)


@pytest.fixture
def shared() -> redis.Redis:
    """The Redis both processes of a test share, or the test is skipped."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    return client


def test_every_process_sees_a_session_through_redis(shared):
    name = f"test-{uuid.uuid4().hex}"

    async def scenario():
        writer, reader = SessionMemory(REDIS_URL), SessionMemory(REDIS_URL)
        try:
            assert await reader.get(name) is None
            await writer.remember(name, STATE)
            assert await reader.get(name) == STATE
            assert reader.get_local(name) == STATE  # kept here once read
        finally:
            await writer.close()
            await reader.close()

    asyncio.run(scenario())
    assert 0 < shared.ttl(KEY_PREFIX + name) <= 301
    shared.delete(KEY_PREFIX + name)


def test_a_session_served_again_by_its_key_is_shared_again_only_after_a_tenth_of_its_ttl(
    shared,
):
    name = f"test-{uuid.uuid4().hex}"

    def later(seconds: float, **changes) -> SessionState:
        fields = {**vars(STATE), "served_at": STATE.served_at + seconds, **changes}
        return SessionState(**fields)

    async def scenario():
        memory = SessionMemory(REDIS_URL)
        try:
            await memory.remember(name, STATE)
            assert memory.remember(name, later(29)) is None  # same key within 30 s of 300
            assert memory.get_local(name) == later(29)  # this process knows it at once
            assert SessionState.loads(shared.get(KEY_PREFIX + name)) == STATE
            await memory.remember(name, later(31))
            assert SessionState.loads(shared.get(KEY_PREFIX + name)) == later(31)
            await memory.remember(name, later(32, key_id=8))  # another key: at once
            assert SessionState.loads(shared.get(KEY_PREFIX + name)).key_id == 8
        finally:
            await memory.close()

    try:
        asyncio.run(scenario())
    finally:
        shared.delete(KEY_PREFIX + name)


def test_an_unreachable_redis_leaves_sessions_in_the_process(caplog):
    async def scenario():
        memory = SessionMemory("redis://127.0.0.1:1/0", timeout_s=0.5)
        try:
            share = memory.remember("s", STATE)
            await share
            assert memory.get_local("s") == STATE
            assert await memory.get("other") is None
            assert memory.remember("t", STATE) is None  # not tried again at once
        finally:
            await memory.close()

    asyncio.run(scenario())
    warnings = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
    assert len(warnings) == 1


def test_fifty_new_sessions_at_once_on_a_busy_event_loop_reach_redis_within_the_timeout(
    shared, caplog
):
    """Each event-loop turn takes 20 ms (a loaded gateway): fifty concurrent commands would wait
    for redis-py's connection pool one turn each, past the 0.2 s timeout, and the sessions would
    fall back to this process. One read and one write for all of them stay well inside it."""
    names = [f"test-{uuid.uuid4().hex}" for _ in range(50)]

    async def busy_loop(until: float) -> None:
        while time.monotonic() < until:
            time.sleep(0.02)
            await asyncio.sleep(0)

    async def scenario():
        memory = SessionMemory(REDIS_URL, timeout_s=0.2)
        busy = asyncio.create_task(busy_loop(time.monotonic() + 3))
        try:
            await asyncio.sleep(0)
            found = await asyncio.gather(*(memory.get(name) for name in names))
            writes = [memory.remember(name, STATE) for name in names]
            await asyncio.gather(*(write for write in writes if write is not None))
            return found
        finally:
            busy.cancel()
            await memory.close()

    with caplog.at_level(logging.WARNING, logger="keyaos.sessions"):
        try:
            found = asyncio.run(scenario())
            stored = [SessionState.loads(raw) for raw in shared.mget(KEY_PREFIX + n for n in names)]
        finally:
            shared.delete(*(KEY_PREFIX + name for name in names))

    assert found == [None] * 50
    assert stored == [STATE] * 50
    assert not [r for r in caplog.records if "Redis unreachable" in r.getMessage()]

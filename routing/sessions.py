"""Which key served a conversation last: where routing expects its prompt cache to be.

A request belongs to a session named by the client (``X-Claude-Code-Session-Id``, ``session_id``
/ ``session-id`` headers, ``prompt_cache_key``, ``metadata.user_id``, ``user``) or, failing
those, by a hash of the client key, the model, the system prompt and the first user message:
what stays the same from one turn of a conversation to the next. After each answered request the
session remembers its key, when, and how many prompt tokens it sent: in this process, and in
Redis when ``REDIS_URL`` is set (redis-py's asyncio client: no thread hop), so every gateway
process routes a conversation's next turn with the same knowledge. Redis is written after the
response (for a session its key served again, only once a tenth of the cache lifetime has passed
since the last write) and read only when this process has not seen the session; the reads (and
the writes) waiting at one moment go together in one MGET (one pipeline), one at a time. While
Redis cannot be reached, sessions are this process's alone (one warning in the log).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

logger = logging.getLogger("keyaos.sessions")

SESSION_HEADERS = ("x-claude-code-session-id", "session_id", "session-id")
KEY_PREFIX = "keyaos:session:"
MAX_LOCAL_SESSIONS = 100_000
RETRY_S = 5.0
# A session served again by the same key is shared again only once this share of its cache
# lifetime has passed: other processes then see a cache up to that much older than it is.
RESHARE_FRACTION = 0.1


@dataclass(frozen=True)
class SessionState:
    key_id: int
    offer_id: int
    served_at: float  # epoch seconds
    prompt_tokens: int
    ttl_s: float  # the provider's prompt cache lifetime then: how long Redis keeps it

    def dumps(self) -> str:
        return json.dumps(
            [self.key_id, self.offer_id, self.served_at, self.prompt_tokens, self.ttl_s]
        )

    @classmethod
    def loads(cls, raw: bytes | str) -> SessionState | None:
        try:
            key_id, offer_id, served_at, prompt_tokens, ttl_s = json.loads(raw)
            return cls(int(key_id), int(offer_id), float(served_at), int(prompt_tokens), ttl_s)
        except (ValueError, TypeError):
            return None


def session_id(headers: Mapping[str, str], body: dict[str, Any], *, client_id: int) -> str:
    """The session a request belongs to, scoped to the client key (and, by the caller, model)."""
    for name in SESSION_HEADERS:
        value = headers.get(name)
        if value:
            return f"{client_id}:h:{_named(value)}"
    metadata = body.get("metadata")
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    for value in (body.get("prompt_cache_key"), user_id, body.get("user")):
        if isinstance(value, str) and value:
            return f"{client_id}:b:{_named(value)}"
    digest = hashlib.blake2b(digest_size=16)
    digest.update(_bytes(str(body.get("model"))))
    system, first_user = _conversation_start(body)
    digest.update(b"\0" + _bytes(system) + b"\0" + _bytes(first_user))
    return f"{client_id}:d:{digest.hexdigest()}"


def _named(value: str) -> str:
    """A name the client gave, as a digest: any text (a lone surrogate, a newline, 200
    characters) makes a Redis key, and the key does not repeat what the client sent."""
    return hashlib.blake2b(_bytes(value[:200]), digest_size=16).hexdigest()


def _conversation_start(body: dict[str, Any]) -> tuple[Any, Any]:
    system = body.get("system", body.get("instructions"))
    messages = body.get("messages", body.get("input"))
    first_user = None
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            role = message.get("role")
            if role in ("system", "developer") and system is None:
                system = message.get("content")
            elif role == "user":
                first_user = message.get("content")
                break
    elif messages is None:
        first_user = body.get("prompt")
    else:
        first_user = messages
    return system, first_user


def _bytes(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode("utf-8", "replace")
    return json.dumps(value, sort_keys=True, default=str).encode()


class SessionMemory:
    """Sessions seen by this process, backed by Redis when configured."""

    def __init__(self, redis_url: str = "", *, timeout_s: float = 0.2) -> None:
        self.local: OrderedDict[str, SessionState] = OrderedDict()
        self.shared: dict[str, SessionState] = {}  # what Redis was last told, per session
        self.timeout_s = timeout_s
        self._redis = aioredis.from_url(redis_url) if redis_url else None
        self._failing_since: float | None = None
        self._reads: dict[str, asyncio.Future] = {}  # sessions for the next MGET
        self._reading: asyncio.Future | None = None
        self._writes: dict[str, SessionState] = {}  # sessions for the next write pipeline
        self._written: asyncio.Future | None = None  # done once that pipeline is sent
        self._writing: asyncio.Future | None = None

    def get_local(self, session: str) -> SessionState | None:
        return self.local.get(session)

    async def get(self, session: str) -> SessionState | None:
        state = self.local.get(session)
        if state is not None or not self._redis_usable():
            return state
        read = self._reads.get(session)
        if read is None:
            read = self._reads[session] = asyncio.get_running_loop().create_future()
            if self._reading is None:
                self._reading = asyncio.ensure_future(self._read_batches())
        return await asyncio.shield(read)

    async def _read_batches(self) -> None:
        """Read the sessions asked for meanwhile with one MGET, one MGET at a time.

        Concurrent commands each wait for redis-py's connection pool, which hands out one
        connection per turn of the event loop: fifty new sessions on a loaded gateway waited
        past the timeout, and sessions fell back to this process."""
        reads: dict[str, asyncio.Future] = {}
        try:
            while self._reads:
                reads, self._reads = self._reads, {}
                raws = await self._read(list(reads))
                for (session, read), raw in zip(reads.items(), raws, strict=True):
                    state = SessionState.loads(raw) if raw is not None else None
                    if state is not None and session not in self.local:
                        self._keep(session, state)
                    read.set_result(self.local.get(session, state))
        finally:
            self._reading = None
            for read in [*reads.values(), *self._reads.values()]:
                if not read.done():
                    read.set_result(None)

    async def _read(self, sessions: list[str]) -> list:
        if not self._redis_usable():
            return [None] * len(sessions)
        try:
            raws = await asyncio.wait_for(
                self._redis.mget([KEY_PREFIX + session for session in sessions]), self.timeout_s
            )
        except (RedisError, OSError, TimeoutError) as error:
            self._failed(error)
            return [None] * len(sessions)
        self._failing_since = None
        return raws

    def remember(self, session: str, state: SessionState):
        """Keep ``state`` here now; returns the Redis write to run after the response, if any:
        none while Redis already holds this key for the session from recently enough."""
        self._keep(session, state)
        if not self._redis_usable() or self._shared_recently(session, state):
            return None
        self.shared[session] = state
        return self._share(session, state)

    def _shared_recently(self, session: str, state: SessionState) -> bool:
        last = self.shared.get(session)
        return (
            last is not None
            and (last.key_id, last.offer_id) == (state.key_id, state.offer_id)
            and state.served_at - last.served_at < state.ttl_s * RESHARE_FRACTION
        )

    async def _share(self, session: str, state: SessionState) -> None:
        """Write ``state`` with the other sessions to write now, in one pipeline (see
        ``_read_batches``); returns once that pipeline has been sent or has failed."""
        self._writes[session] = state
        if self._written is None:
            self._written = asyncio.get_running_loop().create_future()
        written = self._written
        if self._writing is None:
            self._writing = asyncio.ensure_future(self._write_batches())
        await asyncio.shield(written)

    async def _write_batches(self) -> None:
        written = None
        try:
            while self._writes:
                writes, self._writes = self._writes, {}
                written, self._written = self._written, None
                await self._write(writes)
                written.set_result(None)
        finally:
            self._writing = None
            for waiting in (written, self._written):
                if waiting is not None and not waiting.done():
                    waiting.set_result(None)

    async def _write(self, writes: dict[str, SessionState]) -> None:
        if not self._redis_usable():
            self._unshare(writes)
            return
        pipeline = self._redis.pipeline(transaction=False)
        for session, state in writes.items():
            ttl_s = max(int(state.ttl_s) + 1, 1)
            pipeline.set(KEY_PREFIX + session, state.dumps(), ex=ttl_s)
        try:
            await asyncio.wait_for(pipeline.execute(), self.timeout_s)
        except (RedisError, OSError, TimeoutError) as error:
            self._unshare(writes)
            self._failed(error)
        else:
            self._failing_since = None

    def _unshare(self, writes: dict[str, SessionState]) -> None:
        """Forget that Redis was told what it could not be."""
        for session, state in writes.items():
            if self.shared.get(session) is state:
                del self.shared[session]

    def _keep(self, session: str, state: SessionState) -> None:
        self.local[session] = state
        self.local.move_to_end(session)
        while len(self.local) > MAX_LOCAL_SESSIONS:
            self.shared.pop(self.local.popitem(last=False)[0], None)

    def _redis_usable(self) -> bool:
        if self._redis is None:
            return False
        return self._failing_since is None or time.monotonic() - self._failing_since > RETRY_S

    def _failed(self, error: Exception) -> None:
        if self._failing_since is None:
            logger.warning(
                "sessions: Redis unreachable (%s); prompt-cache sessions are per process until "
                "it answers again",
                type(error).__name__,
            )
        self._failing_since = time.monotonic()

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

"""A programmable fake upstream, served over real HTTP by uvicorn on 127.0.0.1.

Tests register what a path answers (``fake.reply(...)``, ``fake.stream(...)``, ``fake.handle(...)``)
and read what it received (``fake.requests``). Streaming, slow answers, dropped connections and HTML
pages behave as they do over a real socket.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def bearer(self) -> str | None:
        value = self.headers.get("authorization", "")
        return value.removeprefix("Bearer ") if value.startswith("Bearer ") else None


@dataclass
class Reply:
    status: int = 200
    json_body: Any = None
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class Stream:
    """An SSE answer: ``events`` are sent one by one, ``gap_s`` apart."""

    events: list[bytes]
    gap_s: float = 0.0
    first_delay_s: float = 0.0
    fail_after: int | None = None
    hold_s: float = 0.0  # keep the response open this long after the last event
    status: int = 200
    content_type: str = "text/event-stream"
    closed: threading.Event = field(default_factory=threading.Event)
    sent: int = 0


Handler = Callable[[Received], Reply | Stream]


def sse(*payloads: Any, done: bool = True) -> list[bytes]:
    events = [f"data: {json.dumps(payload)}\n\n".encode() for payload in payloads]
    if done:
        events.append(b"data: [DONE]\n\n")
    return events


class FakeUpstream:
    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Handler] = {}
        self.requests: list[Received] = []
        self.port = free_port()
        self.server: uvicorn.Server | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, prefix: str) -> str:
        return f"{self.base}/{prefix.strip('/')}"

    def reset(self) -> None:
        self.routes.clear()
        self.requests.clear()

    def handle(self, method: str, path: str, handler: Handler) -> None:
        self.routes[(method.upper(), path)] = handler

    def reply(self, method: str, path: str, **reply: Any) -> None:
        response = Reply(**reply)
        self.handle(method, path, lambda _request: response)

    def stream(self, path: str, events: list[bytes], **options: Any) -> Stream:
        stream = Stream(events=events, **options)
        self.handle("POST", path, lambda _request: stream)
        return stream

    def received(self, path: str) -> list[Received]:
        return [request for request in self.requests if request.path == path]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = Received(
            method=scope["method"],
            path=scope["path"],
            headers={k.decode().lower(): v.decode() for k, v in scope["headers"]},
            body=body,
        )
        self.requests.append(request)
        handler = self.routes.get((request.method, request.path))
        if handler is None:
            await _send_reply(send, Reply(status=404, json_body={"error": {"message": "no route"}}))
            return
        answer = handler(request)
        if isinstance(answer, Stream):
            await _send_stream(send, receive, answer)
        else:
            if answer.delay_s:
                await asyncio.sleep(answer.delay_s)
            await _send_reply(send, answer)

    def start(self) -> None:
        config = uvicorn.Config(
            self, host="127.0.0.1", port=self.port, lifespan="off", log_level="warning"
        )
        self.server = start_server(config)

    def stop(self) -> None:
        stop_server(self.server)


async def _send_reply(send, reply: Reply) -> None:
    body = json.dumps(reply.json_body).encode() if reply.json_body is not None else reply.body
    headers = [(b"content-type", reply.content_type.encode())]
    headers += [(k.encode(), v.encode()) for k, v in reply.headers.items()]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_stream(send, receive, stream: Stream) -> None:
    headers = [(b"content-type", stream.content_type.encode()), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": stream.status, "headers": headers})
    disconnected = asyncio.ensure_future(receive())  # completes when the client goes away
    try:
        if stream.first_delay_s:
            await asyncio.sleep(stream.first_delay_s)
        for index, event in enumerate(stream.events):
            if stream.fail_after is not None and index >= stream.fail_after:
                raise ConnectionAbortedError("fake upstream drops the connection mid-stream")
            if index and stream.gap_s:
                await asyncio.wait([disconnected], timeout=stream.gap_s)
            if disconnected.done():
                return
            await send({"type": "http.response.body", "body": event, "more_body": True})
            stream.sent += 1
        if stream.hold_s:
            await asyncio.wait([disconnected], timeout=stream.hold_s)
        await send({"type": "http.response.body", "body": b""})
    finally:
        disconnected.cancel()
        stream.closed.set()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(config: uvicorn.Config) -> uvicorn.Server:
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    server.thread = thread  # type: ignore[attr-defined]
    return server


def stop_server(server: uvicorn.Server | None) -> None:
    if server is not None:
        server.should_exit = True
        server.thread.join(timeout=10)  # type: ignore[attr-defined]


def translate_stream(translator, events: list[bytes], split: int | None = None) -> list[dict]:
    """Feed upstream ``events`` to a protocol's stream translator (cut every ``split`` bytes, or
    as sent) and parse the named SSE events it wrote, checking each name matches its ``type``."""
    raw = b"".join(events)
    pieces = [raw[i : i + split] for i in range(0, len(raw), split)] if split else events
    out = b"".join(translator.feed(piece) for piece in pieces) + translator.close()
    parsed = []
    for block in out.decode().split("\n\n"):
        if block:
            name, data = block.split("\n")
            payload = json.loads(data.removeprefix("data: "))
            assert name == f"event: {payload['type']}"
            parsed.append(payload)
    return parsed

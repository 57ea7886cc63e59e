"""A fast fake OpenAI-compatible upstream for the benchmark: raw asyncio, HTTP/1.1 keep-alive.

It answers ``POST .../chat/completions`` with a canned completion, or with an SSE stream shaped
like OpenAI's (a role chunk, N content chunks, a finish chunk, a usage chunk, ``[DONE]``) when the
body asks for ``"stream": true``, and ``GET .../models`` with one model. Answers are built once at
start-up, so the fake costs little CPU of its own; time to first token and the gap between chunks
are configurable. Run it alone with ``python -m bench.fake_upstream --port 9000``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import socket
import time

MODEL = "bench-model"
CONTENT_CHUNKS = 20
PROMPT_TOKENS = 12
_STREAM_FLAG = re.compile(rb'"stream"\s*:\s*true')
_HEADER_END = b"\r\n\r\n"


def completion_body(model: str = MODEL, chunks: int = CONTENT_CHUNKS) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "word " * chunks},
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(chunks),
        }
    ).encode()


def stream_events(model: str = MODEL, chunks: int = CONTENT_CHUNKS) -> list[bytes]:
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": int(time.time())}
    base["model"] = model

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    payloads = [chunk({"role": "assistant", "content": ""})]
    payloads += [chunk({"content": "word "}) for _ in range(chunks)]
    payloads.append(chunk({}, "stop"))
    payloads.append({**base, "choices": [], "usage": _usage(chunks)})
    events = [b"data: " + json.dumps(payload).encode() + b"\n\n" for payload in payloads]
    return [*events, b"data: [DONE]\n\n"]


def _usage(chunks: int) -> dict:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": chunks,
        "total_tokens": PROMPT_TOKENS + chunks,
    }


def _response_head(status: str, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _fixed(content_type: str, body: bytes, status: str = "200 OK") -> bytes:
    head = {"content-type": content_type, "content-length": str(len(body))}
    return _response_head(status, head) + body


class Answers:
    """Every answer as ready-made bytes."""

    def __init__(self, *, ttft_s: float, gap_s: float, chunks: int) -> None:
        self.ttft_s = ttft_s
        self.gap_s = gap_s
        self.completion = _fixed("application/json", completion_body(chunks=chunks))
        models = {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}]}
        self.models = _fixed("application/json", json.dumps(models).encode())
        self.not_found = _fixed(
            "application/json", b'{"error": {"message": "not found"}}', "404 Not Found"
        )
        self.stream_head = _response_head(
            "200 OK",
            {
                "content-type": "text/event-stream",
                "cache-control": "no-cache",
                "transfer-encoding": "chunked",
            },
        )
        self.stream_chunks = [
            f"{len(event):x}\r\n".encode() + event + b"\r\n"
            for event in stream_events(chunks=chunks)
        ]
        self.stream_end = b"0\r\n\r\n"


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, answers: Answers) -> None:
        self.answers = answers
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.busy: asyncio.Task | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.busy is not None:
            self.busy.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.busy is None:
            self._serve_buffered()

    def _serve_buffered(self) -> None:
        while self.transport is not None:
            request = self._next_request()
            if request is None:
                return
            method, path, body = request
            if method == b"POST" and path.endswith(b"/chat/completions"):
                if _STREAM_FLAG.search(body):
                    if self._send_stream():
                        return  # a delayed stream continues in a task
                else:
                    self.transport.write(self.answers.completion)
            elif method == b"GET" and path.endswith(b"/models"):
                self.transport.write(self.answers.models)
            else:
                self.transport.write(self.answers.not_found)

    def _next_request(self) -> tuple[bytes, bytes, bytes] | None:
        end = self.buffer.find(_HEADER_END)
        if end < 0:
            return None
        head = self.buffer[:end]
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        total = end + 4 + length
        if len(self.buffer) < total:
            return None
        method, path, _ = head.split(b"\r\n", 1)[0].split(b" ", 2)
        body = self.buffer[end + 4 : total]
        self.buffer = self.buffer[total:]
        return method, path, body

    def _send_stream(self) -> bool:
        answers = self.answers
        if answers.ttft_s <= 0 and answers.gap_s <= 0:
            write = self.transport.write
            write(answers.stream_head)
            for chunk in answers.stream_chunks:
                write(chunk)
            write(answers.stream_end)
            return False
        self.busy = asyncio.get_running_loop().create_task(self._paced_stream())
        return True

    async def _paced_stream(self) -> None:
        answers = self.answers
        self.transport.write(answers.stream_head)
        if answers.ttft_s > 0:
            await asyncio.sleep(answers.ttft_s)
        for number, chunk in enumerate(answers.stream_chunks):
            if number and answers.gap_s > 0:
                await asyncio.sleep(answers.gap_s)
            if self.transport is None:
                return
            self.transport.write(chunk)
        self.transport.write(answers.stream_end)
        self.busy = None
        self._serve_buffered()


async def serve(
    *, host: str, port: int, ttft_s: float, gap_s: float, chunks: int, ready=None
) -> None:
    answers = Answers(ttft_s=ttft_s, gap_s=gap_s, chunks=chunks)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: UpstreamProtocol(answers), host, port, backlog=1024, reuse_address=True
    )
    if ready is not None:
        ready()
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="delay before the first chunk")
    parser.add_argument("--gap-ms", type=float, default=0.0, help="delay between chunks")
    parser.add_argument("--chunks", type=int, default=CONTENT_CHUNKS, help="content chunks")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve(
                host=args.host,
                port=args.port,
                ttft_s=args.ttft_ms / 1000,
                gap_s=args.gap_ms / 1000,
                chunks=args.chunks,
                ready=lambda: print("ready", flush=True),
            )
        )


if __name__ == "__main__":
    main()

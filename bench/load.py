"""The benchmark's load generator: closed-loop aiohttp workers, run in a process of its own.

``--concurrency`` workers each send one chat request (with ``--mode messages``, a streamed
Anthropic Messages request) after another for ``--warmup`` seconds (not
measured) and then ``--duration`` seconds. It prints one JSON object: requests measured and sent,
errors, requests/s, latency and time-to-first-token percentiles, and, with ``--watch-pid``, the CPU
time that process (and its children) spent during the measured window, read from ``/proc``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field

import aiohttp

PROMPT = [{"role": "user", "content": "Say hello to the benchmark in a few words."}]
DONE = b"data: [DONE]"
MESSAGE_STOP = b"event: message_stop"
STREAMED = ("stream", "messages")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def request_body(model: str, *, stream: bool) -> bytes:
    body: dict = {"model": model, "messages": PROMPT, "max_tokens": 64}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid``, its reaped children and its live descendants
    (uvicorn's workers when it runs several), from ``/proc``."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = [int(value) for value in stat.read().rsplit(b")", 1)[1].split()[11:15]]
    utime, stime, cutime, cstime = fields
    user, system = (utime + cutime) / CLOCK_TICKS, (stime + cstime) / CLOCK_TICKS
    for child in _children(pid):
        child_user, child_system = cpu_seconds(child)
        user, system = user + child_user, system + child_system
    return user, system


def _children(pid: int) -> list[int]:
    children = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as listed:
                children += [int(child) for child in listed.read().split()]
    except OSError:  # gone, or a kernel without the children file
        pass
    return children


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    ordered = sorted(values)

    def rank(fraction: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 3)

    return {
        "p50": rank(0.50),
        "p95": rank(0.95),
        "p99": rank(0.99),
        "mean": round(sum(ordered) / len(ordered), 3),
        "max": round(ordered[-1], 3),
    }


@dataclass
class Tally:
    latencies_ms: list[float] = field(default_factory=list)
    ttfts_ms: list[float] = field(default_factory=list)
    overheads_ms: list[float] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    sent: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(message)


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.headers = {"Content-Type": "application/json"}
        if args.api_key:
            self.headers["Authorization"] = f"Bearer {args.api_key}"
        self.bodies = {
            False: request_body(args.model, stream=False),
            True: request_body(args.model, stream=True),
        }
        # Messages through Keyaos; directly, the same body is the upstream's chat stream.
        self.end_marker = MESSAGE_STOP if args.url.endswith("/messages") else DONE
        if self.end_marker is MESSAGE_STOP:
            self.headers["anthropic-version"] = "2023-06-01"
        self.tally = Tally()
        self.measuring_since: float | None = None

    async def run(self) -> dict:
        connector = aiohttp.TCPConnector(limit=0, force_close=False, enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(total=self.args.timeout_s)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        ) as session:
            started = time.perf_counter()
            warm_until = started + self.args.warmup
            stop_at = warm_until + self.args.duration
            workers = [
                asyncio.create_task(self.worker(session, number, warm_until, stop_at))
                for number in range(self.args.concurrency)
            ]
            await asyncio.sleep(max(warm_until - time.perf_counter(), 0))
            cpu_before = cpu_seconds(self.args.watch_pid) if self.args.watch_pid else None
            self.measuring_since = time.perf_counter()
            await asyncio.gather(*workers)
            elapsed = time.perf_counter() - self.measuring_since
            cpu_after = cpu_seconds(self.args.watch_pid) if self.args.watch_pid else None
        return self.summary(elapsed, cpu_before, cpu_after)

    async def worker(self, session, number: int, warm_until: float, stop_at: float) -> None:
        stream = self.args.mode in STREAMED or (self.args.mode == "mixed" and number % 2 == 1)
        while time.perf_counter() < stop_at:
            begun = time.perf_counter()
            measured = begun >= warm_until
            await self.one_request(session, stream, measured)
            if self.args.mode == "mixed":
                stream = not stream

    async def one_request(self, session, stream: bool, measured: bool) -> None:
        tally = self.tally
        tally.sent += 1
        begun = time.perf_counter()
        first_byte = None
        try:
            async with session.post(
                self.args.url, data=self.bodies[stream], headers=self.headers
            ) as response:
                request_id = response.headers.get("x-request-id")
                if request_id and self.args.ids_file:
                    tally.request_ids.append(request_id)
                tail = b""
                async for chunk in response.content.iter_any():
                    if first_byte is None:
                        first_byte = time.perf_counter()
                    tail = (tail + chunk)[-64:]
                finished = time.perf_counter()
                if response.status != 200:
                    tally.error(f"HTTP {response.status}: {tail[-200:]!r}")
                    return
                if stream and self.end_marker not in tail:
                    tally.error(f"stream ended without {self.end_marker.decode()}")
                    return
                overhead = response.headers.get("x-keyaos-overhead-ms")
        except (aiohttp.ClientError, TimeoutError) as error:
            tally.error(f"{type(error).__name__}: {error}")
            return
        if not measured:
            return
        tally.latencies_ms.append((finished - begun) * 1000)
        if stream and first_byte is not None:
            tally.ttfts_ms.append((first_byte - begun) * 1000)
        if overhead:
            tally.overheads_ms.append(float(overhead))

    def summary(self, elapsed: float, cpu_before: tuple | None, cpu_after: tuple | None) -> dict:
        tally = self.tally
        requests = len(tally.latencies_ms)
        result = {
            "url": self.args.url,
            "mode": self.args.mode,
            "concurrency": self.args.concurrency,
            "duration_s": round(elapsed, 3),
            "requests": requests,
            "sent": tally.sent,
            "errors": tally.errors,
            "error_samples": tally.error_samples,
            "rps": round(requests / elapsed, 1) if elapsed else 0.0,
            "latency_ms": percentiles(tally.latencies_ms),
            "ttft_ms": percentiles(tally.ttfts_ms) if tally.ttfts_ms else None,
            "gateway_overhead_header_ms": percentiles(tally.overheads_ms)
            if tally.overheads_ms
            else None,
        }
        if cpu_before is not None and cpu_after is not None:
            user = cpu_after[0] - cpu_before[0]
            system = cpu_after[1] - cpu_before[1]
            cpu = user + system
            result["cpu_s"] = round(cpu, 3)
            result["cpu_user_s"] = round(user, 3)
            result["cpu_system_s"] = round(system, 3)
            result["cpu_ms_per_request"] = round(cpu * 1000 / requests, 3) if requests else None
        if self.args.ids_file:
            with open(self.args.ids_file, "a") as ids:
                ids.writelines(f"{request_id}\n" for request_id in tally.request_ids)
        return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the chat completions (or messages) URL")
    parser.add_argument("--model", default="bench-model")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--mode", choices=("json", "stream", "mixed", "messages"), default="json")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds first")
    parser.add_argument("--timeout-s", type=float, default=30.0)
    parser.add_argument("--watch-pid", type=int, help="report this process's CPU time")
    parser.add_argument("--ids-file", help="append the x-request-id of every answer here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    result = asyncio.run(Load(parse_args(argv)).run())
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

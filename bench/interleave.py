"""``python -m bench.interleave BUILD_DIR BUILD_DIR ...``: the latency and CPU of several builds at
concurrency 1, measured in the same minutes.

Each build's gateway (its own checkout, ``.venv`` and SQLite state) runs on the first core, all of
them side by side; the load, from this process on the other core, goes to one gateway at a time
and moves to the next every ``--slice-s`` seconds, in an order that changes every round. So every
build meets the same drifts of a shared host, which moves by more than a build differs: two runs
of one build minutes apart differ by 20-30 % on a slow day. Latency percentiles and CPU per
request are pooled over each build's slices.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.load import cpu_seconds, percentiles, request_body
from bench.run import MODEL, PROVIDER, UPSTREAM_SECRET, free_port

BASE_DIR = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 60


@dataclass
class Build:
    directory: Path
    state_dir: Path
    env: dict[str, str]
    port: int = 0
    api_key: str = ""
    process: subprocess.Popen | None = None
    latencies_ms: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    errors: int = 0

    @property
    def name(self) -> str:
        revision = subprocess.run(
            ["git", "-C", str(self.directory), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return f"{self.directory.name} ({revision})"

    def manage(self, *command: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            [str(self.directory / ".venv/bin/python"), "manage.py", *command],
            cwd=self.directory,
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode:
            raise SystemExit(f"{self.directory}: {' '.join(command)} failed:\n{done.stderr}")
        return done.stdout

    def seed(self, upstream_port: int) -> None:
        """Through each build's own commands: one provider, a priced offer, a key, a client key."""
        self.manage("migrate", "--noinput")
        base_url = f"http://127.0.0.1:{upstream_port}/v1"
        self.manage(
            *("add_provider", PROVIDER, "--preset", "openai-compatible"),
            *("--base-url", base_url, "--currency", "USD"),
        )
        create = ("--create",) if "--create" in self.manage("set_price", "--help") else ()
        self.manage("set_price", PROVIDER, MODEL, "--input", "1", "--output", "2", *create)
        self.manage("add_upstream_key", PROVIDER, "--label", "bench", stdin=UPSTREAM_SECRET + "\n")
        self.api_key = self.manage("create_api_key", "bench").strip().splitlines()[-1]

    def start(self, cores: set[int]) -> None:
        self.port = free_port()
        log = open(self.state_dir / "gateway.log", "wb")  # noqa: SIM115 (the gateway's, until it stops)
        self.process = subprocess.Popen(
            [str(self.directory / ".venv/bin/python"), "-m", "uvicorn", "keyaos.asgi:application"]
            + ["--host", "127.0.0.1", "--port", str(self.port), "--lifespan", "on"]
            + ["--no-server-header", "--timeout-graceful-shutdown", "5"],
            cwd=self.directory,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.sched_setaffinity(0, cores),
        )
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/models",
            headers={"Authorization": f"Bearer {self.api_key}"},
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise SystemExit(f"{self.directory}: no answer within {STARTUP_TIMEOUT_S} s at start-up")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def summary(self, measured_s: float) -> dict:
        requests = len(self.latencies_ms)
        return {
            "build": self.name,
            "requests": requests,
            "errors": self.errors,
            "rps": round(requests / measured_s, 1) if measured_s else None,
            "cpu_ms_per_request": round(self.cpu_s * 1000 / requests, 3) if requests else None,
            "latency_ms": percentiles(self.latencies_ms),
        }


def new_build(directory: Path) -> Build:
    state_dir = Path(tempfile.mkdtemp(prefix="keyaos-bench-"))
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "REDIS_URL", "VIRTUAL_ENV"}
    }
    env |= {
        "DJANGO_SETTINGS_MODULE": "keyaos.settings",
        "KEYAOS_STATE_DIR": str(state_dir),
        "KEYAOS_LEDGER_SPOOL_DIR": str(state_dir / "spool"),
        "KEYAOS_METRICS": "false",
        "SECRET_KEY": "bench-" + secrets.token_urlsafe(40),
    }
    return Build(directory.resolve(), state_dir, env)


async def run_slice(
    session: aiohttp.ClientSession, build: Build, seconds: float, measured: bool, gap_s: float = 0
) -> None:
    """``seconds`` of requests to ``build``, then ``gap_s`` idle: what it does in the background
    after its requests (its ledger batch) counts in its CPU and not in the next build's time."""
    body = request_body(MODEL, stream=False)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {build.api_key}"}
    url = f"http://127.0.0.1:{build.port}/v1/chat/completions"
    cpu_before = sum(cpu_seconds(build.process.pid))
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() < stop_at:
        begun = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                answered = response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            answered = False
        finished = time.perf_counter()
        if not measured:
            continue
        if answered:
            build.latencies_ms.append((finished - begun) * 1000)
        else:
            build.errors += 1
    await asyncio.sleep(gap_s)
    if measured:
        build.cpu_s += sum(cpu_seconds(build.process.pid)) - cpu_before


async def alternate(builds: list[Build], args: argparse.Namespace) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        for build in builds:
            await run_slice(session, build, args.warmup_s, measured=False)
        for round_number in range(args.rounds):
            shift = round_number % len(builds)
            for build in builds[shift:] + builds[:shift]:
                await run_slice(session, build, args.slice_s, measured=True, gap_s=args.gap_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", nargs="+", type=Path, help="checkouts, each with its .venv")
    parser.add_argument("--slice-s", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--gap-s", type=float, default=0.3, help="idle after each slice")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("bench.interleave needs two cores: one for the gateways, one for the load")
    gateway_cores, load_cores = {cores[0]}, set(cores[1:])
    os.sched_setaffinity(0, load_cores)
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "bench.fake_upstream", "--port", str(upstream_port)],
        cwd=BASE_DIR,
        stdout=subprocess.PIPE,
        text=True,
    )
    builds = [new_build(directory) for directory in args.builds]
    try:
        if upstream.stdout.readline().strip() != "ready":
            raise SystemExit("the fake upstream did not start")
        for build in builds:
            build.seed(upstream_port)
            build.start(gateway_cores)
        asyncio.run(alternate(builds, args))
    finally:
        for build in builds:
            build.stop()
            shutil.rmtree(build.state_dir, ignore_errors=True)
        upstream.terminate()
        upstream.wait(timeout=10)
    result = {
        "slice_s": args.slice_s,
        "rounds": args.rounds,
        "builds": [build.summary(args.slice_s * args.rounds) for build in builds],
    }
    if args.output:
        args.output.write_text(json.dumps(result, indent=2))
    for row in result["builds"]:
        latency = row["latency_ms"]
        print(
            f"{row['build']:<28} {row['requests']:>7} requests  "
            f"cpu {row['cpu_ms_per_request']} ms/request  "
            f"p50 {latency['p50']} p95 {latency['p95']} p99 {latency['p99']} ms  "
            f"errors {row['errors']}"
        )


if __name__ == "__main__":
    main()

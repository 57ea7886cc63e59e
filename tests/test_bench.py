"""`make bench` end to end on a tiny configuration, and the pieces its figures rest on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.fake_upstream import stream_events
from bench.run import gateway_command, memory_trend, parse_args, summarise_profile

BASE_DIR = Path(__file__).resolve().parent.parent


def run_bench_module(module: str, *args: str, timeout_s: float) -> subprocess.CompletedProcess:
    """``python -m module args`` from the checkout, as ``make bench`` runs it: without the test
    run's Django settings and state folder."""
    env = {**os.environ}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.pop("KEYAOS_STATE_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


@pytest.mark.slow
def test_a_tiny_bench_runs_end_to_end_and_finds_one_ledger_row_per_request(tmp_path):
    """Chat (non-streamed and streamed) and Messages streams, each straight and through Keyaos."""
    output = tmp_path / "bench.json"
    database = f"keyaos_bench_test_{os.getpid()}"
    completed = run_bench_module(
        *("bench.run", "--concurrency", "2", "--duration", "0.5"),
        *("--warmup", "0.1", "--output", str(output), "--database-name", database),
        *("--writer-records", "500", "--translation-pairs", "2", "--pair-duration", "0.3"),
        timeout_s=120,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    result = json.loads(output.read_text())

    assert {"machine", "placement", "config", "startup_s", "peak_memory_mb", "phases"} <= set(
        result
    )
    assert [(row["mode"], row["concurrency"]) for row in result["phases"]] == [
        ("json", 2),
        ("stream", 2),
        ("messages", 2),
    ]
    for row in result["phases"]:
        assert row["errors"] == 0
        assert row["keyaos"]["requests"] > 0 and row["direct"]["requests"] > 0
        assert row["cpu_ms_per_request"] > 0
        assert set(row["added_latency_ms"]) == {"p50", "p95", "p99"}
        assert set(row["keyaos"]["latency_ms"]) == {"p50", "p95", "p99", "mean", "max"}
    assert result["phases"][1]["added_ttft_ms"]["p50"] is not None
    assert result["phases"][2]["added_ttft_ms"]["p50"] is not None
    pairs = result["translation_pairs"]
    assert pairs["pairs"] == 2 and len(pairs["differences_ms"]) == 2
    assert result["targets"]["messages_cpu_over_stream_ms"]["value"] == pairs["median_ms"]
    ledger = result["ledger"]
    assert ledger["ok"] and ledger["rows"] == ledger["sent"] == ledger["answered_ids"]
    assert ledger["outcomes"] == {"ok": ledger["rows"]}
    assert "cpu_ms_per_request_json" in result["targets"]
    for row in result["phases"]:
        assert row["keyaos"]["ledger_backlog"]["samples"] > 0
    writer = result["ledger_writer"]
    assert writer["records"] == 500 and writer["rows_per_s"] > 0
    assert "writer_rows_per_s" in result["targets"] and "ledger_backlog_ms_c2" in result["targets"]
    assert "ledger:" in completed.stdout and "cpu ms/req" in completed.stdout


def test_the_bench_starts_the_gateway_as_production_does_with_one_worker():
    args = parse_args([])
    bench = type("B", (), {"args": args, "gateway_port": 8123})()

    command = gateway_command(bench)
    assert command[1:4] == ["-m", "uvicorn", "keyaos.asgi:application"]
    assert command[command.index("--workers") + 1] == "1"
    assert command[command.index("--lifespan") + 1] == "on"
    assert "--no-proxy-headers" in command  # no FORWARDED_ALLOW_IPS: no forwarded headers


def test_the_fake_stream_is_a_role_chunk_content_chunks_a_finish_a_usage_chunk_and_done():
    events = stream_events(chunks=20)
    payloads = [json.loads(event.removeprefix(b"data: ")) for event in events[:-1]]

    assert len(events) == 24 and events[-1] == b"data: [DONE]\n\n"
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(p["choices"][0]["delta"]["content"] == "word " for p in payloads[1:21])
    assert payloads[21]["choices"][0]["finish_reason"] == "stop"
    assert payloads[22]["choices"] == [] and payloads[22]["usage"]["completion_tokens"] == 20


def test_memory_is_flat_when_rss_stops_growing_after_warm_up_and_growing_otherwise():
    flat = memory_trend([[t * 5.0, 80.0 + (3 if t == 0 else 0)] for t in range(20)])
    growing = memory_trend([[t * 5.0, 80.0 + t] for t in range(20)])

    assert flat["flat"] and flat["max_mb"] == 83.0 and flat["last_mb"] == 80.0
    assert not growing["flat"] and growing["slope_mb_per_min"] == pytest.approx(12.0)


def test_a_profile_is_summarised_per_function_and_per_package():
    raw = (
        "handle (uvicorn/protocols/http/h11_impl.py:10);send (httpx/_client.py:5) 3\n"
        "handle (uvicorn/protocols/http/h11_impl.py:10);feed (/work/main/routing/proxy.py:9) 1\n"
    )
    summary = summarise_profile(raw)

    assert summary["samples"] == 4
    assert summary["self_percent"][0] == ["send (httpx/_client.py)", 75.0]
    assert ["handle (uvicorn/protocols/http/h11_impl.py)", 100.0] in summary["inclusive_percent"]
    assert dict(summary["package_self_percent"]) == {"httpx": 75.0, "keyaos: routing": 25.0}


def test_the_routing_measurement_times_real_decisions():
    from bench.routing import measure, report

    result = measure(offers=200, keys=50, decisions=300)
    assert (result["offers"], result["keys"], result["decisions"]) == (200, 50, 300)
    assert result["with_candidates"] > 250
    assert 0 < result["p50_us"] <= result["p99_us"]
    assert "200 offers x 50 keys" in report(result)


def test_the_bench_can_run_without_metrics_and_with_several_workers():
    args = parse_args(["--metrics", "off", "--workers", "2"])
    bench = type("B", (), {"args": args, "gateway_port": 8123})()

    command = gateway_command(bench)
    assert command[command.index("--workers") + 1] == "2"
    assert args.metrics == "off"
    assert parse_args([]).metrics == "on"


def test_the_limited_mode_is_compared_with_the_unlimited_one_per_concurrency():
    from bench.run import limited_rps_share

    def row(mode, concurrency, rps):
        return {"mode": mode, "concurrency": concurrency, "keyaos": {"rps": rps}}

    rows = [row("json", 1, 100.0), row("limited", 1, 95.0), row("json", 10, 400.0)]

    assert limited_rps_share(rows) == {"1": 0.95}
    assert "limited" not in parse_args([]).modes
    assert parse_args(["--modes", "json", "limited"]).modes == ["json", "limited"]


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="bench.interleave needs two cores")
def test_interleave_measures_every_build_in_alternating_slices(tmp_path):
    """Two gateways of this checkout, seeded and served side by side, the load alternated."""
    output = tmp_path / "interleave.json"
    completed = run_bench_module(
        *("bench.interleave", str(BASE_DIR), str(BASE_DIR)),
        *("--rounds", "2", "--slice-s", "0.3", "--warmup-s", "0.2", "--gap-s", "0.1"),
        *("--output", str(output)),
        timeout_s=180,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    result = json.loads(output.read_text())

    assert (result["rounds"], result["slice_s"]) == (2, 0.3)
    assert len(result["builds"]) == 2
    for build in result["builds"]:
        assert build["errors"] == 0 and build["requests"] > 0
        assert build["cpu_ms_per_request"] > 0
        assert set(build["latency_ms"]) == {"p50", "p95", "p99", "mean", "max"}
    assert completed.stdout.count("requests  cpu") == 2

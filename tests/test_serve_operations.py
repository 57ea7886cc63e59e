"""Operations on a real ``manage.py serve`` process tree: metrics across workers, JSON logs, the
drain on SIGTERM."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from billing.models import LedgerEntry
from routing.observe import FLUSH_S
from tests.factories import make_client_key, make_key, make_offer, make_provider
from tests.payloads import chat_chunks, chat_completion
from tests.served import Served

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

UPSTREAM_SECRET = "sk-or-v1-" + "q" * 40
MODEL = "openai/gpt-4o-mini"
CHAT_PATH = "/openrouter/api/v1/chat/completions"


@pytest.fixture
def client_key(fake_upstream) -> str:
    provider = make_provider("openrouter", fake_upstream.url("openrouter/api/v1"))
    make_offer(provider, MODEL, input="1", output="2")
    make_key(provider, UPSTREAM_SECRET, label="main")
    return make_client_key("ops-client")[1]


@pytest.fixture
def serve(tmp_path):
    started: list[Served] = []

    def start(*args: str, **environ: str) -> Served:
        served = Served(tmp_path / f"serve-{len(started)}.log", *args, **environ)
        started.append(served)
        served.wait_ready()
        return served

    yield start
    for served in started:
        served.kill()


def request_total(served: Served) -> float:
    text = httpx.get(served.url + "/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "keyaos_requests_total"
    )


def chat(served: Served, key: str, **body) -> httpx.Response:
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **body}
    with httpx.Client(timeout=30) as client:  # a new connection each time: any worker answers
        return client.post(
            served.url + "/v1/chat/completions",
            json=payload,
            headers={"Authorization": f"Bearer {key}"},
        )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_request_counter_grows_by_exactly_n_with_one_or_two_workers(
    serve, client_key, fake_upstream, workers
):
    fake_upstream.reply("POST", CHAT_PATH, json_body=chat_completion(MODEL), delay_s=0.05)
    served = serve("--no-qcluster", WEB_CONCURRENCY=workers, KEYAOS_LOG_FORMAT="json")
    before = request_total(served)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: chat(served, client_key), range(40)))
    assert [answer.status_code for answer in answers] == [200] * 40
    # Each worker applies its counts within observe.FLUSH_S (a scrape it answers applies its own
    # at once); then each scrape, answered by whichever worker accepts it, reports the same sum.
    deadline = time.monotonic() + FLUSH_S + 2  # a second's lag, and a loaded machine's margin
    while request_total(served) - before < 40 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert {request_total(served) - before for _ in range(6)} == {40}
    pids = {
        line["process"]
        for line in map(json.loads, served.log().splitlines())
        if line.get("event") == "request"
    }
    assert len(pids) == int(workers)


def test_json_logs_are_one_object_per_line_with_the_request_and_no_secret(
    serve, client_key, fake_upstream
):
    fake_upstream.reply(
        "POST",
        CHAT_PATH,
        json_body=chat_completion(MODEL, prompt_tokens=10, completion_tokens=5),
    )
    served = serve("--no-qcluster", KEYAOS_LOG_FORMAT="json")
    assert chat(served, client_key).status_code == 200
    fake_upstream.reply(
        "POST", CHAT_PATH, status=401, json_body={"error": {"message": f"bad {UPSTREAM_SECRET}"}}
    )
    assert chat(served, client_key).status_code == 503
    served.process.send_signal(signal.SIGINT)
    assert served.process.wait(timeout=60) == 0, served.log()
    lines = [json.loads(line) for line in served.log().splitlines()]
    requests = [line for line in lines if line.get("event") == "request"]
    assert [(r["status"], r["outcome"]) for r in requests] == [
        (200, "ok"),
        (503, "upstream_error"),
    ]
    first = requests[0]
    assert first["client_key"] == "ops-client" and first["provider"] == "openrouter"
    assert first["key"] == "main" and first["requested_model"] == MODEL
    assert first["prompt_tokens"] == 10 and first["cost"] == "0.000020000000"
    assert first["currency"] == "USD" and first["attempts"] == 1
    assert first["request_id"].startswith("req_") and first["latency_ms"] >= 0
    assert any(line.get("event") == "key_state" for line in lines)
    log = served.log()
    assert UPSTREAM_SECRET not in log and client_key not in log


def test_sigterm_drains_a_running_stream_to_completion_and_bills_it(
    serve, client_key, fake_upstream
):
    words = [f"w{i} " for i in range(10)]
    fake_upstream.stream(
        CHAT_PATH,
        chat_chunks(MODEL, words, {"prompt_tokens": 8, "completion_tokens": 10}),
        gap_s=10 / 13,  # role chunk, 10 words, finish, usage, [DONE]: about 10 s in all
    )
    served = serve("--no-qcluster", KEYAOS_DRAIN_NOTICE_S="2", KEYAOS_DRAIN_S="60")
    received: list[bytes] = []
    first_chunk = threading.Event()

    def stream() -> int:
        with httpx.stream(
            "POST",
            served.url + "/v1/chat/completions",
            json={"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "x"}]},
            headers={"Authorization": f"Bearer {client_key}"},
            timeout=60,
        ) as response:
            for chunk in response.iter_raw():
                received.append(chunk)
                first_chunk.set()
            return response.status_code

    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(stream)
        assert first_chunk.wait(30), served.log()
        time.sleep(1)
        started = time.monotonic()
        served.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = httpx.get(served.url + "/ready", timeout=5)
        assert ready.status_code == 503 and "draining" in ready.json()["failing"]
        assert streaming.result(timeout=60) == 200
    body = b"".join(received)
    assert body.rstrip().endswith(b"data: [DONE]")
    assert all(word.encode() in body for word in words)
    assert served.process.wait(timeout=60) == 0, served.log()
    assert time.monotonic() - started > 5  # it waited for the stream
    assert LedgerEntry.objects.count() == 1, list(
        LedgerEntry.objects.values("outcome", "status_code", "error", "streamed")
    )
    entry = LedgerEntry.objects.get()
    assert entry.outcome == LedgerEntry.Outcome.OK
    assert (entry.prompt_tokens, entry.completion_tokens) == (8, 10)
    assert entry.cost_usd > 0

"""Streaming: bytes as they arrive, disconnects, mid-stream failures, usage read once."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from billing.models import LedgerEntry
from tests.factories import make_key, make_offer, make_provider, make_world
from tests.fake_upstream import sse
from tests.payloads import chat_chunks

MODEL = "openai/gpt-4o-mini"
PATH = "/or/api/v1/chat/completions"


@pytest.fixture
def setup(gateway, fake_upstream):
    world = make_world(fake_upstream, gateway, prefix="or/api/v1", model=MODEL, label="stream-key")
    return world.key, world.client_key


def stream_request(gateway, client_key, **body):
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    return httpx.stream(
        "POST",
        gateway.url + "/chat/completions",
        json={**payload, **body},
        headers={"Authorization": f"Bearer {client_key}"},
        timeout=10,
    )


def test_chunks_reach_the_client_as_the_upstream_sends_them(setup, gateway, fake_upstream):
    _, client_key = setup
    words = ["one", "two", "three", "four"]
    fake_upstream.stream(PATH, chat_chunks(MODEL, words, {"prompt_tokens": 1}), gap_s=0.3)
    arrivals = []
    with stream_request(gateway, client_key) as response:
        for chunk in response.iter_raw():
            if b'"content"' in chunk:
                arrivals.append(time.monotonic())
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:], strict=False)]
    assert len(arrivals) >= len(words)
    assert all(gap > 0.2 for gap in gaps[1 : len(words)]), gaps


def test_the_stream_is_forwarded_byte_for_byte(setup, gateway, fake_upstream):
    _, client_key = setup
    events = chat_chunks(MODEL, ["a", "b"], {"prompt_tokens": 2, "completion_tokens": 2})
    fake_upstream.stream(PATH, events)
    with stream_request(gateway, client_key, stream_options={"include_usage": True}) as response:
        body = response.read()
    assert body == b"".join(events)
    assert response.headers["content-type"].startswith("text/event-stream")


def test_a_client_disconnect_closes_the_upstream_and_is_recorded(setup, gateway, fake_upstream):
    key, client_key = setup
    words = [f"w{i}" for i in range(50)]
    stream = fake_upstream.stream(PATH, chat_chunks(MODEL, words, None), gap_s=0.1)
    with stream_request(gateway, client_key) as response:
        for chunk in response.iter_raw():
            if b"w2" in chunk:
                break
    closed_at = time.monotonic()
    assert stream.closed.wait(5)
    assert time.monotonic() - closed_at < 1.0
    assert stream.sent < len(words)
    gateway.flush_ledger()
    entry = gateway.recorded_entry()
    assert entry.outcome == "disconnected"
    assert entry.usage_source == "estimated"
    assert entry.completion_tokens > 0 and entry.cost > 0


def test_a_mid_stream_upstream_failure_ends_with_an_error_event(
    setup, gateway, fake_upstream, settings
):
    settings.KEYAOS_TRIP_MIN_FAILURES = 1  # this one failure is half the key's attempts: it trips
    key, client_key = setup
    fake_upstream.stream(PATH, chat_chunks(MODEL, ["a", "b", "c", "d"], None), fail_after=3)
    with stream_request(gateway, client_key) as response:
        body = response.read()
    events = [e for e in body.split(b"\n\n") if e.strip()]
    last = json.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "stream_interrupted"
    assert b"[DONE]" not in body
    gateway.flush_ledger()
    entry = LedgerEntry.objects.get()
    assert entry.outcome == "stream_failed"
    assert entry.usage_source == "estimated" and entry.cost > 0
    key.refresh_from_db()
    assert key.cooldown_until is not None


def test_a_stream_without_usage_is_billed_as_an_estimate(setup, gateway, fake_upstream):
    _, client_key = setup
    fake_upstream.stream(PATH, chat_chunks(MODEL, ["Hello", " there", " friend"], None))
    with stream_request(gateway, client_key) as response:
        response.read()
    gateway.flush_ledger()
    entry = LedgerEntry.objects.get()
    assert entry.outcome == "ok"
    assert entry.usage_source == "estimated"
    assert entry.prompt_tokens > 0 and entry.completion_tokens > 0
    assert entry.cost > 0 and entry.cost_source == "computed"


def test_a_repeated_usage_chunk_is_counted_once(setup, gateway, fake_upstream):
    _, client_key = setup
    usage = {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
    events = chat_chunks(MODEL, ["x"], usage, done=False)
    events += [events[-1], b"data: [DONE]\n\n"]
    fake_upstream.stream(PATH, events)
    with stream_request(gateway, client_key) as response:
        response.read()
    gateway.flush_ledger()
    entry = LedgerEntry.objects.get()
    assert (entry.prompt_tokens, entry.completion_tokens) == (7, 4)


def test_an_html_answer_to_a_stream_fails_over(setup, gateway, fake_upstream):
    key, client_key = setup
    other = make_provider("backup", fake_upstream.url("backup/v1"))
    make_offer(other, MODEL, input="5", output="10")
    make_key(other, "sk-backup-" + "b" * 30)
    gateway.reload()
    fake_upstream.reply("POST", PATH, body=b"<html>blocked</html>", content_type="text/html")
    fake_upstream.stream("/backup/v1/chat/completions", sse({"choices": []}))
    client = openai.OpenAI(base_url=gateway.url, api_key=client_key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    assert raw.headers["x-keyaos-provider"] == "backup"
    assert raw.headers["x-keyaos-attempts"] == "2"


def test_a_client_that_hangs_up_after_done_got_the_whole_answer(setup, gateway, fake_upstream):
    _, client_key = setup
    usage = {"prompt_tokens": 3, "completion_tokens": 2}
    fake_upstream.stream(PATH, chat_chunks(MODEL, ["a", "b"], usage), hold_s=5)
    with stream_request(gateway, client_key) as response:
        for chunk in response.iter_raw():
            if b"[DONE]" in chunk:
                break
    entry = gateway.recorded_entry()
    assert entry.outcome == "ok"
    assert (entry.prompt_tokens, entry.completion_tokens) == (3, 2)

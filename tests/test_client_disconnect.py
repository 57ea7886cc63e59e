"""A client that hangs up before a non-streamed answer: the upstream call stops, the row says so."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from billing.models import LedgerEntry
from tests.factories import make_client_key, make_key, make_offer, make_provider
from tests.fake_upstream import Reply
from tests.payloads import chat_completion

MODEL = "openai/gpt-4o-mini"
PATH = "/slow/v1/chat/completions"


@pytest.fixture
def client_key(gateway, fake_upstream):
    provider = make_provider("slow", fake_upstream.url("slow/v1"), read_timeout_s=10.0)
    make_offer(provider, MODEL, input="0.15", output="0.6")
    make_key(provider, "sk-slow-" + "s" * 30, label="slow-key")
    _, key = make_client_key()
    gateway.reload()
    return key


def hang_up_once_upstream_is_asked(gateway, fake_upstream, client_key) -> float:
    """Ask for a non-streamed answer over a raw socket; close it once the upstream got the
    request (or after 5 s). Returns when it hung up."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {client_key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    )
    with socket.create_connection(("127.0.0.1", gateway.port)) as connection:
        connection.sendall(request.encode())
        deadline = time.monotonic() + 5
        while not fake_upstream.received(PATH) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
    return time.monotonic()


def recorded(gateway) -> LedgerEntry:
    return gateway.recorded_entry()


def test_a_hang_up_while_the_upstream_writes_its_answer_closes_the_upstream(
    gateway, fake_upstream, client_key
):
    # The upstream sends half its answer at once and the rest after 3 s, unless the gateway
    # leaves first.
    body = httpx.Response(200, json=chat_completion(MODEL)).content
    answer = fake_upstream.stream(
        PATH, [body[:20], body[20:]], gap_s=3, content_type="application/json"
    )
    hung_up_at = hang_up_once_upstream_is_asked(gateway, fake_upstream, client_key)
    assert answer.closed.wait(5)
    assert time.monotonic() - hung_up_at < 2.0
    assert answer.sent == 1  # the upstream saw the gateway go before it wrote the rest
    entry = recorded(gateway)
    assert entry.outcome == "disconnected" and entry.status_code == 499
    assert entry.latency_ms < 2000
    assert entry.usage_source == "estimated" and entry.prompt_tokens > 0


def test_a_hang_up_before_the_upstream_answers_is_recorded_at_once(
    gateway, fake_upstream, client_key
):
    fake_upstream.handle(
        "POST", PATH, lambda _r: Reply(json_body=chat_completion(MODEL), delay_s=3)
    )
    hang_up_once_upstream_is_asked(gateway, fake_upstream, client_key)
    entry = recorded(gateway)
    assert entry.outcome == "disconnected" and entry.status_code == 499
    assert entry.latency_ms < 2000
    assert entry.cost == 0 and entry.usage_source == "none"

"""Hostile input on /v1 is the client's mistake: a 400 (or 404, 408) in OpenAI's format, never a 5xx."""

from __future__ import annotations

import json
import socket
import time
from decimal import Decimal

import httpx
import pytest

from billing.models import ApiKey, LedgerEntry
from tests.factories import make_key, make_offer, make_provider
from tests.payloads import chat_completion

MODEL = "openai/gpt-4o-mini"
MESSAGES = '[{"role": "user", "content": "x"}]'


@pytest.fixture
def limited_key(gateway, fake_upstream):
    provider = make_provider("openrouter", fake_upstream.url("or"))
    make_offer(provider, MODEL)
    make_key(provider, "sk-or-v1-" + "h" * 40)
    fake_upstream.reply("POST", "/or/chat/completions", json_body=chat_completion(MODEL))
    _, plain = ApiKey.create_key(name="limited", budget_usd=Decimal("5"), rpm_limit=1000)
    gateway.reload()
    return plain


def post(gateway, key: str, content: bytes) -> httpx.Response:
    return httpx.post(
        gateway.url + "/chat/completions",
        content=content,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        timeout=30,
    )


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ('"max_tokens": 1e30', "max_tokens"),
        ('"max_tokens": 1000000000000000000000000000000', "max_tokens"),
        ('"max_completion_tokens": 2147483648', "max_completion_tokens"),
        ('"max_tokens": 0', "max_tokens"),
        ('"n": 100000', "n"),
        ('"n": 0', "n"),
        ('"temperature": 1e999', None),
        ('"temperature": NaN', None),
        ('"top_p": -Infinity', None),
    ],
)
def test_out_of_range_numbers_on_a_limited_key_are_400s(gateway, limited_key, extra, param):
    content = f'{{"model": "{MODEL}", "messages": {MESSAGES}, {extra}}}'.encode()

    response = post(gateway, limited_key, content)

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    gateway.flush_ledger()
    assert LedgerEntry.objects.get().status_code == 400


@pytest.mark.parametrize("depth", [65, 10_000, 100_000])
def test_json_nested_too_deep_is_a_400(gateway, limited_key, depth):
    nested = "[" * depth + "]" * depth
    content = f'{{"model": "{MODEL}", "messages": {MESSAGES}, "tools": {nested}}}'.encode()

    response = post(gateway, limited_key, content)

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    assert "nested more than 64 levels" in response.json()["error"]["message"]


def test_json_nested_to_the_limit_is_served(gateway, limited_key):
    nested = "[" * 60 + "]" * 60
    content = f'{{"model": "{MODEL}", "messages": {MESSAGES}, "tools": {nested}}}'.encode()

    assert post(gateway, limited_key, content).status_code == 200


@pytest.mark.parametrize(
    "value", ['"lone \\ud800 surrogate"', "123456789012345678901234567890", '"CJK 通义 ✓"']
)
def test_what_a_fast_json_encoder_refuses_still_reaches_the_upstream_intact(
    gateway, limited_key, fake_upstream, value
):
    content = f'{{"model": "{MODEL}", "messages": {MESSAGES}, "user": {value}}}'.encode()

    assert post(gateway, limited_key, content).status_code == 200
    sent = fake_upstream.received("/or/chat/completions")[-1]
    assert sent.json()["user"] == json.loads(value)


@pytest.mark.parametrize("path", ["/v1/", "/v1", "/v1/nothing"])
def test_unknown_paths_without_a_key_are_json_404s(gateway, path):
    response = httpx.get(gateway.url.removesuffix("/v1") + path)

    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == "unknown_url"
    assert response.headers["x-request-id"].startswith("req_")


def test_a_client_that_never_finishes_its_body_is_cut_off(gateway, limited_key, settings):
    settings.KEYAOS_BODY_TIMEOUT_S = 0.5
    host, port = "127.0.0.1", gateway.port
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=10) as connection:
        connection.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + limited_key.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b'{"model": '
        )
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    waited = time.monotonic() - started

    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout"
    assert b'"code": "request_timeout"' in rest
    assert 0.4 < waited < 10  # cut off, the connection closed by the gateway


def test_a_slow_but_finishing_body_within_the_deadline_is_served(gateway, limited_key, settings):
    settings.KEYAOS_BODY_TIMEOUT_S = 5
    content = f'{{"model": "{MODEL}", "messages": {MESSAGES}}}'.encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as connection:
        connection.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer " + limited_key.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(content)).encode()
            + b"\r\n\r\n"
        )
        for index in range(0, len(content), 10):
            connection.sendall(content[index : index + 10])
            time.sleep(0.05)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk

    assert answer.startswith(b"HTTP/1.1 200")

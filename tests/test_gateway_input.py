"""Bad input gets the right status and an OpenAI-format error, and the gateway keeps serving."""

from __future__ import annotations

import io

import httpx
import pytest
from django.core.management import call_command

from billing.models import ApiKey, LedgerEntry
from tests.payloads import chat_completion

MODEL = "openai/gpt-4o-mini"


@pytest.fixture
def client_key(served_world, fake_upstream):
    fake_upstream.reply("POST", served_world.chat_path, json_body=chat_completion(MODEL))
    return served_world.client_key


def post(gateway, key, content, headers=None):
    return httpx.post(
        gateway.url + "/chat/completions",
        content=content,
        headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            **(headers or {}),
        },
    )


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b'{"messages": [{"role": "user", "content": "x"}]}', 400, "model"),
        (b'{"model": 42, "messages": [{"role": "user", "content": "x"}]}', 400, "model"),
        (b'{"model": "openai/gpt-4o-mini"}', 400, "messages"),
        (b'{"model": "openai/gpt-4o-mini", "messages": "hi"}', 400, "messages"),
        (
            b'{"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "max_tokens": "10"}',
            400,
            "max_tokens",
        ),
        (
            b'{"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
            400,
            "stream",
        ),
        (
            b'{"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "provider": {"only": "x"}}',
            400,
            "provider",
        ),
    ],
)
def test_bad_bodies_get_an_openai_error_a_ledger_row_and_the_gateway_keeps_serving(
    client_key, gateway, body, status, param
):
    response = post(gateway, client_key, body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param
    gateway.flush_ledger()
    entry = LedgerEntry.objects.get(request_id=response.headers["x-request-id"])
    assert (entry.outcome, entry.status_code) == ("client_error", status)
    assert entry.endpoint == "chat/completions" and entry.api_key_id is not None
    assert entry.error == error["message"]
    ok = post(
        gateway,
        client_key,
        b'{"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}',
    )
    assert ok.status_code == 200


def test_a_body_over_the_limit_is_a_413(client_key, gateway, settings):
    settings.KEYAOS_MAX_BODY_BYTES = 2048
    big = (
        b'{"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "'
        + b"x" * 4096
        + b'"}]}'
    )
    response = post(gateway, client_key, big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_the_x_api_key_header_and_the_admin_token_are_accepted(client_key, gateway, settings):
    settings.KEYAOS_ADMIN_TOKEN = "admin-token-" + "t" * 30
    for headers in (
        {"x-api-key": client_key},
        {"Authorization": "Bearer " + settings.KEYAOS_ADMIN_TOKEN},
    ):
        response = httpx.get(gateway.url + "/models", headers=headers)
        assert response.status_code == 200
        assert response.json()["data"][0]["id"] == MODEL


def test_a_disabled_client_key_is_refused(client_key, gateway):
    ApiKey.objects.update(enabled=False)
    gateway.reload()
    response = httpx.get(gateway.url + "/models", headers={"Authorization": f"Bearer {client_key}"})
    assert response.status_code == 401


def test_requests_refused_after_authentication_are_recorded(client_key, gateway):
    post(
        gateway,
        client_key,
        b'{"model": "nobody/nothing", "messages": [{"role": "user", "content": "x"}]}',
    )
    gateway.flush_ledger()
    entry = LedgerEntry.objects.get()
    assert entry.outcome == "client_error" and entry.status_code == 404
    assert entry.api_key_id is not None


def test_create_api_key_prints_the_key_last_and_stores_only_its_hash(gateway):
    out = io.StringIO()
    call_command("create_api_key", "cursor-laptop", stdout=out)
    plain = out.getvalue().strip().splitlines()[-1]
    assert plain.startswith("sk-keyaos-")
    stored = ApiKey.objects.get(name="cursor-laptop")
    assert plain not in (stored.key_hash, stored.prefix)
    assert plain.startswith(stored.prefix)
    gateway.reload()
    response = httpx.get(gateway.url + "/models", headers={"Authorization": f"Bearer {plain}"})
    assert response.status_code == 200


def test_every_v1_answer_carries_a_request_id(client_key, gateway, settings):
    settings.KEYAOS_MAX_BODY_BYTES = 2048
    answers = [
        httpx.get(gateway.url + "/models"),
        httpx.get(gateway.url + "/models", headers={"Authorization": "Bearer sk-keyaos-wrong"}),
        httpx.post(gateway.url + "/chat/completions", content=b"{}"),
        httpx.post(gateway.url + "/nowhere", content=b"{}"),
        httpx.get(gateway.url + "/chat/completions"),
        post(gateway, client_key, b"x" * 4096),
        post(gateway, client_key, b"{not json"),
        post(
            gateway,
            client_key,
            b'{"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}',
        ),
    ]
    assert [answer.status_code for answer in answers] == [401, 401, 401, 404, 405, 413, 400, 200]
    ids = [answer.headers.get("x-request-id", "") for answer in answers]
    assert all(request_id.startswith("req_") for request_id in ids), ids
    assert len(set(ids)) == len(ids)


def test_a_request_refused_before_authentication_leaves_no_ledger_row(client_key, gateway):
    response = httpx.post(gateway.url + "/chat/completions", content=b"{not json")
    assert response.status_code == 401
    gateway.flush_ledger()
    assert not LedgerEntry.objects.exists()

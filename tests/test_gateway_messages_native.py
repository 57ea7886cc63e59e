"""Messages requests routed to an upstream that speaks Messages natively (the ``anthropic``
preset, DeepSeek's Anthropic endpoint) pass through untranslated, with their usage and cache
tokens read from the native answer."""

from __future__ import annotations

from decimal import Decimal

import anthropic
import httpx
import pytest

from billing.models import LedgerEntry
from providers.adapters import adapter_for
from routing.protocols.anthropic import MessagesCall
from tests.factories import make_client_key, make_key, make_offer, make_provider
from tests.payloads import anthropic_events, anthropic_message, chat_completion

MODEL = "anthropic/claude-sonnet-4.5"
UPSTREAM_ID = "claude-sonnet-4-5-20250929"
NATIVE = "/anthropic/v1/messages"
USAGE = {"input_tokens": 100, "cache_read_input_tokens": 900, "output_tokens": 50}
SECRET = "sk-ant-api03-" + "a" * 40


@pytest.fixture
def world(gateway, fake_upstream):
    provider = make_provider("anthropic", fake_upstream.url("anthropic/v1"), preset="anthropic")
    make_offer(
        provider, UPSTREAM_ID, canonical_id=MODEL, input="3", output="15", cached_input="0.3"
    )
    make_key(provider, SECRET)
    _, plain = make_client_key()
    gateway.reload()
    sdk = anthropic.Anthropic(
        base_url=gateway.url.removesuffix("/v1"), api_key=plain, max_retries=0
    )
    return provider, sdk


BODY = {
    "max_tokens": 100,
    "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
    "messages": [{"role": "user", "content": "Hello"}],
    "thinking": {"type": "enabled", "budget_tokens": 1024},
    "output_config": {"effort": "low"},
}


def test_a_native_upstream_gets_the_request_untranslated_and_its_answer_passes_through(
    world, gateway, fake_upstream
):
    _, sdk = world
    fake_upstream.reply("POST", NATIVE, json_body=anthropic_message(UPSTREAM_ID, "Hi!", **USAGE))
    raw = sdk.messages.with_raw_response.create(
        model=MODEL,
        **BODY,
        extra_headers={"anthropic-beta": "claude-code-20250219,oauth-2025-04-20"},
    )
    message = raw.parse()
    assert message.id == "msg_upstream" and message.content[0].text == "Hi!"
    assert message.usage.cache_read_input_tokens == 900
    received = fake_upstream.received(NATIVE)[0]
    assert received.json() == {**BODY, "model": UPSTREAM_ID}
    assert received.headers["x-api-key"] == SECRET and "authorization" not in received.headers
    assert received.headers["anthropic-version"] == raw.http_request.headers["anthropic-version"]
    assert "anthropic-beta" not in received.headers  # no beta to a host not known to take it
    gateway.flush_ledger()
    entry = LedgerEntry.objects.get()
    assert (entry.endpoint, entry.prompt_tokens, entry.cached_tokens) == ("messages", 1000, 900)
    # 100 x 3 + 900 x 0.3 + 50 x 15 per 1M tokens
    assert entry.cost == Decimal("0.00132")


def test_a_native_stream_passes_through_byte_for_byte_with_its_usage_recorded(
    world, gateway, fake_upstream
):
    _, sdk = world
    events = anthropic_events(UPSTREAM_ID, ["Hel", "lo"], **USAGE)
    fake_upstream.stream(NATIVE, events)
    with sdk.messages.stream(model=MODEL, **BODY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello" and final.usage.output_tokens == 50
    response = httpx.post(
        gateway.url + "/messages",
        headers={"x-api-key": sdk.api_key},
        json={**BODY, "model": MODEL, "stream": True},
    )
    assert response.content == b"".join(events)
    gateway.flush_ledger()
    entries = LedgerEntry.objects.all()
    assert [(e.outcome, e.completion_tokens, e.cached_tokens) for e in entries] == [
        ("ok", 50, 900)
    ] * 2


def test_a_chat_request_to_the_same_provider_is_not_sent_to_its_messages_endpoint(
    world, gateway, fake_upstream
):
    provider, sdk = world
    fake_upstream.reply(
        "POST", "/anthropic/v1/chat/completions", json_body=chat_completion(UPSTREAM_ID)
    )
    client = httpx.post(
        gateway.url + "/chat/completions",
        headers={"Authorization": f"Bearer {sdk.api_key}"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
    )
    assert client.status_code == 200
    assert fake_upstream.received(NATIVE) == []


def test_betas_go_to_api_anthropic_com_only_and_without_the_oauth_ones():
    call = MessagesCall(
        protocol="anthropic",
        path="messages",
        body={},
        headers={"anthropic-beta": "claude-code-20250219, oauth-2025-04-20"},
    )
    assert call.headers_for("https://api.anthropic.com/v1") == {
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219",
    }
    assert call.headers_for("https://api.deepseek.com/anthropic/v1") == {
        "anthropic-version": "2023-06-01"
    }


def test_the_anthropic_preset_reads_its_catalog_with_x_api_key(world, fake_upstream):
    provider, _ = world
    fake_upstream.reply(
        "GET",
        "/anthropic/v1/models",
        json_body={
            "data": [
                {
                    "type": "model",
                    "id": UPSTREAM_ID,
                    "display_name": "Claude Sonnet 4.5",
                    "created_at": "2025-09-29T00:00:00Z",
                }
            ],
            "has_more": False,
            "first_id": UPSTREAM_ID,
            "last_id": UPSTREAM_ID,
        },
    )
    entries = adapter_for(provider).fetch_catalog(provider, secret=SECRET)
    assert [(e.upstream_model_id, e.display_name, e.has_prices) for e in entries] == [
        (UPSTREAM_ID, "Claude Sonnet 4.5", False)
    ]
    headers = fake_upstream.received("/anthropic/v1/models")[0].headers
    assert headers["x-api-key"] == SECRET and headers["anthropic-version"] == "2023-06-01"


def test_the_deepseek_preset_speaks_messages_at_its_anthropic_endpoint():
    from providers.presets import PRESETS

    fields = PRESETS["deepseek"].provider_fields()
    assert fields["native_protocols"] == {"anthropic": "https://api.deepseek.com/anthropic/v1"}


def test_manage_py_route_says_which_candidates_take_messages_untranslated(world):
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    call_command("route", MODEL, stdout=out)
    assert "speaks anthropic natively" in out.getvalue()

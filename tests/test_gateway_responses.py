"""The Responses API through Keyaos, with the official ``openai`` SDK over real HTTP against an
OpenAI-compatible fake upstream: answers, streams, function tools, errors, the ledger."""

from __future__ import annotations

import json
from decimal import Decimal

import httpx
import openai
import pytest

from billing.models import ApiKey, LedgerEntry
from tests.factories import make_client_key, make_key, make_offer, make_provider
from tests.payloads import chat_chunks, chat_completion, tool_call_chunks, tool_completion

MODEL = "openai/gpt-5-mini"
UPSTREAM = "/up/v1/chat/completions"
USAGE = {
    "prompt_tokens": 1000,
    "completion_tokens": 200,
    "total_tokens": 1200,
    "prompt_tokens_details": {"cached_tokens": 400},
}
SHELL = {
    "type": "function",
    "name": "shell",
    "description": "Runs a command.",
    "parameters": {
        "type": "object",
        "properties": {"command": {"type": "array", "items": {"type": "string"}}},
        "required": ["command"],
    },
    "strict": False,
}


@pytest.fixture
def world(gateway, fake_upstream):
    provider = make_provider("up", fake_upstream.url("up/v1"))
    make_offer(provider, MODEL, canonical_id=MODEL, input="1", output="2", cached_input="0.5")
    make_key(provider, "sk-up-" + "u" * 30, label="up-key")
    api_key, plain = make_client_key()
    gateway.reload()
    return api_key, openai.OpenAI(base_url=gateway.url, api_key=plain, max_retries=0)


def test_responses_create_answers_with_output_items_usage_and_one_priced_row(
    world, gateway, fake_upstream
):
    _, client = world
    fake_upstream.reply("POST", UPSTREAM, json_body=chat_completion(MODEL, "Hi there", **USAGE))
    raw = client.responses.with_raw_response.create(
        model=MODEL, instructions="Be brief.", input="Hello", store=False
    )
    response = raw.parse()
    assert response.id.startswith("resp_") and response.status == "completed"
    assert response.output_text == "Hi there"
    assert response.usage.input_tokens == 1000 and response.usage.output_tokens == 200
    assert response.usage.input_tokens_details.cached_tokens == 400
    sent = fake_upstream.received(UPSTREAM)[0].json()
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
    ]
    assert "store" not in sent and "instructions" not in sent
    gateway.flush_ledger()
    entry = LedgerEntry.objects.get()
    assert entry.request_id == raw.headers["x-request-id"]
    assert (entry.endpoint, entry.outcome, entry.cached_tokens) == ("responses", "ok", 400)
    # 600 x 1 + 400 x 0.5 + 200 x 2 per 1M tokens
    assert entry.cost == Decimal("0.0012")


def test_a_streamed_response_gives_the_text_and_completes(world, gateway, fake_upstream):
    _, client = world
    fake_upstream.stream(UPSTREAM, chat_chunks(MODEL, ["Hel", "lo"], USAGE))
    stream = client.responses.create(model=MODEL, input="Hello", stream=True)
    events = list(stream)
    kinds = [event.type for event in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    completed = events[-1].response
    assert completed.output_text == "Hello" and completed.usage.output_tokens == 200
    gateway.flush_ledger()
    assert LedgerEntry.objects.get().streamed is True


def test_the_stream_helper_accumulates_a_function_call_split_over_many_deltas(world, fake_upstream):
    _, client = world
    pieces = ['{"com', 'mand": ["l', 's", "-la"', "]}"]
    fake_upstream.stream(UPSTREAM, tool_call_chunks(MODEL, [("call_7", "shell", pieces)], USAGE))
    with client.responses.stream(model=MODEL, input="List files", tools=[SHELL]) as stream:
        final = stream.get_final_response()
    call = final.output[0]
    assert (call.type, call.call_id, call.name) == ("function_call", "call_7", "shell")
    assert json.loads(call.arguments) == {"command": ["ls", "-la"]}


def test_a_function_tool_over_two_turns_as_codex_sends_them(world, fake_upstream):
    _, client = world
    fake_upstream.reply(
        "POST",
        UPSTREAM,
        json_body=tool_completion(MODEL, [("call_1", "shell", {"command": ["ls"]})]),
    )
    first = client.responses.create(model=MODEL, input="List files", tools=[SHELL], store=False)
    call = first.output[0]
    assert call.type == "function_call" and call.name == "shell"
    fake_upstream.reply("POST", UPSTREAM, json_body=chat_completion(MODEL, "Two files."))
    second = client.responses.create(
        model=MODEL,
        tools=[SHELL],
        store=False,
        input=[
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "List files"}],
            },
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": "shell",
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "a.py\nb.py"},
        ],
    )
    assert second.output_text == "Two files."
    sent = fake_upstream.received(UPSTREAM)[1].json()
    assert sent["messages"][1]["tool_calls"][0]["id"] == "call_1"
    assert sent["messages"][2] == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": "a.py\nb.py",
    }
    assert sent["tools"][0]["function"]["name"] == "shell"


def test_previous_response_id_is_a_clear_400(world):
    _, client = world
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_123")
    assert "previous_response_id" in refused.value.message


def test_a_stream_failing_mid_way_ends_with_response_failed(world, gateway, fake_upstream):
    _, client = world
    fake_upstream.stream(
        UPSTREAM, chat_chunks(MODEL, ["a", "b", "c", "d"]), fail_after=3, gap_s=0.05
    )
    events = list(client.responses.create(model=MODEL, input="Hello", stream=True))
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed" and events[-1].response.error.message
    assert "response.completed" not in [event.type for event in events]
    gateway.flush_ledger()
    assert LedgerEntry.objects.get().outcome == "stream_failed"


def test_budgets_and_rate_limits_refuse_in_openai_shape(world, gateway, fake_upstream):
    api_key, client = world
    ApiKey.objects.filter(pk=api_key.pk).update(rpm_limit=1)
    gateway.reload()
    fake_upstream.reply("POST", UPSTREAM, json_body=chat_completion(MODEL, "ok", **USAGE))
    client.responses.create(model=MODEL, input="Hi")
    with pytest.raises(openai.RateLimitError) as limited:
        client.responses.create(model=MODEL, input="Hi")
    assert limited.value.body["code"] == "rate_limit_exceeded"
    gateway.flush_ledger()
    assert LedgerEntry.objects.filter(endpoint="responses").count() == 2


def test_a_websocket_upgrade_is_refused_at_once_with_426(world, gateway):
    url = gateway.url + "/responses"
    response = httpx.get(
        url,
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    )
    assert response.status_code == 426
    assert response.json()["error"]["code"] == "upgrade_required"

"""The Anthropic Messages API through Keyaos, with the official ``anthropic`` SDK over real HTTP,
against an OpenAI-compatible fake upstream: answers, streams, tools, errors, the ledger."""

from __future__ import annotations

import threading
from decimal import Decimal

import anthropic
import httpx
import pytest

from billing.models import ApiKey, LedgerEntry
from tests.factories import make_key, make_offer, make_provider, make_world
from tests.payloads import (
    chat_chunks,
    chat_completion,
    tool_call_chunks,
    tool_completion,
)

MODEL = "deepseek/deepseek-chat"
UPSTREAM = "/ds/v1/chat/completions"
USAGE = {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200}
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.fixture
def world(gateway, fake_upstream):
    world = make_world(
        fake_upstream,
        gateway,
        slug="ds",
        prefix="ds/v1",
        model=MODEL,
        canonical_id=MODEL,
        input="1",
        output="2",
        label="ds-key",
    )
    return world.api_key, world.client_key


def client(gateway, plain: str) -> anthropic.Anthropic:
    base_url = gateway.url.removesuffix("/v1")
    return anthropic.Anthropic(base_url=base_url, auth_token=plain, api_key=None, max_retries=0)


def ask(sdk: anthropic.Anthropic, **extra):
    return sdk.messages.create(
        model=MODEL,
        max_tokens=300,
        messages=[{"role": "user", "content": "Hello"}],
        **extra,
    )


def streamed_event_names(gateway, plain: str) -> list[str]:
    """The SSE event names, in order, of a streamed Messages request sent over plain HTTP."""
    response = httpx.post(
        gateway.url + "/messages",
        headers={"Authorization": f"Bearer {plain}"},
        json={
            "model": MODEL,
            "max_tokens": 10,
            "stream": True,
            "messages": [{"role": "user", "content": "x"}],
        },
    )
    return [
        line.removeprefix("event: ")
        for line in response.text.splitlines()
        if line.startswith("event: ")
    ]


def test_messages_create_answers_in_anthropic_shape_with_one_priced_ledger_row(
    world, gateway, fake_upstream
):
    _, plain = world
    fake_upstream.reply("POST", UPSTREAM, json_body=chat_completion(MODEL, "Hi there", **USAGE))
    raw = client(gateway, plain).messages.with_raw_response.create(
        model=MODEL, max_tokens=300, messages=[{"role": "user", "content": "Hello"}]
    )
    message = raw.parse()
    assert message.id.startswith("msg_") and message.type == "message"
    assert message.role == "assistant" and message.model == MODEL
    assert [(b.type, b.text) for b in message.content] == [("text", "Hi there")]
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (1000, 200)
    assert raw.headers["x-keyaos-provider"] == "ds"
    sent = fake_upstream.received(UPSTREAM)[0].json()
    assert sent["messages"] == [{"role": "user", "content": "Hello"}]
    assert sent["max_tokens"] == 300
    gateway.flush_ledger()
    entry = LedgerEntry.objects.get()
    assert entry.request_id == raw.headers["x-request-id"]
    assert (entry.endpoint, entry.outcome, entry.status_code) == ("messages", "ok", 200)
    assert (entry.prompt_tokens, entry.completion_tokens) == (1000, 200)
    assert entry.cost == Decimal("0.0014")  # 1000 x 1 + 200 x 2 per 1M tokens


def test_the_beta_query_and_x_api_key_of_claude_code_are_accepted(world, gateway, fake_upstream):
    _, plain = world
    fake_upstream.reply("POST", UPSTREAM, json_body=chat_completion(MODEL, "ok"))
    response = httpx.post(
        gateway.url + "/messages?beta=true",
        headers={
            "x-api-key": plain,
            "anthropic-version": "2023-06-01",
            "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
        },
        json={"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]},
    )
    assert response.status_code == 200, response.text
    assert response.json()["content"][0]["text"] == "ok"
    headers = fake_upstream.received(UPSTREAM)[0].headers
    assert "anthropic-version" not in headers and "anthropic-beta" not in headers


def test_messages_stream_gives_the_text_and_the_final_usage(world, gateway, fake_upstream):
    _, plain = world
    fake_upstream.stream(UPSTREAM, chat_chunks(MODEL, ["Hel", "lo", "!"], USAGE))
    with client(gateway, plain).messages.stream(
        model=MODEL, max_tokens=300, messages=[{"role": "user", "content": "Hello"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello!"
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (1000, 200)
    gateway.flush_ledger()
    entry = LedgerEntry.objects.get()
    assert (entry.endpoint, entry.outcome, entry.streamed) == ("messages", "ok", True)
    assert entry.usage_source == "reported" and entry.cost == Decimal("0.0014")


def test_tool_use_over_two_turns(world, gateway, fake_upstream):
    _, plain = world
    sdk = client(gateway, plain)
    fake_upstream.reply(
        "POST",
        UPSTREAM,
        json_body=tool_completion(MODEL, [("call_1", "get_weather", {"city": "Paris"})]),
    )
    first = sdk.messages.create(
        model=MODEL,
        max_tokens=300,
        tools=[WEATHER],
        tool_choice={"type": "auto"},
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    )
    assert first.stop_reason == "tool_use"
    call = first.content[0]
    assert (call.type, call.id, call.name, call.input) == (
        "tool_use",
        "call_1",
        "get_weather",
        {"city": "Paris"},
    )
    fake_upstream.reply("POST", UPSTREAM, json_body=chat_completion(MODEL, "Sunny, 21 C."))
    second = sdk.messages.create(
        model=MODEL,
        max_tokens=300,
        tools=[WEATHER],
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [block.model_dump() for block in first.content]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "21 C"}],
            },
        ],
    )
    assert second.content[0].text == "Sunny, 21 C."
    sent = fake_upstream.received(UPSTREAM)[1].json()
    assert sent["messages"][1]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "Paris"}',
    }
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}
    assert sent["tools"][0]["function"]["parameters"] == WEATHER["input_schema"]


def test_a_streamed_tool_call_split_over_many_deltas_arrives_whole(world, gateway, fake_upstream):
    _, plain = world
    pieces = ['{"ci', 'ty"', ': "Pa', "ris", '"}']
    fake_upstream.stream(UPSTREAM, tool_call_chunks(MODEL, [("call_9", "get_weather", pieces)]))
    with client(gateway, plain).messages.stream(
        model=MODEL,
        max_tokens=300,
        tools=[WEATHER],
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in final.content] == [
        ("tool_use", "get_weather", {"city": "Paris"})
    ]


def test_count_tokens_counts_system_tools_and_messages_and_records_nothing(world, gateway):
    _, plain = world
    sdk = client(gateway, plain)
    messages = [{"role": "user", "content": "Hello there, how are you?"}]
    bare = sdk.messages.count_tokens(model=MODEL, messages=messages).input_tokens
    full = sdk.messages.count_tokens(
        model=MODEL, messages=messages, system="You are terse. " * 20, tools=[WEATHER]
    ).input_tokens
    assert 0 < bare < full
    gateway.flush_ledger()
    assert not LedgerEntry.objects.exists()


def test_errors_are_in_anthropic_shape_auth_and_limits_included(world, gateway, fake_upstream):
    api_key, plain = world
    with pytest.raises(anthropic.AuthenticationError) as denied:
        ask(client(gateway, "sk-keyaos-wrong"))
    assert denied.value.body["type"] == "error"
    assert denied.value.body["error"]["type"] == "authentication_error"
    assert denied.value.response.headers["x-request-id"].startswith("req_")
    with pytest.raises(anthropic.NotFoundError) as missing:
        client(gateway, plain).messages.create(
            model="nobody/nothing", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        client(gateway, plain).messages.create(model=MODEL, max_tokens=5, messages=[])
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    ApiKey.objects.filter(pk=api_key.pk).update(budget_usd=Decimal("0.000001"), rpm_limit=1)
    gateway.reload()
    fake_upstream.reply("POST", UPSTREAM, json_body=chat_completion(MODEL, "ok", **USAGE))
    ask(client(gateway, plain))
    with pytest.raises(anthropic.RateLimitError) as limited:
        ask(client(gateway, plain))
    assert limited.value.body["error"]["type"] == "rate_limit_error"
    gateway.flush_ledger()
    assert LedgerEntry.objects.filter(endpoint="messages").count() == 4


def test_an_upstream_refusing_the_request_is_told_in_anthropic_shape(world, gateway, fake_upstream):
    _, plain = world
    fake_upstream.reply(
        "POST", UPSTREAM, status=400, json_body={"error": {"message": "Unknown parameter: x"}}
    )
    with pytest.raises(anthropic.BadRequestError) as refused:
        ask(client(gateway, plain))
    assert refused.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "Unknown parameter: x"},
    }


def test_a_stream_failing_mid_way_ends_with_an_error_event(world, gateway, fake_upstream):
    _, plain = world
    fake_upstream.stream(
        UPSTREAM, chat_chunks(MODEL, ["a", "b", "c", "d"]), fail_after=3, gap_s=0.05
    )
    events = streamed_event_names(gateway, plain)
    assert events[0] == "message_start" and events[-1] == "error"
    assert "message_stop" not in events
    gateway.flush_ledger()
    assert LedgerEntry.objects.get().outcome == "stream_failed"


def test_many_messages_in_flight_with_an_upstream_failing_some(world, gateway, fake_upstream):
    _, plain = world
    backup = make_provider("backup", fake_upstream.url("backup/v1"))
    make_offer(backup, MODEL, canonical_id=MODEL, input="5", output="5")
    make_key(backup, "sk-backup-" + "b" * 30)
    gateway.reload()
    counter = iter(range(10_000))
    lock = threading.Lock()

    def flaky(_request):
        from tests.fake_upstream import Reply

        with lock:
            number = next(counter)
        if number % 3 == 0:
            return Reply(status=500, json_body={"error": {"message": "boom"}})
        return Reply(json_body=chat_completion(MODEL, "ok", **USAGE))

    fake_upstream.handle("POST", UPSTREAM, flaky)
    fake_upstream.reply(
        "POST", "/backup/v1/chat/completions", json_body=chat_completion(MODEL, "ok", **USAGE)
    )
    sdk = client(gateway, plain)
    results: list[str] = []

    def worker():
        for _ in range(5):
            results.append(ask(sdk).content[0].text)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == ["ok"] * 30
    gateway.flush_ledger()
    assert LedgerEntry.objects.filter(endpoint="messages", outcome="ok").count() == 30


def test_models_are_listed_in_anthropic_shape_when_anthropic_version_is_sent(world, gateway):
    _, plain = world
    page = client(gateway, plain).models.list()
    assert [model.id for model in page.data] == [MODEL]
    assert page.data[0].type == "model" and page.data[0].display_name
    plain_list = httpx.get(gateway.url + "/models", headers={"Authorization": f"Bearer {plain}"})
    assert plain_list.json()["object"] == "list"


def test_head_on_the_base_url_answers_200(gateway):
    assert httpx.head(gateway.url.removesuffix("/v1") + "/").status_code == 200


def test_thinking_becomes_reasoning_where_the_upstream_has_the_parameter(
    world, gateway, fake_upstream
):
    _, plain = world
    fake_upstream.reply("POST", UPSTREAM, json_body=chat_completion(MODEL, "plain"))
    thinking = {"type": "enabled", "budget_tokens": 2048}
    ask(client(gateway, plain), thinking=thinking)
    assert "reasoning" not in fake_upstream.received(UPSTREAM)[0].json()
    router = make_provider("openrouter", fake_upstream.url("or"), preset="openrouter")
    make_offer(router, MODEL, canonical_id=MODEL, input="0.1", output="0.1")
    make_key(router, "sk-or-v1-" + "r" * 40)
    gateway.reload()
    fake_upstream.reply("POST", "/or/chat/completions", json_body=chat_completion(MODEL, "or"))
    assert ask(client(gateway, plain), thinking=thinking).content[0].text == "or"
    sent = fake_upstream.received("/or/chat/completions")[0].json()
    assert sent["reasoning"] == {"max_tokens": 2048}
    assert "thinking" not in sent


def test_a_slow_upstream_gets_message_start_at_once_and_pings_while_silent(
    world, gateway, fake_upstream, monkeypatch
):
    from routing.protocols import anthropic as protocol

    monkeypatch.setattr(protocol, "PING_INTERVAL_S", 0.2)
    _, plain = world
    fake_upstream.stream(UPSTREAM, chat_chunks(MODEL, ["late"], USAGE), first_delay_s=1.5)
    kinds = streamed_event_names(gateway, plain)
    assert kinds[0] == "message_start"
    silent = kinds[1 : kinds.index("content_block_start")]
    assert set(silent) == {"ping"} and len(silent) >= 3  # the opening ping, then one per 0.2 s
    assert kinds[-1] == "message_stop"

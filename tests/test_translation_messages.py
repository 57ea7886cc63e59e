"""Golden tests of the Messages <-> chat-completions translation (pure functions), on request
shapes Claude Code sends (written from its public documentation and published captures)."""

from __future__ import annotations

import json

import pytest

from keyaos.lib.errors import GatewayError
from routing.protocols.anthropic import MESSAGES, from_chat, input_tokens, to_chat
from tests.fake_upstream import sse, translate_stream
from tests.payloads import chat_chunks, chunk, tool_call_chunks

MODEL = "anthropic/claude-sonnet-4.5"
LONG_TOOL = "mcp__github_enterprise_server__list_pull_request_review_comments_for_repo"

# A Claude Code turn: system blocks with cache_control (the attribution line first), tools with
# cache_control, metadata, adaptive thinking, and fields no chat upstream knows.
CLAUDE_CODE_TURN = {
    "model": MODEL,
    "max_tokens": 32000,
    "stream": True,
    "system": [
        {
            "type": "text",
            "text": "x-anthropic-billing-header: cc_version=2.1.69; cc_entrypoint=cli",
        },
        {
            "type": "text",
            "text": "You are Claude Code, Anthropic's official CLI for Claude.",
            "cache_control": {"type": "ephemeral"},
        },
    ],
    "messages": [
        {"role": "user", "content": "<system-reminder>Tools are deferred.</system-reminder>"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this screenshot?"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"},
                },
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Let me look.", "signature": "sig"},
                {"type": "text", "text": "I will read the file."},
                {
                    "type": "tool_use",
                    "id": "toolu_01",
                    "name": "Read",
                    "input": {"file_path": "/src/app.py"},
                },
                {"type": "tool_use", "id": "toolu_02", "name": LONG_TOOL, "input": {"pr": 7}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01",
                    "content": [{"type": "text", "text": "print('hi')"}],
                    "cache_control": {"type": "ephemeral"},
                },
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_02",
                    "content": "not found",
                    "is_error": True,
                },
                {"type": "text", "text": "Go on."},
            ],
        },
    ],
    "tools": [
        {
            "name": "Read",
            "description": "Reads a file.",
            "input_schema": {
                "type": "object",
                "properties": {"file_path": {"type": "string"}},
                "required": ["file_path"],
            },
            "cache_control": {"type": "ephemeral"},
        },
        {"name": LONG_TOOL, "input_schema": {"type": "object", "properties": {}}},
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
    ],
    "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
    "metadata": {"user_id": "user_abc_account_def_session_ghi"},
    "thinking": {"type": "adaptive"},
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "output_config": {"effort": "medium"},
    "top_k": 5,
    "temperature": 1,
}


def test_a_claude_code_turn_becomes_this_chat_request():
    chat, translation = to_chat(CLAUDE_CODE_TURN)
    short = next(iter(translation.tool_names))
    assert len(short) == 64 and translation.tool_names == {short: LONG_TOOL}
    assert chat == {
        "model": MODEL,
        "messages": [
            {
                "role": "system",
                "content": "x-anthropic-billing-header: cc_version=2.1.69; cc_entrypoint=cli\n\n"
                "You are Claude Code, Anthropic's official CLI for Claude.",
            },
            {"role": "user", "content": "<system-reminder>Tools are deferred.</system-reminder>"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this screenshot?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                ],
            },
            {
                "role": "assistant",
                "content": "I will read the file.",
                "tool_calls": [
                    {
                        "id": "toolu_01",
                        "type": "function",
                        "function": {"name": "Read", "arguments": '{"file_path": "/src/app.py"}'},
                    },
                    {
                        "id": "toolu_02",
                        "type": "function",
                        "function": {"name": short, "arguments": '{"pr": 7}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_01", "content": "print('hi')"},
            {"role": "tool", "tool_call_id": "toolu_02", "content": "Error: not found"},
            {"role": "user", "content": "Go on."},
        ],
        "max_tokens": 32000,
        "temperature": 1,
        "user": "user_abc_account_def_session_ghi",
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "Read",
                    "description": "Reads a file.",
                    "parameters": CLAUDE_CODE_TURN["tools"][0]["input_schema"],
                },
            },
            {
                "type": "function",
                "function": {"name": short, "parameters": {"type": "object", "properties": {}}},
            },
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert translation.reasoning == {"enabled": True}


def test_the_system_prompt_is_always_first_and_a_string_system_works():
    chat, _ = to_chat(
        {
            "model": MODEL,
            "max_tokens": 10,
            "system": "Be brief.",
            "messages": [{"role": "user", "content": "Hi"}],
        }
    )
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "Read"}, {"type": "function", "function": {"name": "Read"}}),
    ],
)
def test_tool_choice_translates(choice, expected):
    chat, _ = to_chat(
        {
            "model": MODEL,
            "max_tokens": 10,
            "messages": [{"role": "user", "content": "Hi"}],
            "tools": [{"name": "Read", "input_schema": {"type": "object"}}],
            "tool_choice": choice,
        }
    )
    assert chat["tool_choice"] == expected


@pytest.mark.parametrize(
    "body",
    [
        {"max_tokens": 10, "messages": [{"role": "user", "content": "x"}]},
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
        {"model": MODEL, "max_tokens": 10, "messages": []},
        {"model": MODEL, "max_tokens": 10, "messages": [{"role": "robot", "content": "x"}]},
        {
            "model": MODEL,
            "max_tokens": 10,
            "messages": [{"role": "assistant", "content": [{"type": "thinking", "thinking": "."}]}],
        },
        {
            "model": MODEL,
            "max_tokens": 10,
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"name": "a", "input_schema": {}}],
            "tool_choice": {"type": "sometimes"},
        },
    ],
    ids=["no-model", "no-max-tokens", "no-messages", "bad-role", "empty-after", "bad-choice"],
)
def test_bad_requests_are_refused_with_a_400(body):
    with pytest.raises(GatewayError) as refused:
        to_chat(body)
    assert refused.value.status == 400


def test_count_tokens_grows_with_system_tools_and_tool_inputs():
    base = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}]}
    tokens = input_tokens(base)
    assert tokens > 0
    assert input_tokens({**base, "system": "A long system prompt. " * 10}) > tokens
    assert input_tokens({**base, "tools": CLAUDE_CODE_TURN["tools"]}) > tokens
    assert input_tokens(CLAUDE_CODE_TURN) > input_tokens({**CLAUDE_CODE_TURN, "tools": []})


def translation_of(**extra):
    _, translation = to_chat(
        {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "x"}], **extra}
    )
    translation.message_id = "msg_test"
    return translation


def test_an_answer_with_reasoning_text_and_tool_calls_becomes_these_blocks():
    chat = {
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "reasoning_content": "Thinking it over.",
                    "content": "Reading it.",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "Read", "arguments": '{"file_path": "a"}'},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {
            "prompt_tokens": 100,
            "completion_tokens": 20,
            "prompt_tokens_details": {"cached_tokens": 60},
        },
    }
    assert from_chat(chat, translation_of()) == {
        "id": "msg_test",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [
            {"type": "thinking", "thinking": "Thinking it over.", "signature": ""},
            {"type": "text", "text": "Reading it."},
            {"type": "tool_use", "id": "call_1", "name": "Read", "input": {"file_path": "a"}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 40,
            "output_tokens": 20,
            "cache_read_input_tokens": 60,
            "cache_creation_input_tokens": 0,
        },
    }


@pytest.mark.parametrize(
    ("choice", "stop"),
    [
        ({"finish_reason": "stop"}, ("end_turn", None)),
        ({"finish_reason": "length"}, ("max_tokens", None)),
        ({"finish_reason": "content_filter"}, ("refusal", None)),
        ({"finish_reason": "stop", "stop_reason": "END"}, ("stop_sequence", "END")),
    ],
)
def test_finish_reasons_become_stop_reasons(choice, stop):
    chat = {"choices": [{"message": {"content": "x"}, **choice}]}
    answer = from_chat(chat, translation_of(stop_sequences=["END"]))
    assert (answer["stop_reason"], answer["stop_sequence"]) == stop
    assert answer["usage"]["input_tokens"] == 0  # never missing, even without usage


def run_stream(events: list[bytes], *, split: int | None = None, **extra):
    request = MESSAGES.parse(
        json.dumps(
            {
                "model": MODEL,
                "max_tokens": 10,
                "stream": True,
                "messages": [{"role": "user", "content": "Hello there"}],
                **extra,
            }
        ).encode()
    )
    request.context.message_id = "msg_test"
    stream = MESSAGES.stream_translator(request)
    return translate_stream(stream, events, split), stream


USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}


@pytest.mark.parametrize("split", [None, 7, 1])
def test_a_text_stream_becomes_the_exact_event_sequence(split):
    events, stream = run_stream(chat_chunks(MODEL, ["Hel", "lo"], USAGE), split=split)
    assert events == [
        {
            "type": "message_start",
            "message": {
                "id": "msg_test",
                "type": "message",
                "role": "assistant",
                "model": MODEL,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": events[0]["message"]["usage"]["input_tokens"],
                    "output_tokens": 0,
                    "cache_read_input_tokens": 0,
                    "cache_creation_input_tokens": 0,
                },
            },
        },
        {"type": "ping"},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {
                "input_tokens": 11,
                "output_tokens": 3,
                "cache_read_input_tokens": 0,
                "cache_creation_input_tokens": 0,
            },
        },
        {"type": "message_stop"},
    ]
    assert events[0]["message"]["usage"]["input_tokens"] > 0  # the estimate, never zero
    assert stream.done and not stream.error and stream.usage.prompt_tokens == 11


def test_a_tool_call_split_over_many_deltas_is_one_block_of_json_deltas():
    pieces = ['{"fi', "le_pa", 'th": ', '"a.py"', "}"]
    events, _ = run_stream(
        tool_call_chunks(MODEL, [("call_1", "Read", pieces), ("call_2", "Grep", ["{}"])], USAGE),
        split=5,
    )
    kinds = [(e["type"], e.get("index")) for e in events]
    assert kinds == [
        ("message_start", None),
        ("ping", None),
        ("content_block_start", 0),
        *[("content_block_delta", 0)] * 5,
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert events[2]["content_block"] == {
        "type": "tool_use",
        "id": "call_1",
        "name": "Read",
        "input": {},
    }
    partial = "".join(
        e["delta"]["partial_json"] for e in events if e.get("index") == 0 and "delta" in e
    )
    assert json.loads(partial) == {"file_path": "a.py"}
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


def test_a_long_tool_name_comes_back_as_the_client_sent_it():
    tools = [{"name": LONG_TOOL, "input_schema": {"type": "object"}}]
    request = MESSAGES.parse(
        json.dumps(
            {
                "model": MODEL,
                "max_tokens": 5,
                "stream": True,
                "tools": tools,
                "messages": [{"role": "user", "content": "x"}],
            }
        ).encode()
    )
    short = request.body["tools"][0]["function"]["name"]
    events, _ = run_stream(tool_call_chunks(MODEL, [("c", short, ["{}"])]), tools=tools)
    assert events[2]["content_block"]["name"] == LONG_TOOL


def test_reasoning_then_text_are_two_blocks_and_length_is_max_tokens():
    payloads = [
        chunk(MODEL, {"reasoning_content": "Hmm."}),
        chunk(MODEL, {"content": "Answer"}),
        chunk(MODEL, {}, "length", usage=USAGE),  # usage in the last chunk
    ]
    events, stream = run_stream(sse(*payloads))
    starts = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    assert starts == ["thinking", "text"]
    assert events[3]["delta"] == {"type": "thinking_delta", "thinking": "Hmm."}
    assert events[-2]["delta"]["stop_reason"] == "max_tokens"
    assert events[-2]["usage"]["output_tokens"] == 3 and stream.usage.completion_tokens == 3


def test_an_error_inside_the_stream_ends_it_with_an_error_event():
    payloads = [chunk(MODEL, {"content": "Hi"}), {"error": {"message": "overloaded"}}]
    events, stream = run_stream(sse(*payloads))
    assert events[-1] == {
        "type": "error",
        "error": {"type": "api_error", "message": "overloaded"},
    }
    assert stream.error == "overloaded"
    assert "message_stop" not in [e["type"] for e in events]


def test_a_stream_cut_before_its_finish_ends_with_an_error_event():
    events, stream = run_stream(sse(chunk(MODEL, {"content": "Hi"}), done=False))
    assert events[-1]["type"] == "error" and stream.error


def test_a_failure_before_the_first_chunk_still_starts_the_message():
    body = {
        "model": MODEL,
        "max_tokens": 5,
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
    }
    stream = MESSAGES.stream_translator(MESSAGES.parse(json.dumps(body).encode()))
    out = stream.fail(GatewayError(502, "upstream failed mid-stream"), "req_1")
    names = [line for line in out.decode().splitlines() if line.startswith("event")]
    assert names == ["event: message_start", "event: ping", "event: error"]


def test_text_with_quotes_escapes_and_unicode_arrives_unchanged():
    words = ['say "hi"\n', "ü\\ ", "\u2028 😀"]
    events, _ = run_stream(chat_chunks(MODEL, words, USAGE), split=3)
    texts = [e["delta"]["text"] for e in events if e["type"] == "content_block_delta"]
    assert texts == words


@pytest.mark.parametrize(
    "text",
    ["word ", "", 'say "hi"', "back\\slash\\", 'end \\"quoted\\"', "é ✓ \n\t", "\\", '"'],
)
def test_the_text_fast_path_splices_exactly_the_json_string_the_chunk_holds(text):
    from routing.protocols.translated import only_text

    payload = json.dumps(
        {"id": "c", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    ).encode()
    assert json.loads(only_text(payload)) == text


@pytest.mark.parametrize(
    "delta",
    [
        {"content": "a", "tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]},
        {"content": "a", "reasoning_content": "think"},
        {"content": "a", "refusal": "no"},
    ],
)
def test_a_chunk_with_more_than_text_takes_the_parsing_path(delta):
    from routing.protocols.translated import only_text

    payload = json.dumps({"choices": [{"delta": delta, "finish_reason": None}]}).encode()
    assert only_text(payload) is None
    assert only_text(payload.replace(b"null", b'"stop"')) is None

"""Golden tests of the Responses <-> chat-completions translation (pure functions), on the request
shape Codex sends (written from its public documentation: stateless, the whole transcript)."""

from __future__ import annotations

import json

import pytest

from keyaos.lib.errors import GatewayError
from routing.protocols.responses import RESPONSES, from_chat, to_chat
from tests.fake_upstream import sse, translate_stream
from tests.payloads import chat_chunks, chunk, tool_call_chunks

MODEL = "openai/gpt-5-codex"
SHELL_PARAMETERS = {
    "type": "object",
    "properties": {"command": {"type": "array", "items": {"type": "string"}}},
    "required": ["command"],
}
CODEX_TURN = {
    "model": MODEL,
    "instructions": "You are Codex, a coding agent.",
    "input": [
        {
            "type": "message",
            "role": "developer",
            "content": [
                {"type": "input_text", "text": "<permissions>workspace-write</permissions>"}
            ],
        },
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "<environment_context>cwd=/repo"}],
        },
        {"role": "user", "content": "Fix the failing test."},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAA"},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Looking at the tests."}],
        },
        {
            "type": "function_call",
            "name": "shell",
            "arguments": '{"command":["pytest","-x"]}',
            "call_id": "call_1",
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "1 failed"},
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "Here is the screenshot."},
                {
                    "type": "input_image",
                    "image_url": "data:image/png;base64,iVBO",
                    "detail": "auto",
                },
            ],
        },
    ],
    "tools": [
        {
            "type": "function",
            "name": "shell",
            "description": "Runs a shell command.",
            "strict": False,
            "parameters": SHELL_PARAMETERS,
        },
        {"type": "custom", "name": "apply_patch", "description": "Applies a patch."},
        {"type": "web_search"},
    ],
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "reasoning": {"effort": "medium", "summary": "auto"},
    "store": False,
    "stream": True,
    "include": ["reasoning.encrypted_content"],
    "prompt_cache_key": "5f1e0d3c-conversation",
    "text": {"verbosity": "medium"},
}


def test_a_codex_turn_becomes_this_chat_request():
    chat, translation = to_chat(CODEX_TURN)
    assert chat == {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are Codex, a coding agent."},
            {"role": "system", "content": "<permissions>workspace-write</permissions>"},
            {"role": "user", "content": "<environment_context>cwd=/repo"},
            {"role": "user", "content": "Fix the failing test."},
            {
                "role": "assistant",
                "content": "Looking at the tests.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "shell", "arguments": '{"command":["pytest","-x"]}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "1 failed"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Here is the screenshot."},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,iVBO", "detail": "auto"},
                    },
                ],
            },
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "shell",
                    "description": "Runs a shell command.",
                    "parameters": SHELL_PARAMETERS,
                    "strict": False,
                },
            }
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert translation.reasoning == {"effort": "medium"}


def test_structured_output_becomes_a_response_format():
    chat, _ = to_chat(
        {
            "model": MODEL,
            "input": "x",
            "text": {"format": {"type": "json_schema", "name": "r", "schema": {}, "strict": True}},
        }
    )
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "r", "schema": {}, "strict": True},
    }


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL, "input": "x", "previous_response_id": "resp_1"},
        {"input": "x"},
        {"model": MODEL},
        {"model": MODEL, "input": [{"type": "reasoning", "summary": []}]},
        {"model": MODEL, "input": [{"role": "robot", "content": "x"}]},
        {"model": MODEL, "input": "x", "max_output_tokens": 0},
    ],
    ids=["previous-response", "no-model", "no-input", "empty-after", "bad-role", "bad-max"],
)
def test_bad_requests_are_refused_with_a_400(body):
    with pytest.raises(GatewayError) as refused:
        to_chat(body)
    assert refused.value.status == 400


def test_an_answer_with_text_and_a_call_becomes_output_items():
    _, translation = to_chat({"model": MODEL, "input": "x", "max_output_tokens": 50})
    chat = {
        "choices": [
            {
                "message": {
                    "content": "Running it.",
                    "tool_calls": [
                        {"id": "call_2", "function": {"name": "shell", "arguments": "{}"}}
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
    }
    answer = from_chat(chat, translation)
    message, call = answer["output"]
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"] == [
        {"type": "output_text", "text": "Running it.", "annotations": [], "logprobs": []}
    ]
    assert (call["type"], call["call_id"], call["name"], call["arguments"]) == (
        "function_call",
        "call_2",
        "shell",
        "{}",
    )
    assert answer["status"] == "completed" and answer["max_output_tokens"] == 50
    assert answer["usage"] == {
        "input_tokens": 9,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 4,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 13,
    }


def run_stream(events: list[bytes], *, split: int | None = None) -> tuple[list[dict], object]:
    body = {"model": MODEL, "input": "Hello", "stream": True, "tools": CODEX_TURN["tools"]}
    request = RESPONSES.parse(json.dumps(body).encode())
    stream = RESPONSES.stream_translator(request)
    parsed = translate_stream(stream, events, split)
    assert [p["sequence_number"] for p in parsed] == list(range(len(parsed)))
    return parsed, stream


USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}


@pytest.mark.parametrize("split", [None, 9])
def test_text_then_a_call_split_over_deltas_is_this_event_sequence(split):
    events, stream = run_stream(
        tool_call_chunks(MODEL, [("call_1", "shell", ['{"comm', 'and": []}'])], USAGE, text="Ok"),
        split=split,
    )
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert (
        events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    )
    assert events[8]["output_index"] == 1 and events[8]["item"]["call_id"] == "call_1"
    assert events[11]["arguments"] == '{"command": []}'
    done = events[-1]["response"]
    assert [item["type"] for item in done["output"]] == ["message", "function_call"]
    assert done["usage"]["output_tokens"] == 3 and stream.done


def test_a_length_finish_with_usage_in_the_last_chunk_is_incomplete():
    events, stream = run_stream(
        chat_chunks(MODEL, ["a", "b"], USAGE, finish="length", usage_in_last_chunk=True)
    )
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert stream.usage.completion_tokens == 3


def test_an_upstream_error_or_a_cut_stream_ends_with_response_failed():
    events, stream = run_stream(sse(chunk(MODEL, {"content": "a"}), {"error": {"message": "boom"}}))
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"] == {"code": "server_error", "message": "boom"}
    events, stream = run_stream(sse(chunk(MODEL, {"content": "a"}), done=False))
    assert events[-1]["type"] == "response.failed" and stream.error


def test_text_with_quotes_escapes_and_unicode_arrives_unchanged():
    words = ['say "hi"\n', "ü\\ ", "\u2028 😀"]
    events, _ = run_stream(chat_chunks(MODEL, words, USAGE), split=4)
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == words
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "".join(words)

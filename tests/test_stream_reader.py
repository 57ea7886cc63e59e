"""The SSE reader on the streaming hot path: bytes pass through unchanged wherever the upstream
splits them, and only usage, errors and the end of the stream are read."""

from __future__ import annotations

import json

import pytest

from routing.sse import StreamReader


def event(payload: dict | str, newline: str = "\n") -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}{newline}{newline}".encode()


def chunk(content: str) -> dict:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": content}}],
    }


USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
USAGE_ONLY = event({"object": "chat.completion.chunk", "choices": [], "usage": USAGE})
STREAM = [
    event(chunk("Hel")),
    event(chunk('lo "quoted" [DONE] \\"usage\\": {')),
    event(chunk("!")),
    USAGE_ONLY,
    event("[DONE]"),
]


def read(pieces: list[bytes], *, drop_usage_only: bool = False) -> tuple[bytes, StreamReader]:
    reader = StreamReader(drop_usage_only=drop_usage_only)
    out = b"".join(reader.feed(piece) for piece in pieces) + reader.close()
    return out, reader


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_every_split_of_the_bytes_gives_the_same_answer(newline):
    whole = b"".join(
        event(json.loads(e[6:]) if e[6:7] == b"{" else "[DONE]", newline) for e in STREAM
    )
    expected, reference = read([whole])
    assert expected == whole
    for split in range(1, len(whole)):
        out, reader = read([whole[:split], whole[split:]])
        assert out == whole, split
        assert (reader.usage, reader.text_chars, reader.done) == (
            reference.usage,
            reference.text_chars,
            reference.done,
        )


def test_usage_is_read_and_text_in_content_is_never_mistaken_for_events():
    out, reader = read(STREAM)

    assert out == b"".join(STREAM)
    assert (reader.usage.prompt_tokens, reader.usage.completion_tokens) == (7, 3)
    assert reader.done
    assert (
        reader.text_chars == len("Hel") + len('lo \\"quoted\\" [DONE] \\\\\\"usage\\\\\\": {') + 1
    )
    assert reader.error == ""


def test_a_usage_only_chunk_the_client_did_not_ask_for_is_dropped_alone():
    out, reader = read([b"".join(STREAM)], drop_usage_only=True)

    assert out == b"".join(e for e in STREAM if e is not USAGE_ONLY)
    assert reader.usage.total_tokens == 10


def test_content_that_only_looks_like_the_end_does_not_end_the_stream():
    _, reader = read(STREAM[:3])

    assert not reader.done and reader.usage is None


def test_an_error_event_is_read_and_forwarded():
    error = event({"error": {"message": "overloaded", "code": 529}})
    out, reader = read([STREAM[0] + error])

    assert out == STREAM[0] + error
    assert "overloaded" in reader.error


def test_a_last_event_without_its_blank_line_is_still_forwarded_at_the_end():
    out, reader = read([STREAM[0], b"data: [DONE]"])

    assert out == STREAM[0] + b"data: [DONE]"
    assert reader.done

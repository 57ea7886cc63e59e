"""Reading an OpenAI-style SSE stream on the hot path, without re-serializing it.

Whole events pass through byte for byte wherever the upstream splits them; only the few that
matter (usage, an error, ``[DONE]``) are found by a plain bytes search, cut out and read.
"""

from __future__ import annotations

import re

from billing.usage import Usage, parse_usage_json
from providers.upstream import upstream_message

_EVENT_END = re.compile(rb"\r?\n\r?\n")
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_TEXT_FIELD = re.compile(
    rb'"(?:content|text|reasoning|reasoning_content)"\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"'
)
_ERROR_EVENT = re.compile(rb'^data:\s*\{\s*"error"')
_DONE_EVENT = re.compile(rb"^data:\s*\[DONE\]")
# Bytes that only an event worth reading holds (usage, an error, the end of the stream); a
# plain bytes search for them is far faster than any regex over every event.
_NOTABLE = (b'"usage"', b'"error"', b"[DONE]")


class StreamReader:
    """Splits SSE bytes into whole events, reads usage once, drops what the client did not ask for.

    Whole events pass through byte for byte; only the few that matter (usage, an error,
    ``[DONE]``) are cut out and read, found by a plain bytes search over what arrived.
    """

    def __init__(self, *, drop_usage_only: bool) -> None:
        self.drop_usage_only = drop_usage_only
        self.buffer = b""
        self.usage: Usage | None = None
        self.text_chars = 0
        self.error = ""
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        data = self.buffer + chunk if self.buffer else chunk
        end = _last_event_end(data)
        self.buffer = data[end:]
        return self._forward(data[:end]) if end else b""

    def close(self) -> bytes:
        tail, self.buffer = self.buffer, b""
        if not tail.strip():
            return b""
        return self._forward(tail)

    def _forward(self, events: bytes) -> bytes:
        """``events`` holds whole events; returns them without the ones to drop."""
        self.text_chars += sum(len(text) for text in _TEXT_FIELD.findall(events))
        dropped = []
        read_until = 0
        for index in _notable_positions(events):
            if index < read_until:
                continue
            begin, read_until = _event_bounds(events, index)
            if not self._keep(events[begin:read_until]):
                dropped.append((begin, read_until))
        if not dropped:
            return events
        parts, position = [], 0
        for begin, end in dropped:
            parts.append(events[position:begin])
            position = end
        parts.append(events[position:])
        return b"".join(parts)

    def _keep(self, event: bytes) -> bool:
        if _DONE_EVENT.match(event):
            self.done = True
            return True
        if _ERROR_EVENT.match(event):
            self.error = upstream_message(event.split(b":", 1)[1])
        if not _USAGE_OBJECT.search(event):
            return True
        usage = parse_usage_json(event.split(b":", 1)[1].strip())
        if usage is not None:
            self.usage = usage  # a repeated usage event replaces, never adds
        return not (self.drop_usage_only and _EMPTY_CHOICES.search(event))


def _last_event_end(data: bytes, before: int | None = None) -> int:
    """Where the last whole event in ``data[:before]`` ends (after its blank line), or 0."""
    lf = data.rfind(b"\n\n", 0, before)
    crlf = data.rfind(b"\n\r\n", 0, before)
    return max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)


def _notable_positions(events: bytes) -> list[int]:
    positions = []
    for needle in _NOTABLE:
        index = events.find(needle)
        while index >= 0:
            positions.append(index)
            index = events.find(needle, index + 1)
    return sorted(positions)


def _event_bounds(events: bytes, index: int) -> tuple[int, int]:
    """The start and end of the event that holds ``events[index]``."""
    following = _EVENT_END.search(events, index)
    return _last_event_end(events, index), following.end() if following else len(events)


def text_chars(content: bytes) -> int:
    return sum(len(match.group(1)) for match in _TEXT_FIELD.finditer(content))


def events_of(data: bytes) -> tuple[list[bytes], bytes]:
    """The ``data`` payloads of the whole events in ``data``, and the incomplete rest."""
    end = _last_event_end(data)
    payloads: list[bytes] = []
    lines: list[bytes] = []
    for line in data[:end].splitlines():
        if line.startswith(b"data:"):
            lines.append(line[5:].strip())
        elif not line and lines:
            payloads.append(lines[0] if len(lines) == 1 else b"\n".join(lines))
            lines = []
    return payloads, data[end:]

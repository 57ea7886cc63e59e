"""JSON bodies decoded by a decoder made once: ``json.loads`` with a hook (``parse_float``,
``parse_constant``) builds a new ``JSONDecoder`` on every call, a measurable share of a request."""

from __future__ import annotations

import json
from typing import Any


def decode(decoder: json.JSONDecoder, raw: bytes | str) -> Any:
    """``json.loads(raw, ...)`` with ``decoder``'s hooks: bytes in any JSON encoding, or text."""
    if isinstance(raw, bytes | bytearray):
        raw = raw.decode(json.detect_encoding(raw), "surrogatepass")
    return decoder.decode(raw)

"""JSON bodies in and out of the hot path.

``decode``: with a decoder made once (``json.loads`` with a hook, ``parse_float`` or
``parse_constant``, builds a new ``JSONDecoder`` on every call, a measurable share of a request).
``encode``: compact JSON from orjson (a tenth of the standard library's CPU), or from the standard
library for what orjson refuses (a lone surrogate, an integer over 64 bits), so nothing is lost.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson


def decode(decoder: json.JSONDecoder, raw: bytes | str) -> Any:
    """``json.loads(raw, ...)`` with ``decoder``'s hooks: bytes in any JSON encoding, or text."""
    if isinstance(raw, bytes | bytearray):
        raw = raw.decode(json.detect_encoding(raw), "surrogatepass")
    return decoder.decode(raw)


def encode(value: Any) -> bytes:
    """One line of compact JSON: decimals as strings, datetimes in ISO 8601, dataclasses as
    objects. orjson writes UTF-8 (control characters escaped); the standard library's fallback
    writes ASCII (a lone surrogate kept as its escape)."""
    try:
        return orjson.dumps(value, default=_decimal_text)
    except TypeError:
        return json.dumps(value, default=_plain, separators=(",", ":")).encode()


def _decimal_text(value: Any) -> str:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return vars(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")

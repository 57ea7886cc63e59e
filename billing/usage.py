"""Token usage, as reported by an upstream or estimated when it is missing."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from keyaos.lib import jsonbody

REPORTED = "reported"
ESTIMATED = "estimated"
NONE = "none"

# A rough, download-free tokenizer: about four characters of English or code per token, one
# CJK character per token. Used only when an upstream never reported usage.
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    reported_cost: Decimal | None = None
    source: str = NONE

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def parse_usage(usage: Any) -> Usage | None:
    """Read an OpenAI-style ``usage`` object in any provider's dialect.

    Cached prompt tokens come from ``prompt_tokens_details.cached_tokens`` (OpenAI, OpenRouter,
    ZenMux) or ``prompt_cache_hit_tokens`` (DeepSeek); a reported cost from ``cost`` (OpenRouter)
    or ``estimated_cost`` (DeepInfra), both in USD.
    """
    if not isinstance(usage, dict):
        return None
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    cached = _int(usage.get("prompt_cache_hit_tokens")) or _int(prompt_details.get("cached_tokens"))
    return Usage(
        prompt_tokens=_int(usage.get("prompt_tokens")),
        completion_tokens=_int(usage.get("completion_tokens")),
        cached_tokens=cached,
        reasoning_tokens=_int(completion_details.get("reasoning_tokens")),
        reported_cost=_decimal(usage.get("cost", usage.get("estimated_cost"))),
        source=REPORTED,
    )


def parse_anthropic_usage(usage: Any) -> Usage | None:
    """Read Anthropic's ``usage``, whose ``input_tokens`` leaves out the cached parts."""
    if not isinstance(usage, dict):
        return None
    cache_read = _int(usage.get("cache_read_input_tokens"))
    cache_write = _int(usage.get("cache_creation_input_tokens"))
    return Usage(
        prompt_tokens=_int(usage.get("input_tokens")) + cache_read + cache_write,
        completion_tokens=_int(usage.get("output_tokens")),
        cached_tokens=cache_read,
        source=REPORTED,
    )


_DECIMAL_DECODER = json.JSONDecoder(parse_float=Decimal)


def parse_usage_json(raw: bytes) -> Usage | None:
    """Parse the ``usage`` of a JSON body or SSE payload, keeping costs exact."""
    try:
        payload = jsonbody.decode(_DECIMAL_DECODER, raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return parse_usage(payload.get("usage")) if isinstance(payload, dict) else None


def estimate_tokens(text_chars: int, cjk_chars: int = 0) -> int:
    return math.ceil(max(text_chars - cjk_chars, 0) / 4) + cjk_chars


def estimate_text_tokens(text: str) -> int:
    return estimate_tokens(len(text), len(_CJK.findall(text)))


def estimate_usage(*, prompt_tokens: int, completion_chars: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=estimate_tokens(completion_chars),
        source=ESTIMATED,
    )


def _int(value: Any) -> int:
    try:
        return max(int(value or 0), 0)
    except (TypeError, ValueError):
        return 0


def _decimal(value: Any) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = Decimal(str(value))
    except ArithmeticError:
        return None
    return number if number.is_finite() and number >= 0 else None

"""A coding agent's 20-turn session over two keys at the same list price with cached-input
prices: routing that expects the prompt cache keeps the session on the key holding it; routing
that cannot link the turns (a new session id every turn, as cache-blind routing sees them) spreads
them and pays full input price whenever it switches. The ledger has both totals."""

from __future__ import annotations

import random
from decimal import Decimal

import httpx
import pytest

from billing.models import LedgerEntry
from routing.requests import prompt_token_estimate
from tests.factories import make_client_key, make_key, make_offer, make_provider
from tests.fake_upstream import Received, Reply
from tests.payloads import chat_completion

MODEL = "anthropic/claude-sonnet-4.5"
PRICES = {"input": Decimal(3), "cached": Decimal("0.3"), "output": Decimal(15)}  # USD per 1M
TURNS = 20
OUTPUT_TOKENS = 50
SYSTEM = "You are a coding agent. " + "Follow the repository's conventions. " * 220


class CachingUpstream:
    """Bills like a provider with prefix caching: the prompt a key saw last for a conversation
    is read from its cache (at the cached price) when the conversation comes back to it."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], int] = {}  # (key, conversation) -> prompt tokens
        self.bills: list[dict] = []

    def __call__(self, request: Received) -> Reply:
        body = request.json()
        prompt = prompt_token_estimate(body["messages"])
        conversation = body["messages"][1]["content"]
        cached = min(self.seen.get((request.bearer, conversation), 0), prompt)
        self.seen[(request.bearer, conversation)] = prompt
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": OUTPUT_TOKENS,
            "total_tokens": prompt + OUTPUT_TOKENS,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        self.bills.append({"key": request.bearer, "prompt": prompt, "cached": cached})
        return Reply(json_body=chat_completion(MODEL, "Done.", **usage))


def cost_of(bills: list[dict]) -> Decimal:
    """What the upstream billed, from its own token counts: the figure the ledger must match."""
    total = sum(
        (b["prompt"] - b["cached"]) * PRICES["input"]
        + b["cached"] * PRICES["cached"]
        + OUTPUT_TOKENS * PRICES["output"]
        for b in bills
    )
    return total / 1_000_000


@pytest.fixture
def two_keys(gateway, fake_upstream):
    upstream = CachingUpstream()
    for slug in ("alpha", "beta"):
        provider = make_provider(slug, fake_upstream.url(f"{slug}/v1"))
        make_offer(
            provider,
            MODEL,
            input=str(PRICES["input"]),
            output=str(PRICES["output"]),
            cached_input=str(PRICES["cached"]),
        )
        make_key(provider, f"sk-{slug}-" + slug[0] * 30, label=slug)
        fake_upstream.handle("POST", f"/{slug}/v1/chat/completions", upstream)
    _, client_key = make_client_key()
    gateway.reload()
    return upstream, client_key


def run_session(gateway, client_key: str, task: str, *, linked: bool) -> tuple[list[str], list]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task}]
    served_by, request_ids = [], []
    with httpx.Client(timeout=30) as http:
        for turn in range(TURNS):
            headers = {"Authorization": f"Bearer {client_key}"}
            if not linked:
                headers["X-Claude-Code-Session-Id"] = f"{task}-turn-{turn}"
            answer = http.post(
                f"{gateway.url}/chat/completions",
                json={"model": MODEL, "messages": messages, "max_tokens": OUTPUT_TOKENS},
                headers=headers,
            )
            assert answer.status_code == 200, answer.text
            served_by.append(answer.headers["x-keyaos-key"])
            request_ids.append(answer.headers["x-request-id"])
            messages += [
                {"role": "assistant", "content": f"Edited file {turn}. " + "diff line " * 30},
                {"role": "user", "content": f"Tool output {turn}: " + "log line " * 120},
            ]
    return served_by, request_ids


def test_cache_aware_routing_costs_less_than_cache_blind_and_the_ledger_agrees(
    two_keys, gateway, capsys
):
    upstream, client_key = two_keys
    random.seed(14)  # the gateway's tie rotation shares this process's generator

    aware_keys, aware_ids = run_session(gateway, client_key, "Fix the parser bug.", linked=True)
    aware_bills = upstream.bills[:]
    blind_keys, blind_ids = run_session(gateway, client_key, "Fix the lexer bug.", linked=False)
    blind_bills = upstream.bills[len(aware_bills) :]
    gateway.flush_ledger()

    assert len(set(aware_keys)) == 1, "the linked session stays on the key that holds its cache"
    switches = sum(a != b for a, b in zip(blind_keys, blind_keys[1:], strict=False))
    assert switches >= 1, "equal-cost keys share unlinked traffic"

    aware_ledger = LedgerEntry.objects.filter(request_id__in=aware_ids)
    blind_ledger = LedgerEntry.objects.filter(request_id__in=blind_ids)
    aware_total = sum(entry.cost_usd for entry in aware_ledger)
    blind_total = sum(entry.cost_usd for entry in blind_ledger)
    assert aware_total == cost_of(aware_bills).quantize(Decimal("1e-12"))
    assert blind_total == cost_of(blind_bills).quantize(Decimal("1e-12"))
    assert aware_total < blind_total

    # Routing expected exactly the saving the upstream's cache then gave (turn 1 has none).
    expected = sum(entry.expected_cache_saving_usd for entry in aware_ledger)
    actual = sum(b["cached"] for b in aware_bills) * (PRICES["input"] - PRICES["cached"])
    assert expected == (actual / 1_000_000).quantize(Decimal("1e-12"))
    assert all(entry.expected_cache_saving_usd == 0 for entry in blind_ledger)

    with capsys.disabled():
        print(
            f"\n20-turn session over two equal-price keys: cache-aware {aware_total:.6f} USD "
            f"(1 key, {sum(b['cached'] for b in aware_bills)} prompt tokens from cache), "
            f"cache-blind {blind_total:.6f} USD ({switches} key switches, "
            f"{sum(b['cached'] for b in blind_bills)} tokens from cache)"
        )

"""The one function that prices a request."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from billing.currency import USD
from billing.usage import Usage

MILLION = Decimal(1_000_000)
# Costs are stored with 12 decimal places; rounding once here keeps the ledger and the balances
# it debits equal to the last digit.
COST_QUANTUM = Decimal("1e-12")


@dataclass(frozen=True)
class Prices:
    """An offer's list prices per 1M tokens, in ``currency``."""

    currency: str
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cached_input_per_mtok: Decimal | None = None


@dataclass(frozen=True)
class Cost:
    list_cost: Decimal  # in the provider's currency, at list price: what the balance loses
    currency: str
    source: str  # "reported" or "computed"
    usd_per_unit: Decimal
    list_cost_usd: Decimal
    cost_usd: Decimal  # the operator's real cost: list cost x the key's multiplier, in USD


def tokens_cost(usage: Usage, prices: Prices) -> Decimal:
    """Tokens times list prices; cached prompt tokens at the cached price where there is one."""
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    if prices.cached_input_per_mtok is None:
        cached = 0
    uncached = usage.prompt_tokens - cached
    total = (
        uncached * prices.input_per_mtok
        + cached * (prices.cached_input_per_mtok or Decimal(0))
        + usage.completion_tokens * prices.output_per_mtok
    )
    return total / MILLION


def request_cost(
    usage: Usage, prices: Prices, *, multiplier: Decimal, usd_per_unit: Decimal
) -> Cost:
    """Price one request.

    An upstream-reported cost (always USD: OpenRouter ``usage.cost``, DeepInfra
    ``usage.estimated_cost``) is preferred over tokens x stored prices, and is converted into the
    provider's currency when that is not USD. The key's multiplier is applied here and nowhere else.
    """
    if usage.reported_cost is not None:
        source = "reported"
        list_cost_usd = usage.reported_cost
        list_cost = list_cost_usd if prices.currency == USD else list_cost_usd / usd_per_unit
    else:
        source = "computed"
        list_cost = tokens_cost(usage, prices)
        list_cost_usd = list_cost * usd_per_unit
    return Cost(
        list_cost=list_cost.quantize(COST_QUANTUM),
        currency=prices.currency,
        source=source,
        usd_per_unit=usd_per_unit,
        list_cost_usd=list_cost_usd.quantize(COST_QUANTUM),
        cost_usd=(list_cost_usd * multiplier).quantize(COST_QUANTUM),
    )

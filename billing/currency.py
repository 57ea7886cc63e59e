"""The one place where money changes currency."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

USD = "USD"


class UnknownCurrency(Exception):
    """No stored rate converts this currency to USD."""


def load_rates() -> dict[str, Decimal]:
    from billing.models import CurrencyRate

    rates = dict(CurrencyRate.objects.values_list("currency", "usd_per_unit"))
    rates[USD] = Decimal("1")
    return rates


def usd_per_unit(currency: str, rates: Mapping[str, Decimal] | None = None) -> Decimal:
    if currency == USD:
        return Decimal("1")
    rates = load_rates() if rates is None else rates
    try:
        return rates[currency]
    except KeyError:
        raise UnknownCurrency(
            f"No exchange rate for {currency}: add one under Billing > Currency rates."
        ) from None


def to_usd(amount: Decimal, currency: str, rates: Mapping[str, Decimal] | None = None) -> Decimal:
    """Convert ``amount`` of ``currency`` to USD at the stored rate (``rates``: a snapshot's)."""
    return amount * usd_per_unit(currency, rates)

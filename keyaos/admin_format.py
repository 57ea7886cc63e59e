"""How the admin pages write times and money: one place for every amount an operator reads.

Two precisions: ``exact_amount`` for detail pages (every stored digit, no E-notation) and
``short_amount`` / ``format_usd`` for lists and charts (cents, or four significant digits below a
cent, so 0.00000181 USD still reads as more than nothing).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING

from django.contrib.humanize.templatetags.humanize import naturaltime
from django.urls import reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html

from billing.currency import UnknownCurrency, to_usd

if TYPE_CHECKING:
    from billing.selectors import Totals
    from providers.models import ModelOffer

CENT = Decimal("0.01")
MAX_PLACES = 10


def relative_time(value: datetime | None) -> str:
    """'3 minutes ago' / '25 seconds from now', with the exact time on hover."""
    if value is None:
        return "-"
    exact = date_format(timezone.localtime(value), "DATETIME_FORMAT")
    return format_html('<span title="{}">{}</span>', exact, naturaltime(value))


def seconds(value: datetime | None) -> str:
    """A time to the second in the current time zone: ``2026-12-01 09:41:07``."""
    return "-" if value is None else f"{timezone.localtime(value):%Y-%m-%d %H:%M:%S}"


def plain_amount(value: Decimal | None, min_places: int = 2) -> str:
    """``2.0000000000`` as ``2.00``, ``0.0000001800`` as ``0.00000018``: no E-notation."""
    if value is None:
        return "-"
    whole, _, fraction = f"{value:f}".partition(".")
    return f"{whole}.{fraction.rstrip('0').ljust(min_places, '0')}"


def exact_amount(value: Decimal | None, currency: str) -> str:
    """Every stored digit, with the currency: ``0.00000181 USD``."""
    return "-" if value is None else f"{plain_amount(value)} {currency}"


def rounded(value: Decimal | int) -> str:
    """``1,234.57``; below a cent up to four significant digits (``0.00181``), never ``0.00``
    for an amount that is not zero."""
    value = Decimal(value)
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value >= CENT or value == 0:
        return f"{sign}{value.quantize(CENT, ROUND_HALF_UP):,}"
    places = min(-value.adjusted() + 3, MAX_PLACES)
    return f"{sign}{value.quantize(Decimal(1).scaleb(-places), ROUND_HALF_UP).normalize():f}"


def format_usd(value: Decimal | int) -> str:
    """$1,234.57 for dollars; up to four significant digits below a cent ($0.00181)."""
    text = rounded(value)
    return f"-${text[1:]}" if text.startswith("-") else f"${text}"


def short_amount(value: Decimal | None, currency: str) -> str:
    """An amount in its currency at list precision: ``0.00181 USD``, ``1,234.57 CNY``."""
    return "-" if value is None else f"{rounded(value)} {currency}"


def format_amount(value: Decimal, currency: str) -> str:
    """A balance at cent precision: ``1,234.57 CNY``."""
    return f"{value.quantize(CENT, ROUND_HALF_UP):,} {currency}"


def usd_pair(offer: ModelOffer, rates: dict[str, Decimal]) -> str:
    """An offer's input and output price per 1M tokens in USD: ``$0.28 / $0.42``."""
    if not offer.has_prices:
        return "-"
    try:
        prices = [
            to_usd(price, offer.currency, rates)
            for price in (offer.input_price_per_mtok, offer.output_price_per_mtok)
        ]
    except UnknownCurrency:
        return f"no {offer.currency} rate"
    return " / ".join(f"${plain_amount(price.quantize(Decimal('0.000001')))}" for price in prices)


def spend_summary(totals: Totals, owner_field: str, owner_id: int) -> str:
    """Last-30-days spend, with a link to those ledger rows."""
    since = (timezone.now() - timedelta(days=30)).date().isoformat()
    url = reverse("admin:billing_ledgerentry_changelist")
    return format_html(
        '{} requests, {} tokens, {} (list price {}) <a href="{}?{}__id__exact={}&amp;'
        'created_at__date__gte={}">ledger rows</a>',
        totals.requests,
        totals.tokens,
        exact_amount(totals.cost_usd, "USD"),
        exact_amount(totals.list_cost_usd, "USD"),
        url,
        owner_field,
        owner_id,
        since,
    )

"""Counts the bench database's ledger after the gateway stopped, and matches it to what was sent.

Run with the bench's environment: ``python -m bench.ledger_check --ids FILE --sent N``. Prints one
JSON object; ``ok`` is true when every answered request id has exactly one ledger row and the rows
number exactly the requests sent. It also gives, as exact decimal strings, each upstream key's
balance beside the sum of its rows' costs, and each client key's spend beside its rows' cost in
USD, so a caller that knows the starting balances can check the debits to the last digit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _money(value) -> str | None:
    """An exact figure at the money fields' 12 places (SQLite sums in floating point)."""
    from decimal import Decimal

    return None if value is None else str(Decimal(value).quantize(Decimal("1e-12")))


def _ledger_sums(key: str, amount: str) -> dict[str, str | None]:
    """The ledger's ``amount`` summed per ``key`` (rows without one left out)."""
    from django.db.models import Sum

    from billing.models import LedgerEntry

    rows = LedgerEntry.objects.values_list(key).annotate(total=Sum(amount)).order_by(key)
    return {str(value): _money(total) for value, total in rows if value is not None}


def check(ids_file: str | None, sent: int) -> dict:
    from django.db import connection
    from django.db.models import Count

    from billing.models import ApiKey, LedgerEntry
    from providers.models import UpstreamKey

    outcomes = dict(
        LedgerEntry.objects.values_list("outcome").annotate(n=Count("id")).order_by("outcome")
    )
    rows = sum(outcomes.values())
    recorded = list(LedgerEntry.objects.values_list("request_id", flat=True))
    distinct = set(recorded)
    answered: set[str] = set()
    if ids_file and os.path.exists(ids_file):
        with open(ids_file) as ids:
            answered = {line.strip() for line in ids if line.strip()}
    missing = answered - distinct
    return {
        "ok": rows == sent and len(distinct) == rows and not missing,
        "sent": sent,
        "rows": rows,
        "duplicate_rows": rows - len(distinct),
        "answered_ids": len(answered),
        "answered_without_row": len(missing),
        "rows_without_answered_id": len(distinct - answered) if answered else None,
        "outcomes": outcomes,
        "database": connection.vendor,
        "cost_by_upstream_key": _ledger_sums("upstream_key", "cost"),
        "balance_by_upstream_key": {
            str(key): _money(balance)
            for key, balance in UpstreamKey.objects.values_list("pk", "balance")
        },
        "cost_usd_by_client_key": _ledger_sums("api_key", "cost_usd"),
        "spent_usd_by_client_key": {
            str(key): _money(spent) for key, spent in ApiKey.objects.values_list("pk", "spent_usd")
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", help="file with one answered x-request-id a line")
    parser.add_argument("--sent", type=int, required=True, help="requests sent to the gateway")
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "keyaos.settings")
    import django

    django.setup()
    json.dump(check(args.ids, args.sent), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

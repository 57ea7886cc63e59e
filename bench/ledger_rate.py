"""How many ledger rows per second the writer moves from the spool to the bench database.

Run with the bench's environment after the gateway stopped: ``python -m bench.ledger_rate
--records N``. It spools N records (the bench's provider, upstream key and client key; one in
ten with a failed attempt) into a spool folder of its own, then drains it exactly as the writer
does, batch by batch on one normal-priority thread: read, prepare, one transaction. It prints one
JSON object (rows per second, the prepare and write shares, the cost of one spool append) and
deletes the rows it wrote again, so the bench's own ledger check is unaffected.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from decimal import Decimal


def measure(records: int) -> dict:
    from django.db import connection

    from billing.costs import Prices
    from billing.models import ApiKey, LedgerEntry
    from billing.recorder import (
        BATCH_SIZE,
        AttemptRecord,
        RequestRecord,
        prepare_lines,
        write_isolating,
    )
    from billing.spool import Spool
    from billing.usage import Usage
    from providers.models import UpstreamKey

    upstream_key = UpstreamKey.objects.select_related("provider").first()
    api_key = ApiKey.objects.first()
    prices = Prices(currency="USD", input_per_mtok=Decimal(1), output_per_mtok=Decimal(2))
    prefix = f"rate_{os.getpid()}_"

    def record(number: int) -> RequestRecord:
        attempts = [
            AttemptRecord(upstream_key.provider_id, upstream_key.pk, "bench-model", 200, "", "", 2)
        ]
        if number % 10 == 0:
            attempts.insert(
                0,
                AttemptRecord(
                    upstream_key.provider_id, upstream_key.pk, "bench-model", 503, "transient",
                    "bench: upstream unavailable", 1,
                ),
            )  # fmt: skip
        return RequestRecord(
            request_id=f"{prefix}{number}",
            api_key_id=api_key.pk if api_key else None,
            requested_model="bench-model",
            endpoint="chat/completions",
            streamed=number % 2 == 0,
            outcome="ok",
            status_code=200,
            provider_id=upstream_key.provider_id,
            upstream_key_id=upstream_key.pk,
            upstream_model="bench-model",
            usage=Usage(prompt_tokens=14, completion_tokens=20, source="reported"),
            prices=prices,
            attempts=attempts,
            latency_ms=2,
            ttfb_ms=1,
            overhead_ms=0.4,
        )

    with tempfile.TemporaryDirectory(prefix="keyaos-ledger-rate-") as directory:
        spool = Spool(directory)
        spool.open()
        made = [record(number) for number in range(records)]
        started = time.perf_counter()
        for item in made:
            spool.append(item.to_json())
        append_s = time.perf_counter() - started
        prepare_s = write_s = 0.0
        started = time.perf_counter()
        while (batch := spool.next_batch(BATCH_SIZE)) is not None:
            begin = time.perf_counter()
            entries, refused = prepare_lines(spool.read(batch))
            middle = time.perf_counter()
            written, refused_more = write_isolating(entries)
            write_s += time.perf_counter() - middle
            prepare_s += middle - begin
            if refused or refused_more or written != batch.count:
                raise SystemExit(f"the writer refused records: {refused + refused_more}")
            spool.commit(batch)
        elapsed = time.perf_counter() - started
        spool.close()
    LedgerEntry.objects.filter(request_id__startswith=prefix).delete()
    return {
        "records": records,
        "batch_size": BATCH_SIZE,
        "rows_per_s": round(records / elapsed),
        "prepare_us_per_row": round(prepare_s / records * 1e6, 1),
        "write_us_per_row": round(write_s / records * 1e6, 1),
        "spool_append_us": round(append_s / records * 1e6, 2),
        "database": connection.vendor,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000)
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "keyaos.settings")
    import django

    django.setup()
    json.dump(measure(args.records), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

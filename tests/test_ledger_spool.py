"""The spool: records reach a file before the answer ends, replay is idempotent, a record the
database refuses is set aside as a dead letter without holding back the others."""

from __future__ import annotations

import asyncio
import json
import shutil
from decimal import Decimal

import httpx
import pytest
from django.db import OperationalError
from django.db.models import Sum

import billing.recorder
from billing.costs import Prices
from billing.models import ApiKey, LedgerEntry
from billing.recorder import LedgerWriter, RequestRecord
from billing.spool import DEAD_LETTER_FILE, SUFFIX, ledger_backlog
from billing.usage import Usage
from tests.factories import make_client_key, make_key, make_offer, make_provider
from tests.payloads import chat_completion

MODEL = "openai/gpt-4o-mini"


@pytest.fixture
def keys(transactional_db):
    provider = make_provider("openrouter", "http://127.0.0.1:9/v1")
    upstream_key = make_key(provider, "sk-or-v1-" + "s" * 40, balance=Decimal("10"))
    api_key, _ = make_client_key()
    return provider, upstream_key, api_key


def record(number: int, keys, **changes) -> RequestRecord:
    provider, upstream_key, api_key = keys
    fields = {
        "request_id": f"req_{number:06d}",
        "api_key_id": api_key.pk,
        "requested_model": MODEL,
        "endpoint": "chat/completions",
        "streamed": False,
        "outcome": "ok",
        "status_code": 200,
        "provider_id": provider.pk,
        "upstream_key_id": upstream_key.pk,
        "upstream_model": MODEL,
        "usage": Usage(
            prompt_tokens=10, reported_cost=Decimal(f"0.000001{number:03d}17"), source="reported"
        ),
        "prices": Prices(currency="USD", input_per_mtok=Decimal(1), output_per_mtok=Decimal(2)),
        **changes,
    }
    return RequestRecord(**fields)


def started_writer(directory, records: list[RequestRecord]) -> LedgerWriter:
    """A running writer spooling to ``directory`` that has been handed ``records``."""
    writer = LedgerWriter(directory)
    writer.start()
    for item in records:
        writer.submit(item)
    return writer


async def write_through(directory, records: list[RequestRecord]) -> LedgerWriter:
    writer = started_writer(directory, records)
    await asyncio.wait_for(writer.flush(), 30)
    await writer.stop()
    return writer


def database_away(entries):
    raise OperationalError("connection refused")


def totals(upstream_key, api_key) -> tuple[int, Decimal, Decimal, Decimal]:
    upstream_key.refresh_from_db()
    api_key.refresh_from_db()
    return (
        LedgerEntry.objects.count(),
        LedgerEntry.objects.aggregate(total=Sum("cost"))["total"],
        upstream_key.balance,
        api_key.spent_usd,
    )


def test_a_spooled_batch_is_written_once_with_its_debits(keys, tmp_path):
    _, upstream_key, api_key = keys
    asyncio.run(write_through(tmp_path, [record(n, keys) for n in range(50)]))

    count, cost, balance, spent = totals(upstream_key, api_key)
    expected = sum(Decimal(f"0.000001{n:03d}17") for n in range(50))
    assert (count, cost, balance, spent) == (50, expected, Decimal(10) - expected, expected)
    assert list(tmp_path.glob("*" + SUFFIX)) == []  # committed files are deleted


def test_replaying_a_committed_spool_changes_nothing(keys, tmp_path):
    _, upstream_key, api_key = keys
    spool_dir, kept = tmp_path / "spool", tmp_path / "kept"
    kept.mkdir()

    async def write_and_keep_a_copy():
        writer = started_writer(spool_dir, [record(n, keys) for n in range(40)])
        for path in spool_dir.glob("*" + SUFFIX):  # before the writer commits and deletes it
            shutil.copy(path, kept / path.name)
        await asyncio.wait_for(writer.flush(), 30)
        await writer.stop()

    asyncio.run(write_and_keep_a_copy())
    before = totals(upstream_key, api_key)
    assert before[0] == 40
    for path in kept.iterdir():  # the file of a "dead" process, with no committed offset
        shutil.copy(path, spool_dir / path.name)
    assert ledger_backlog(spool_dir).records == 40

    asyncio.run(write_through(spool_dir, []))

    assert totals(upstream_key, api_key) == before
    assert ledger_backlog(spool_dir).records == 0


def test_a_record_the_database_refuses_is_a_dead_letter_and_the_rest_of_its_batch_is_written(
    keys, tmp_path
):
    _, upstream_key, api_key = keys
    bad = record(7, keys, usage=Usage(prompt_tokens=-5, source="reported"))  # CHECK (>= 0)
    records = [record(n, keys) for n in range(20) if n != 7] + [bad]

    writer = asyncio.run(write_through(tmp_path, records))

    assert LedgerEntry.objects.count() == 19
    assert not LedgerEntry.objects.filter(request_id=bad.request_id).exists()
    (letter,) = [
        json.loads(line) for line in (tmp_path / DEAD_LETTER_FILE).read_text().splitlines()
    ]
    assert letter["record"]["request_id"] == bad.request_id
    assert "IntegrityError" in letter["reason"]
    assert writer.dead_letters == 1 and ledger_backlog(tmp_path).dead_letters == 1
    written = sum(Decimal(f"0.000001{n:03d}17") for n in range(20) if n != 7)
    assert totals(upstream_key, api_key)[1:] == (written, Decimal(10) - written, written)


def test_records_wait_in_the_spool_while_the_database_is_away(keys, tmp_path, monkeypatch):
    real_write = billing.recorder.write_entries
    monkeypatch.setattr(billing.recorder, "write_entries", database_away)

    async def scenario():
        writer = started_writer(tmp_path, [record(n, keys) for n in range(30)])
        await asyncio.sleep(0.3)
        waiting = ledger_backlog(tmp_path)
        monkeypatch.setattr(billing.recorder, "write_entries", real_write)
        await asyncio.wait_for(writer.flush(), 30)
        await writer.stop()
        return waiting

    waiting = asyncio.run(scenario())

    assert waiting.records == 30 and waiting.oldest_age_s > 0.2
    assert LedgerEntry.objects.count() == 30
    assert ledger_backlog(tmp_path).records == 0


def test_a_stop_that_cannot_reach_the_database_leaves_the_records_for_the_next_start(
    keys, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(billing.recorder, "write_entries", database_away)

    async def stop_while_down():
        writer = started_writer(tmp_path, [record(n, keys) for n in range(25)])
        await writer.stop(timeout_s=0.5)

    asyncio.run(stop_while_down())

    assert "0 records written at shutdown, 25 wait in the spool" in caplog.text
    assert ledger_backlog(tmp_path).records == 25
    monkeypatch.undo()
    asyncio.run(write_through(tmp_path, []))
    assert LedgerEntry.objects.count() == 25 and ledger_backlog(tmp_path).records == 0


@pytest.mark.parametrize(
    ("model", "stored"),
    [("gpt\x00-4o", "gpt\ufffd-4o"), ("gpt-\ud800-4o", "gpt-\ufffd-4o"), ("m" * 300, "m" * 200)],
    ids=["nul", "lone-surrogate", "too-long"],
)
def test_a_model_name_no_database_can_store_still_gets_a_row(gateway, fake_upstream, model, stored):
    provider = make_provider("openrouter", fake_upstream.url("or"))
    make_offer(provider, MODEL)
    make_key(provider, "sk-or-v1-" + "p" * 40)
    api_key, client_key = make_client_key()
    fake_upstream.reply("POST", "/or/chat/completions", json_body=chat_completion(MODEL))
    gateway.reload()
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})

    response = httpx.post(
        gateway.url + "/chat/completions",
        content=body.encode(),
        headers={"Authorization": f"Bearer {client_key}", "Content-Type": "application/json"},
    )

    assert response.status_code == 404
    gateway.flush_ledger()
    entry = LedgerEntry.objects.get(request_id=response.headers["x-request-id"])
    assert entry.requested_model == stored and entry.api_key_id == api_key.pk
    assert "\x00" not in entry.error
    assert ApiKey.objects.get(pk=api_key.pk).last_used_at is not None


@pytest.mark.parametrize(
    "model",
    ["openai/gpt-4o-mini", "qwen/通义千问 ✓", "nul\x00in\nthe\u2028name", "lone \ud800 surrogate"],
)
def test_a_spooled_record_is_one_line_that_reads_back_as_it_was(model):
    """orjson writes the line; what it refuses (a lone surrogate) the standard library does."""
    from billing.recorder import AttemptRecord

    original = RequestRecord(
        request_id="req_000001",
        api_key_id=3,
        requested_model=model,
        endpoint="chat/completions",
        streamed=True,
        outcome="ok",
        status_code=200,
        provider_id=1,
        upstream_key_id=2,
        upstream_model=model,
        usage=Usage(prompt_tokens=10, completion_tokens=5, reported_cost=Decimal("0.00000123")),
        prices=Prices("CNY", Decimal("2.0"), Decimal("8"), cached_input_per_mtok=Decimal("0.5")),
        multiplier=Decimal("0.85"),
        usd_per_unit=Decimal("0.1389"),
        attempts=[AttemptRecord(1, 2, model, 503, "transient", "busy", 12)],
        latency_ms=40,
        ttfb_ms=7,
        overhead_ms=0.321,
        expected_cache_saving_usd=Decimal("0.0001"),
    )
    line = original.to_json()
    assert "\n" not in line and "\r" not in line
    read_back = RequestRecord.from_json(json.loads(line.encode()))
    read_back.expected_cache_saving_usd = Decimal(read_back.expected_cache_saving_usd)
    assert read_back == original

"""The ledger under load and through a database outage: every request gets exactly one row."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import pytest
from django.db import OperationalError
from django.db.models import Sum

import billing.recorder
from billing.costs import Prices
from billing.models import ApiKey, LedgerEntry
from billing.recorder import RequestRecord, write_records
from billing.usage import Usage
from tests.factories import make_world, post_chat
from tests.fake_upstream import Reply

MODEL = "openai/gpt-4o-mini"
PATH = "/openrouter/api/v1/chat/completions"


@pytest.fixture
def setup(gateway, fake_upstream):
    world = make_world(fake_upstream, gateway, key_fields={"balance": Decimal("10")})
    return world.key, world.api_key, world.client_key


def priced_answer(request) -> Reply:
    """A different, exactly written cost for each request: 0.000001NNN17 USD for message NNN."""
    number = int(request.json()["messages"][0]["content"])
    body = (
        '{"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": '
        '{"role": "assistant", "content": "ok"}, "finish_reason": "stop"}], "usage": '
        f'{{"prompt_tokens": 10, "completion_tokens": {number % 7 + 1}, '
        f'"cost": 0.000001{number:03d}17}}}}'
    )
    return Reply(body=body.encode(), delay_s=0.05)


async def send_all(url: str, client_key: str, count: int) -> list[int]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one(number: int) -> int:
            response = await client.post(
                url + "/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": str(number)}]},
                headers={"Authorization": f"Bearer {client_key}"},
            )
            return response.status_code

        return await asyncio.gather(*(one(number) for number in range(count)))


def test_200_concurrent_requests_give_200_rows_that_add_up_to_the_balance_drop(
    setup, gateway, fake_upstream
):
    key, api_key, client_key = setup
    fake_upstream.handle("POST", PATH, priced_answer)

    statuses = asyncio.run(send_all(gateway.url, client_key, 200))

    assert statuses == [200] * 200
    gateway.flush_ledger()
    entries = LedgerEntry.objects.all()
    assert entries.count() == 200
    assert entries.values("request_id").distinct().count() == 200
    total = entries.aggregate(total=Sum("cost"))["total"]
    expected = sum(Decimal(f"0.000001{n:03d}17") for n in range(200))
    assert total == expected
    key.refresh_from_db()
    assert Decimal("10") - key.balance == total
    api_key.refresh_from_db()
    assert api_key.spent_usd == entries.aggregate(total=Sum("cost_usd"))["total"]


def test_a_brief_database_outage_loses_no_record(setup, gateway, fake_upstream, monkeypatch):
    key, _, client_key = setup
    fake_upstream.handle("POST", PATH, priced_answer)
    real_write = billing.recorder.write_entries
    calls = {"failed": 0}

    def flaky_write(entries):
        if calls["failed"] < 2:
            calls["failed"] += 1
            raise OperationalError("the database is restarting")
        return real_write(entries)

    monkeypatch.setattr(billing.recorder, "write_entries", flaky_write)

    statuses = asyncio.run(send_all(gateway.url, client_key, 20))

    assert statuses == [200] * 20
    gateway.flush_ledger()
    assert calls["failed"] == 2
    assert LedgerEntry.objects.count() == 20
    key.refresh_from_db()
    assert Decimal("10") - key.balance == LedgerEntry.objects.aggregate(t=Sum("cost"))["t"]


def test_a_writer_that_falls_behind_catches_up_without_losing_a_record(
    setup, gateway, fake_upstream, monkeypatch
):
    """Batches of 5: 200 concurrent requests leave a backlog that is written batch after batch."""
    key, _, client_key = setup
    fake_upstream.handle("POST", PATH, priced_answer)
    monkeypatch.setattr(billing.recorder, "BATCH_SIZE", 5)
    sizes = []
    real_write = billing.recorder.write_entries

    def counting_write(entries):
        sizes.append(len(entries))
        return real_write(entries)

    monkeypatch.setattr(billing.recorder, "write_entries", counting_write)

    assert asyncio.run(send_all(gateway.url, client_key, 200)) == [200] * 200
    gateway.flush_ledger()

    assert LedgerEntry.objects.count() == 200
    assert sum(sizes) == 200 and max(sizes) == 5
    key.refresh_from_db()
    assert Decimal("10") - key.balance == LedgerEntry.objects.aggregate(t=Sum("cost"))["t"]


def test_a_rejected_request_of_a_known_key_still_gets_a_row(setup, gateway):
    _, api_key, client_key = setup
    ApiKey.objects.filter(pk=api_key.pk).update(allowed_models="anthropic/*")
    gateway.reload()

    response = post_chat(gateway, client_key, MODEL, "1")

    assert response.status_code == 403
    gateway.flush_ledger()
    entry = LedgerEntry.objects.get()
    assert (entry.api_key_id, entry.outcome, entry.status_code) == (api_key.pk, "client_error", 403)
    assert entry.cost == 0 and json.loads(response.content)["error"]["code"] == "model_not_allowed"


@pytest.mark.django_db
def test_the_writer_restarts_the_period_spend_only_for_a_newer_period():
    api_key, _ = ApiKey.create_key(name="daily", budget_period="day")

    def record(number: int, day: int) -> RequestRecord:
        return RequestRecord(
            request_id=f"req_{number}",
            api_key_id=api_key.pk,
            requested_model=MODEL,
            endpoint="chat/completions",
            streamed=False,
            outcome="ok",
            status_code=200,
            created_at=datetime(2026, 3, day, 23, 59, tzinfo=UTC),
            usage=Usage(prompt_tokens=1_000_000, source="reported"),
            prices=Prices(
                currency="USD", input_per_mtok=Decimal("0.5"), output_per_mtok=Decimal(1)
            ),
            budget_period="day",
        )

    write_records([record(1, 1), record(2, 1)])
    write_records([record(3, 2)])
    write_records([record(4, 1)])  # a late record of the day before

    api_key.refresh_from_db()
    assert api_key.spent_usd == Decimal("2")
    assert api_key.period_spent_usd == Decimal("0.5")
    assert api_key.period_started_at == datetime(2026, 3, 2, tzinfo=UTC)


@pytest.mark.django_db
def test_a_row_naming_a_field_the_model_lacks_is_refused_not_silently_dropped():
    from billing.models import Attempt
    from keyaos.lib.db import insert_rows

    with pytest.raises(ValueError, match="upstream_key_pk"):
        insert_rows(Attempt, [{"entry_id": 1, "number": 1, "upstream_key_pk": 7}])

"""A key deleted while its requests are in flight does not lose their rows, nor later ones."""

from __future__ import annotations

import threading

import httpx
import pytest

from billing.models import ApiKey, LedgerEntry
from providers.models import UpstreamKey
from tests.factories import make_client_key, make_key, make_world, post_chat
from tests.payloads import chat_chunks, chat_completion

MODEL = "openai/gpt-4o-mini"


@pytest.fixture
def setup(gateway, fake_upstream):
    world = make_world(
        fake_upstream,
        prefix="or",
        model=MODEL,
        input="1",
        output="2",
        label="doomed",
        client_name="doomed",
    )
    _, survivor_plain = make_client_key("survivor")
    gateway.reload()
    return world.key, world.api_key, world.client_key, survivor_plain


def stream(gateway, plain, started: threading.Event | None = None) -> bytes:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    headers = {"Authorization": f"Bearer {plain}"}
    chunks = []
    with httpx.stream("POST", gateway.url + "/chat/completions", json=body, headers=headers) as r:
        for chunk in r.iter_raw():
            chunks.append(chunk)
            if started is not None:
                started.set()
    return b"".join(chunks)


def test_rows_of_requests_whose_keys_were_deleted_midway_are_kept(setup, gateway, fake_upstream):
    upstream_key, doomed, doomed_plain, survivor_plain = setup
    words = [f"w{i}" for i in range(8)]
    fake_upstream.stream(
        "/or/chat/completions", chat_chunks(MODEL, words, {"prompt_tokens": 4}), gap_s=0.1
    )
    started = threading.Event()
    worker = threading.Thread(target=stream, args=(gateway, doomed_plain, started))
    worker.start()
    assert started.wait(5)
    ApiKey.objects.filter(pk=doomed.pk).delete()
    UpstreamKey.objects.filter(pk=upstream_key.pk).delete()
    worker.join(10)
    make_key(upstream_key.provider, "sk-or-v1-" + "s" * 40, label="fresh")
    gateway.reload()
    fake_upstream.reply("POST", "/or/chat/completions", json_body=chat_completion(MODEL))
    response = post_chat(gateway, survivor_plain, MODEL, "again")
    assert response.status_code == 200
    gateway.flush_ledger()
    orphan = LedgerEntry.objects.get(api_key=None)
    assert orphan.upstream_key_id is None and orphan.outcome == "ok"
    assert LedgerEntry.objects.filter(api_key__name="survivor").count() == 1

"""Two gateway instances, started as two machines would run them (``serve --no-qcluster`` each),
on one PostgreSQL and one Redis: budgets, rate limits, cooldowns and configuration are shared.

These need PostgreSQL and Redis: SQLite is one file on one machine (two machines cannot share it),
and without ``REDIS_URL`` each process keeps its own counters and cooldowns by design.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal

import httpx
import pytest
from django.core.cache import cache
from django.utils import timezone

from billing.models import ApiKey, LedgerEntry
from keyaos.lib.signals import routing_data_changed
from providers.models import ModelOffer, RefreshRun
from tests.factories import make_client_key, make_key, make_offer, make_provider
from tests.fake_upstream import Reply
from tests.payloads import chat_completion, upstream_error
from tests.served import (
    Served,
    database_url,
    kill_session,
    manage_process,
    redis_answers,
    wait_until,
)

REDIS_URL = os.environ.get("REDIS_URL", "")
MODEL = "openai/gpt-4o-mini"
CHAT_PATH = "/openrouter/api/v1/chat/completions"
SECRET_A = "sk-or-v1-" + "a" * 40
SECRET_B = "sk-or-v1-" + "b" * 40


pytestmark = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not os.environ.get("DATABASE_URL", "").startswith("postgres"),
        reason="two instances share one database: that needs PostgreSQL (DATABASE_URL); "
        "an embedded SQLite file belongs to one machine",
    ),
    pytest.mark.skipif(
        not REDIS_URL or not redis_answers(),
        reason="instances share counters and cooldowns through Redis: set REDIS_URL (.ci/run does)",
    ),
]


@pytest.fixture
def upstream(fake_upstream):
    provider = make_provider("openrouter", fake_upstream.url("openrouter/api/v1"))
    offer = make_offer(provider, MODEL, input="1000", output="2000")
    make_key(provider, SECRET_A, label="cheap", multiplier=Decimal("0.5"))
    return provider, offer


@pytest.fixture
def two_instances(tmp_path, upstream):
    cache.clear()  # this test's Redis database: counters and cooldowns of earlier tests go
    started = [
        Served(tmp_path / f"instance-{n}.log", "--no-qcluster", REDIS_URL=REDIS_URL) for n in (1, 2)
    ]
    try:
        for served in started:
            served.wait_ready()
        yield started
    finally:
        for served in started:
            served.kill()


def chat(served: Served, key: str, **body) -> httpx.Response:
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **body}
    with httpx.Client(timeout=30) as client:
        return client.post(
            served.url + "/v1/chat/completions",
            json=payload,
            headers={"Authorization": f"Bearer {key}"},
        )


def spread(instances: list[Served], key: str, count: int, **body) -> list[httpx.Response]:
    with ThreadPoolExecutor(count) as pool:
        return list(
            pool.map(lambda n: chat(instances[n % len(instances)], key, **body), range(count))
        )


def test_a_budget_shared_by_50_requests_over_two_instances_admits_exactly_what_it_covers(
    two_instances, fake_upstream
):
    # Each answer costs exactly what its reservation expects: "Hi" estimates to 5 prompt tokens
    # (1 of text, 4 of message overhead) and 10 completion tokens (max_tokens), 0.025 USD at list
    # price, 0.0125 after the key's 0.5 multiplier. So the 0.1 budget admits exactly 8 requests,
    # however the 50 interleave: nothing a settled request gives back lets a ninth in.
    fake_upstream.reply(
        "POST",
        CHAT_PATH,
        json_body=chat_completion(MODEL, prompt_tokens=5, completion_tokens=10),
        delay_s=0.3,
    )
    api_key, key = make_client_key("shared-budget")
    ApiKey.objects.filter(pk=api_key.pk).update(budget_usd=Decimal("0.1"))
    time.sleep(1)  # the snapshot poll (0.2 s) picks up the budget in both instances

    answers = spread(two_instances, key, 50, max_tokens=10)

    statuses = [answer.status_code for answer in answers]
    assert set(statuses) <= {200, 429}, statuses
    ok = statuses.count(200)
    assert wait_until(lambda: LedgerEntry.objects.count() == 50, 20)
    spent = sum(LedgerEntry.objects.values_list("cost_usd", flat=True), Decimal(0))
    assert ok == 8, statuses  # the budget was used, not refused early, and not overspent
    assert spent == Decimal("0.1")
    refused = [a.json()["error"]["code"] for a in answers if a.status_code == 429]
    assert set(refused) == {"budget_exceeded"}


def test_an_rpm_limit_holds_across_both_instances(two_instances, fake_upstream):
    fake_upstream.reply("POST", CHAT_PATH, json_body=chat_completion(MODEL), delay_s=0.05)
    api_key, key = make_client_key("shared-rpm")
    ApiKey.objects.filter(pk=api_key.pk).update(rpm_limit=10)
    time.sleep(1)
    # Windows are calendar minutes: start early in one so that all 30 requests fall in it.
    wait_until(lambda: time.time() % 60 < 40, timeout_s=25)

    answers = spread(two_instances, key, 30)

    statuses = [answer.status_code for answer in answers]
    assert statuses.count(200) == 10, statuses
    assert statuses.count(429) == 20
    assert {a.json()["error"]["code"] for a in answers if a.status_code == 429} == {
        "rate_limit_exceeded"
    }


def test_a_429_cooldown_taken_on_one_instance_is_honoured_by_the_other_within_a_second(
    two_instances, fake_upstream, upstream
):
    provider, _ = upstream
    make_key(provider, SECRET_B, label="dear")

    def answer(request):
        if request.bearer == SECRET_A:
            return Reply(
                status=429,
                json_body=upstream_error("slow down"),
                headers={"Retry-After": "60"},
            )
        return Reply(json_body=chat_completion(MODEL))

    fake_upstream.handle("POST", CHAT_PATH, answer)
    _, key = make_client_key("cooldown")
    first, second = two_instances
    time.sleep(1)  # both snapshots know the new keys

    failed_over = chat(first, key)
    assert failed_over.status_code == 200
    assert failed_over.headers["x-keyaos-attempts"] == "2"
    assert failed_over.headers["x-keyaos-key"] == "dear"
    time.sleep(1)
    asked_a = sum(1 for r in fake_upstream.requests if r.bearer == SECRET_A)

    answer = chat(second, key)

    assert answer.status_code == 200
    assert (answer.headers["x-keyaos-attempts"], answer.headers["x-keyaos-key"]) == ("1", "dear")
    assert sum(1 for r in fake_upstream.requests if r.bearer == SECRET_A) == asked_a


def test_a_new_key_a_price_and_a_disabled_client_key_reach_both_instances_within_the_poll(
    two_instances, fake_upstream, upstream
):
    provider, offer = upstream
    fake_upstream.reply("POST", CHAT_PATH, json_body=chat_completion(MODEL))
    api_key, key = make_client_key("config")
    time.sleep(1)
    assert {chat(served, key).headers["x-keyaos-key"] for served in two_instances} == {"cheap"}

    make_key(provider, SECRET_B, label="free", multiplier=Decimal("0"))
    ModelOffer.objects.filter(pk=offer.pk).update(input_price_per_mtok=Decimal("7"))
    routing_data_changed()
    changed_at = time.monotonic()

    def sees_the_new_key_and_price(served: Served) -> bool:
        models = httpx.get(
            served.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}
        ).json()["data"]
        return chat(served, key).headers.get("x-keyaos-key") == "free" and "7" in str(models)

    assert all(wait_until(lambda s=s: sees_the_new_key_and_price(s), 5) for s in two_instances)
    api_key.enabled = False
    api_key.save()
    assert all(wait_until(lambda s=s: chat(s, key).status_code == 401, 5) for s in two_instances)
    # The snapshot poll is 0.2 s here: everything arrived well within a few polls' time.
    assert time.monotonic() - changed_at < 10


def test_two_task_clusters_on_redis_run_the_scheduled_refresh_once_per_interval(tmp_path, upstream):
    from django_q.models import Schedule

    from providers.tasks import REFRESH_SCHEDULE_NAME

    cache.clear()  # the broker's queue lives in this Redis database too
    Schedule.objects.update_or_create(
        name=REFRESH_SCHEDULE_NAME,
        defaults={
            "func": "providers.tasks.scheduled_refresh",
            "schedule_type": Schedule.MINUTES,
            "minutes": 5,
            "repeats": -1,
            "next_run": timezone.now() - timedelta(seconds=1),
        },
    )
    env = {
        **{k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"},
        "DJANGO_SETTINGS_MODULE": "keyaos.settings",
        "DATABASE_URL": database_url(),
        "REDIS_URL": REDIS_URL,
        "KEYAOS_STATE_DIR": str(tmp_path),
        "KEYAOS_LEDGER_SPOOL_DIR": str(tmp_path / "cluster-spool"),
        "KEYAOS_IDENTITY_SOURCE_URL": "",
    }
    clusters = []
    try:
        for n in (1, 2):
            with (tmp_path / f"cluster-{n}.log").open("wb") as log:
                clusters.append(manage_process(["qcluster"], env, log))
        # Each cluster's scheduler wakes about every 30 s: after the first run, give both a turn.
        logs = tmp_path / "cluster-1.log"
        assert wait_until(lambda: RefreshRun.objects.exists(), 90), logs.read_text()
        time.sleep(35)
        assert RefreshRun.objects.filter(trigger="schedule").count() == 1
        assert Schedule.objects.get().next_run > timezone.now()
    finally:
        for cluster in clusters:
            kill_session(cluster)

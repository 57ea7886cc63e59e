"""Failover and key health: each failure class leaves the key in the state it calls for."""

from __future__ import annotations

import openai
import pytest

from billing.models import Attempt, LedgerEntry
from providers.models import Provider, UpstreamKey
from tests.factories import make_client_key, make_key, make_offer, make_provider, make_world
from tests.fake_upstream import Reply
from tests.payloads import chat_completion

MODEL = "meta-llama/llama-3.3-70b-instruct"
CHEAP = "/cheap/v1/chat/completions"
DEAR = "/dear/v1/chat/completions"


@pytest.fixture
def two_providers(gateway, fake_upstream, settings):
    settings.KEYAOS_CONNECT_TIMEOUT_S = 2
    settings.KEYAOS_TRIP_MIN_FAILURES = 1  # one transient failure with no success trips the key
    cheap = make_provider("cheap", fake_upstream.url("cheap/v1"), read_timeout_s=1.0)
    dear = make_provider("dear", fake_upstream.url("dear/v1"))
    make_offer(cheap, MODEL, input="0.1", output="0.2")
    make_offer(dear, MODEL, input="1", output="2")
    cheap_key = make_key(cheap, "sk-cheap-" + "c" * 30, label="cheap-key")
    make_key(dear, "sk-dear-" + "d" * 30, label="dear-key")
    fake_upstream.reply("POST", DEAR, json_body=chat_completion(MODEL, "from dear"))
    _, client_key = make_client_key()
    gateway.reload()
    client = openai.OpenAI(base_url=gateway.url, api_key=client_key, max_retries=0)
    return cheap_key, client


def ask(client):
    return client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}]
    )


def reply_rate_limited(fake_upstream, path: str, message: str, retry_after_s: int) -> None:
    """The upstream answers ``path`` with a 429 that states when to come back."""
    fake_upstream.reply(
        "POST",
        path,
        status=429,
        json_body={"error": {"message": message}},
        headers={"Retry-After": str(retry_after_s)},
    )


def test_the_cheapest_key_serves_when_it_is_healthy(two_providers, fake_upstream):
    _, client = two_providers
    fake_upstream.reply("POST", CHEAP, json_body=chat_completion(MODEL, "from cheap"))
    raw = ask(client)
    assert raw.parse().choices[0].message.content == "from cheap"
    assert raw.headers["x-keyaos-provider"] == "cheap"


@pytest.mark.parametrize(
    ("reply", "health", "cooling"),
    [
        (
            Reply(
                status=429,
                json_body={"error": {"message": "slow down"}},
                headers={"Retry-After": "30"},
            ),
            "ok",
            True,
        ),
        (Reply(status=401, json_body={"error": {"message": "bad key"}}), "invalid", False),
        (Reply(status=403, json_body={"error": {"message": "forbidden"}}), "invalid", False),
        (
            Reply(status=402, json_body={"error": {"message": "Insufficient credits"}}),
            "exhausted",
            False,
        ),
        (Reply(status=500, json_body={"error": {"message": "boom"}}), "ok", True),
        (Reply(status=503, body=b"upstream down", content_type="text/plain"), "ok", True),
        (
            Reply(status=200, body=b"<html>Access denied</html>", content_type="text/html"),
            "ok",
            True,
        ),
        (Reply(status=200, json_body={}, delay_s=3), "ok", True),
    ],
    ids=["429", "401", "403", "402", "500", "503", "html-200", "timeout"],
)
def test_a_refusing_cheapest_key_fails_over_to_the_next(
    two_providers, gateway, fake_upstream, reply, health, cooling
):
    cheap_key, client = two_providers
    fake_upstream.handle("POST", CHEAP, lambda _request: reply)
    raw = ask(client)
    assert raw.parse().choices[0].message.content == "from dear"
    assert raw.headers["x-keyaos-provider"] == "dear"
    assert raw.headers["x-keyaos-attempts"] == "2"
    gateway.flush_ledger()
    cheap_key.refresh_from_db()
    assert cheap_key.health == health
    assert (cheap_key.cooldown_until is not None) == cooling
    assert cheap_key.last_error
    assert "c" * 30 not in cheap_key.last_error
    entry = LedgerEntry.objects.get()
    assert entry.outcome == "ok" and entry.attempts == 2
    failed = Attempt.objects.get(entry=entry, number=1)
    assert failed.upstream_key_id == cheap_key.id and failed.failure


def test_a_key_cooling_down_is_skipped_until_its_retry_after(two_providers, fake_upstream):
    _, client = two_providers
    reply_rate_limited(fake_upstream, CHEAP, "rate", retry_after_s=60)
    ask(client)
    fake_upstream.reply("POST", CHEAP, json_body=chat_completion(MODEL, "from cheap"))
    raw = ask(client)
    assert raw.headers["x-keyaos-provider"] == "dear"
    assert raw.headers["x-keyaos-attempts"] == "1"


def test_an_invalid_key_is_persisted_and_leaves_routing(two_providers, gateway, fake_upstream):
    cheap_key, client = two_providers
    fake_upstream.reply("POST", CHEAP, status=401, json_body={"error": {"message": "no"}})
    ask(client)
    gateway.reload()
    raw = ask(client)
    assert raw.headers["x-keyaos-attempts"] == "1"
    assert len(fake_upstream.received(CHEAP)) == 1
    gateway.flush_ledger()  # the health is persisted after the response, in the background
    assert UpstreamKey.objects.get(pk=cheap_key.pk).health == "invalid"


@pytest.mark.parametrize("status", [400, 404, 413, 422])
def test_a_client_error_passes_back_unchanged_and_leaves_the_key_alone(
    two_providers, gateway, fake_upstream, status
):
    cheap_key, client = two_providers
    body = {"error": {"message": "messages[0].content is invalid", "code": "bad_thing"}}
    fake_upstream.reply("POST", CHEAP, status=status, json_body=body)
    with pytest.raises(openai.APIStatusError) as error:
        ask(client)
    assert error.value.status_code == status
    assert error.value.body == body["error"] or error.value.response.json() == body
    assert fake_upstream.received(DEAR) == []
    gateway.flush_ledger()
    cheap_key.refresh_from_db()
    assert (
        cheap_key.health == "ok" and cheap_key.cooldown_until is None and not cheap_key.last_error
    )
    assert LedgerEntry.objects.get().outcome == "client_error"


def test_when_every_candidate_fails_the_client_gets_the_most_telling_error(
    two_providers, gateway, fake_upstream
):
    _, client = two_providers
    fake_upstream.reply("POST", CHEAP, status=500, json_body={"error": {"message": "cheap broke"}})
    reply_rate_limited(fake_upstream, DEAR, "dear busy", retry_after_s=7)
    with pytest.raises(openai.RateLimitError) as error:
        ask(client)
    assert "dear busy" in error.value.message
    assert error.value.response.headers["x-keyaos-attempts"] == "2"
    gateway.flush_ledger()
    entry = LedgerEntry.objects.get()
    assert entry.outcome == "upstream_error" and entry.attempts == 2
    assert entry.cost == 0 and entry.usage_source == "none"


def test_an_upstream_that_echoes_the_secret_never_shows_it(two_providers, gateway, fake_upstream):
    cheap_key, client = two_providers
    secret = "sk-cheap-" + "c" * 30
    fake_upstream.reply(
        "POST", CHEAP, status=401, json_body={"error": {"message": f"Incorrect API key {secret}"}}
    )
    fake_upstream.reply("POST", DEAR, status=500, json_body={"error": {"message": "down"}})
    with pytest.raises(openai.APIStatusError) as error:
        ask(client)
    assert secret not in error.value.response.text
    gateway.flush_ledger()
    cheap_key.refresh_from_db()
    assert secret not in cheap_key.last_error
    assert secret not in "".join(Attempt.objects.values_list("error", flat=True))


def test_when_every_candidate_times_out_the_client_gets_a_504(
    two_providers, gateway, fake_upstream
):
    _, client = two_providers
    Provider.objects.filter(slug="dear").update(read_timeout_s=1.0)
    gateway.reload()
    slow = Reply(status=200, json_body={}, delay_s=3)
    fake_upstream.handle("POST", CHEAP, lambda _request: slow)
    fake_upstream.handle("POST", DEAR, lambda _request: slow)
    with pytest.raises(openai.APIStatusError) as error:
        ask(client)
    assert error.value.status_code == 504
    assert error.value.response.json()["error"]["code"] == "upstream_failed"
    gateway.flush_ledger()
    assert LedgerEntry.objects.get().outcome == "upstream_error"


@pytest.fixture
def hang_up_server():
    """A TCP server that accepts each connection and closes it at once, answering nothing."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connection.recv(65536)
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    stop.set()
    thread.join(timeout=5)
    listener.close()


@pytest.mark.parametrize("where", ["refused", "hung-up"])
def test_a_refused_or_dropped_connection_is_a_502_that_says_so(
    gateway, fake_upstream, hang_up_server, where
):
    from tests.fake_upstream import free_port

    base_url = f"http://127.0.0.1:{free_port()}/v1" if where == "refused" else hang_up_server
    provider = make_provider("gone", base_url)
    make_offer(provider, MODEL)
    make_key(provider, "sk-gone-" + "g" * 30)
    _, client_key = make_client_key()
    gateway.reload()
    client = openai.OpenAI(base_url=gateway.url, api_key=client_key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as error:
        ask(client)
    assert error.value.status_code == 502
    expected = {
        "refused": "gone refused the connection",
        "hung-up": "gone closed the connection without answering",
    }[where]
    assert expected in error.value.message
    assert "timed out" not in error.value.message


@pytest.fixture
def one_key(gateway, fake_upstream, settings):
    settings.KEYAOS_TRIP_MIN_FAILURES = 1
    world = make_world(
        fake_upstream, gateway, slug="only", prefix="only/v1", model=MODEL, input="1", output="2"
    )
    return world.key, world.client()


ONLY = "/only/v1/chat/completions"


def test_a_model_whose_keys_all_cool_down_after_transient_failures_is_still_tried(
    one_key, gateway, fake_upstream
):
    key, client = one_key
    fake_upstream.reply("POST", ONLY, status=503, json_body={"error": {"message": "blip"}})
    with pytest.raises(openai.APIStatusError):
        ask(client)
    gateway.flush_ledger()
    assert UpstreamKey.objects.get(pk=key.pk).current_health == "cooling"
    fake_upstream.reply("POST", ONLY, json_body=chat_completion(MODEL, "back"))
    raw = ask(client)  # the last-resort pass, not a 503
    assert raw.parse().choices[0].message.content == "back"
    gateway.flush_ledger()
    assert UpstreamKey.objects.get(pk=key.pk).current_health == "ok"  # its success closed it


def test_a_retry_after_the_upstream_stated_is_never_lifted(one_key, fake_upstream):
    _, client = one_key
    reply_rate_limited(fake_upstream, ONLY, "slow down", retry_after_s=60)
    with pytest.raises(openai.RateLimitError):
        ask(client)
    fake_upstream.reply("POST", ONLY, json_body=chat_completion(MODEL, "too soon"))
    with pytest.raises(openai.RateLimitError) as error:
        ask(client)
    # Every key rests after a 429: the client is told when the first one serves again.
    assert "cooling down" in error.value.message
    assert 55 <= int(error.value.response.headers["Retry-After"]) <= 61
    assert len(fake_upstream.received(ONLY)) == 1

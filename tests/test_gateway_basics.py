from __future__ import annotations

from decimal import Decimal

import httpx
import openai
import pytest

from billing.models import LedgerEntry
from tests.factories import make_offer, make_world
from tests.payloads import chat_chunks, chat_completion


@pytest.fixture
def setup(gateway, fake_upstream):
    world = make_world(fake_upstream, secret="sk-or-v1-" + "a" * 40, label="main")
    make_offer(
        world.provider, "openai/text-embedding-3-small", input="0.02", output="0", kind="embedding"
    )
    gateway.reload()
    return (
        world.provider,
        world.key,
        openai.OpenAI(base_url=gateway.url, api_key=world.client_key, max_retries=0),
    )


def test_the_openai_sdk_lists_the_models_it_can_route(setup):
    _, _, client = setup
    models = client.models.list()
    ids = [model.id for model in models.data]
    assert ids == ["openai/gpt-4o-mini", "openai/text-embedding-3-small"]
    model = client.models.retrieve("openai/gpt-4o-mini")
    assert model.id == "openai/gpt-4o-mini"


def test_the_openai_sdk_runs_a_chat_completion(setup, gateway, fake_upstream):
    _, key, client = setup
    fake_upstream.reply(
        "POST",
        "/openrouter/api/v1/chat/completions",
        json_body=chat_completion(
            "openai/gpt-4o-mini", "Hi there", prompt_tokens=12, completion_tokens=3, cost=0.0000036
        ),
    )
    raw = client.chat.completions.with_raw_response.create(
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hi there"
    assert raw.headers["x-keyaos-provider"] == "openrouter"
    assert raw.headers["x-keyaos-key"] == "main"
    assert raw.headers["x-keyaos-attempts"] == "1"
    assert raw.headers["x-request-id"].startswith("req_")
    assert float(raw.headers["x-keyaos-overhead-ms"]) >= 0
    sent = fake_upstream.received("/openrouter/api/v1/chat/completions")[0]
    assert sent.bearer == "sk-or-v1-" + "a" * 40
    assert sent.headers["accept-encoding"] == "identity"
    assert sent.json()["model"] == "openai/gpt-4o-mini"
    gateway.flush_ledger()
    entry = LedgerEntry.objects.get()
    assert entry.outcome == "ok"
    assert entry.upstream_key_id == key.id
    assert (entry.prompt_tokens, entry.completion_tokens) == (12, 3)
    assert entry.cost == Decimal("0.0000036")
    assert entry.cost_source == "reported"


def test_the_openai_sdk_streams_a_chat_completion(setup, gateway, fake_upstream):
    _, _, client = setup
    fake_upstream.stream(
        "/openrouter/api/v1/chat/completions",
        chat_chunks(
            "openai/gpt-4o-mini",
            ["Hel", "lo", "!"],
            {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8, "cost": 0.000002},
        ),
    )
    stream = client.chat.completions.create(
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello!"
    assert all(chunk.usage is None for chunk in chunks), (
        "the usage chunk the client did not ask for"
    )
    sent = fake_upstream.received("/openrouter/api/v1/chat/completions")[0].json()
    assert sent["stream_options"] == {"include_usage": True}
    gateway.flush_ledger()
    entry = LedgerEntry.objects.get()
    assert entry.streamed and entry.outcome == "ok"
    assert entry.completion_tokens == 3
    assert entry.usage_source == "reported"


def test_a_client_that_asks_for_usage_gets_the_usage_chunk(setup, fake_upstream):
    _, _, client = setup
    fake_upstream.stream(
        "/openrouter/api/v1/chat/completions",
        chat_chunks("openai/gpt-4o-mini", ["a"], {"prompt_tokens": 5, "completion_tokens": 1}),
    )
    chunks = list(
        client.chat.completions.create(
            model="openai/gpt-4o-mini",
            messages=[{"role": "user", "content": "Hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.completion_tokens == 1


def test_the_openai_sdk_runs_completions_and_embeddings(setup, fake_upstream):
    _, _, client = setup
    fake_upstream.reply(
        "POST",
        "/openrouter/api/v1/completions",
        json_body={
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1,
            "model": "openai/gpt-4o-mini",
            "choices": [{"index": 0, "text": " world", "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
        },
    )
    fake_upstream.reply(
        "POST",
        "/openrouter/api/v1/embeddings",
        json_body={
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
            "model": "openai/text-embedding-3-small",
            "usage": {"prompt_tokens": 2, "total_tokens": 2},
        },
    )
    completion = client.completions.create(model="openai/gpt-4o-mini", prompt="hello")
    assert completion.choices[0].text == " world"
    embedding = client.embeddings.create(model="openai/text-embedding-3-small", input="hello")
    assert embedding.data[0].embedding == [0.1, 0.2, 0.3]


def test_an_unknown_model_is_a_404_model_not_found(setup):
    _, _, client = setup
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(
            model="nobody/nothing", messages=[{"role": "user", "content": "Hi"}]
        )
    assert error.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("headers", "code"),
    [({}, "missing_api_key"), ({"Authorization": "Bearer sk-keyaos-wrong"}, "invalid_api_key")],
)
def test_a_missing_or_unknown_key_is_a_401_in_openai_format(setup, gateway, headers, code):
    response = httpx.get(gateway.url + "/models", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == code


def test_unknown_routes_and_methods_answer_in_openai_format(setup, gateway):
    response = httpx.get(gateway.url + "/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_url"
    response = httpx.get(gateway.url + "/chat/completions")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_an_upstreams_cookie_is_never_sent_back(setup, gateway, fake_upstream):
    """One provider's keys are different accounts: a cookie one answer sets (a CDN's bot cookie,
    a session) must not follow the next request, on this key or another."""
    provider, _, client = setup
    # By name: cookie jars keep no cookie of a bare IP address.
    provider.base_url = provider.base_url.replace("127.0.0.1", "localhost")
    provider.save()
    gateway.reload()
    fake_upstream.reply(
        "POST",
        "/openrouter/api/v1/chat/completions",
        json_body=chat_completion("openai/gpt-4o-mini", "Hi"),
        headers={"set-cookie": "__cf_bm=account-one; Path=/; HttpOnly"},
    )
    for _ in range(3):
        client.chat.completions.create(
            model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}]
        )
    sent = fake_upstream.received("/openrouter/api/v1/chat/completions")
    assert len(sent) == 3
    assert [request.headers.get("cookie") for request in sent] == [None, None, None]

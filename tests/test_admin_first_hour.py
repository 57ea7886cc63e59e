"""What an operator meets in the first hour: a new provider and key refresh at once, offers
without a price are named everywhere, and the provider and key pages act on one object."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.urls import reverse

from providers import background
from providers.models import ModelOffer, Provider, RefreshResult, RefreshRun, UpstreamKey
from providers.presets import PRESETS
from providers.refresh import refresh_providers
from tests.factories import make_key


def messages_of(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def custom_provider(fake_upstream, slug: str = "vllm") -> Provider:
    fields = PRESETS["openai-compatible"].provider_fields() | {
        "base_url": fake_upstream.url(slug),
        "name": "Local vLLM",
    }
    return Provider.objects.create(slug=slug, **fields)


def serve_unpriced(fake_upstream, slug: str = "vllm", *ids: str) -> None:
    models = [{"id": model_id, "object": "model"} for model_id in ids or ("llama3",)]
    fake_upstream.reply("GET", f"/{slug}/models", json_body={"data": models})


@pytest.mark.django_db
class TestUnpricedOffers:
    def test_the_refresh_command_names_them_and_the_fix(self, fake_upstream):
        custom_provider(fake_upstream)
        serve_unpriced(fake_upstream, "vllm", "llama3", "qwen3")
        out = StringIO()
        call_command("refresh_models", stdout=out)
        output = out.getvalue()
        assert "vllm: 2 offer(s) have no price and do not serve (llama3, qwen3)" in output
        assert "0 for a free local model" in output
        result = RefreshResult.objects.get(provider_slug="vllm")
        assert result.unpriced_models == ["llama3", "qwen3"]

    def test_the_provider_list_counts_them_and_links_to_the_filtered_offers(
        self, admin_client, fake_upstream
    ):
        provider = custom_provider(fake_upstream)
        serve_unpriced(fake_upstream)
        call_command("refresh_models", stdout=StringIO())
        ModelOffer.objects.create(
            provider=provider,
            upstream_model_id="priced",
            canonical_id="vllm/priced",
            input_price_per_mtok=0,
            output_price_per_mtok=0,
        )
        page = admin_client.get(reverse("admin:providers_provider_changelist")).content.decode()
        assert f"?provider__id__exact={provider.pk}&amp;priced=no" in page
        assert "1 (not served)" in page

        offers = admin_client.get(
            reverse("admin:providers_modeloffer_changelist"), {"priced": "no"}
        ).content.decode()
        assert "llama3" in offers and "vllm/priced" not in offers

    def test_the_dashboard_lists_them_with_the_fix(self, admin_client, fake_upstream):
        custom_provider(fake_upstream)
        serve_unpriced(fake_upstream)
        call_command("refresh_models", stdout=StringIO())
        page = admin_client.get(reverse("admin:index")).content.decode()
        assert "Needs attention" in page
        assert "llama3" in page and "0 for a free local model" in page


@pytest.mark.django_db
class TestProviderList:
    def test_it_shows_each_providers_last_refresh_and_its_error(self, admin_client, fake_upstream):
        provider = custom_provider(fake_upstream)
        fake_upstream.reply("GET", "/vllm/models", status=503, json_body={"error": "down"})
        refresh_providers(trigger=RefreshRun.Trigger.COMMAND)
        page = admin_client.get(reverse("admin:providers_provider_changelist")).content.decode()
        assert "failed: catalog:" in page and "503" in page
        assert provider.name in page

    def test_refresh_now_refreshes_the_selected_provider(self, admin_client, fake_upstream):
        provider = custom_provider(fake_upstream)
        serve_unpriced(fake_upstream)
        response = admin_client.post(
            reverse("admin:providers_provider_changelist"),
            {"action": "refresh_selected", "_selected_action": [provider.pk]},
            follow=True,
        )
        assert messages_of(response)[0].startswith("Refreshed 1 provider(s)")
        assert provider.offers.filter(upstream_model_id="llama3").exists()
        assert "1 offer(s) seen" in response.content.decode()


@pytest.mark.django_db
class TestCheckThisKeyNow:
    def test_a_key_that_passes_its_check_serves_again(self, admin_client, fake_upstream):
        provider = custom_provider(fake_upstream)
        serve_unpriced(fake_upstream)
        key = make_key(
            provider,
            "sk-local-000000000000000001",
            health=UpstreamKey.Health.INVALID,
            last_error="401 Unauthorized",
        )
        page = admin_client.get(reverse("admin:providers_upstreamkey_change", args=[key.pk]))
        check_url = reverse("admin:providers_upstreamkey_check", args=[key.pk])
        assert check_url in page.content.decode()

        response = admin_client.post(check_url, follow=True)

        key.refresh_from_db()
        assert key.health == UpstreamKey.Health.OK
        assert "Validated 1 key(s): 1 OK." in messages_of(response)

    def test_it_is_a_post_only_button(self, admin_client, fake_upstream):
        key = make_key(custom_provider(fake_upstream), "sk-local-000000000000000002")
        url = reverse("admin:providers_upstreamkey_check", args=[key.pk])
        assert admin_client.get(url).status_code == 405


@pytest.mark.django_db(transaction=True)
class TestFirstRefreshInTheBackground:
    def test_saving_a_new_provider_refreshes_it_and_says_so(self, admin_client, fake_upstream):
        serve_unpriced(fake_upstream, "local")
        response = admin_client.post(
            reverse("admin:providers_provider_add"),
            {
                "preset": "openai-compatible",
                "slug": "local",
                "name": "",
                "base_url": fake_upstream.url("local"),
                "currency": "USD",
            },
            follow=True,
        )
        assert any("runs now in the background" in m for m in messages_of(response))
        background.wait()
        provider = Provider.objects.get(slug="local")
        assert provider.offers.filter(upstream_model_id="llama3").exists()
        assert RefreshResult.objects.get(provider=provider).unpriced_models == ["llama3"]

    def test_saving_a_new_key_checks_it_and_reads_its_balance(self, admin_client, fake_upstream):
        provider = custom_provider(fake_upstream)
        serve_unpriced(fake_upstream)
        fake_upstream.reply("GET", "/vllm/models", status=401, json_body={"error": "bad key"})
        response = admin_client.post(
            reverse("admin:providers_upstreamkey_add"),
            {
                "provider": provider.pk,
                "label": "main",
                "secret": "sk-local-000000000000000003",
                "multiplier": "1",
                "balance": "",
            },
            follow=True,
        )
        assert any("Checking the key" in m for m in messages_of(response))
        background.wait()
        key = UpstreamKey.objects.get(provider=provider)
        assert key.health == UpstreamKey.Health.INVALID
        assert "401" in key.last_error


@pytest.mark.django_db
def test_add_provider_queues_the_first_refresh_and_says_so(fake_upstream):
    from django_q.brokers import get_broker
    from django_q.signing import SignedPackage

    get_broker().purge_queue()  # Redis's queue outlives the test database
    out = StringIO()
    call_command(
        "add_provider",
        "local",
        preset="openai-compatible",
        base_url=fake_upstream.url("local"),
        stdout=out,
    )
    assert "first refresh (catalog, prices, balances) is queued" in out.getvalue()
    # The database queue, or Redis's when REDIS_URL is set (CI): whichever broker is configured.
    (queued,) = get_broker().dequeue()
    task = SignedPackage.loads(queued[1])
    assert task["func"] == "providers.tasks.first_refresh" and task["args"] == ("local",)

    serve_unpriced(fake_upstream, "local")
    from providers.tasks import first_refresh

    assert first_refresh("local").startswith("Refreshed 1 provider(s)")
    assert Provider.objects.get(slug="local").offers.filter(upstream_model_id="llama3").exists()

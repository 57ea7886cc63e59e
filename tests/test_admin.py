from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from billing.models import ApiKey, CurrencyRate, hash_api_key
from providers import services
from providers.models import ModelOffer, Provider, RefreshResult, RefreshRun, UpstreamKey
from tests.payloads import openrouter_credits, openrouter_model, serve_openrouter

pytestmark = pytest.mark.django_db

SECRET_A = "sk-or-v1-fake-aaaaaaaaaaaaaaaaaaaaaaa1111"
SECRET_B = "sk-or-v1-fake-bbbbbbbbbbbbbbbbbbbbbbb2222"
ADMIN_MODELS = [
    "providers_provider",
    "providers_upstreamkey",
    "providers_modeloffer",
    "providers_refreshrun",
    "billing_currencyrate",
    "billing_apikey",
]


@pytest.fixture
def openrouter(fake_upstream) -> Provider:
    provider = services.create_provider(slug="openrouter", preset="openrouter")
    provider.base_url = fake_upstream.url("openrouter/api/v1")
    provider.save()
    return provider


@pytest.fixture
def catalog(openrouter) -> dict[str, object]:
    """One row of everything the admin lists."""
    deepseek = services.create_provider(slug="deepseek", preset="deepseek")
    key = services.add_upstream_key(provider=openrouter, secret=SECRET_A, label="main")
    offer = services.set_price(
        provider=openrouter,
        model="deepseek/deepseek-chat",
        input_per_mtok=Decimal("0.28"),
        output_per_mtok=Decimal("0.42"),
    )
    run = RefreshRun.objects.create(trigger=RefreshRun.Trigger.COMMAND, duration_ms=12)
    RefreshResult.objects.create(run=run, provider=openrouter, provider_slug="openrouter")
    api_key, _ = ApiKey.create_key(name="ci")
    return {
        "providers_provider": deepseek,
        "providers_upstreamkey": key,
        "providers_modeloffer": offer,
        "providers_refreshrun": run,
        "billing_currencyrate": CurrencyRate.objects.get(currency="CNY"),
        "billing_apikey": api_key,
    }


def messages_of(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def queries_for(client, url: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert client.get(url).status_code == 200
    return len(queries)


def select(action: str, *objects) -> dict:
    return {"action": action, "_selected_action": [obj.pk for obj in objects]}


class TestPagesRender:
    @pytest.mark.parametrize("model", ADMIN_MODELS)
    def test_the_changelist_renders(self, admin_client, catalog, model):
        response = admin_client.get(reverse(f"admin:{model}_changelist"))

        assert response.status_code == 200

    @pytest.mark.parametrize("model", sorted(set(ADMIN_MODELS) - {"providers_refreshrun"}))
    def test_the_add_page_renders(self, admin_client, catalog, model):
        response = admin_client.get(reverse(f"admin:{model}_add"))

        assert response.status_code == 200

    @pytest.mark.parametrize("model", ADMIN_MODELS)
    def test_the_change_page_renders(self, admin_client, catalog, model):
        obj = catalog[model]

        response = admin_client.get(reverse(f"admin:{model}_change", args=[obj.pk]))

        assert response.status_code == 200

    def test_refresh_runs_cannot_be_added_by_hand(self, admin_client):
        response = admin_client.get(reverse("admin:providers_refreshrun_add"))

        assert response.status_code == 403

    def test_the_provider_list_counts_active_offers_and_keys(self, admin_client, catalog):
        response = admin_client.get(reverse("admin:providers_provider_changelist"))

        rows = {row.slug: row for row in response.context["cl"].result_list}
        assert rows["openrouter"].active_offer_count == 1
        assert rows["openrouter"].key_total == 1
        assert rows["deepseek"].active_offer_count == 2
        assert rows["deepseek"].key_total == 0

    def test_the_offer_list_shows_prices_in_their_currency_and_in_usd(self, admin_client, catalog):
        CurrencyRate.objects.filter(currency="CNY").update(usd_per_unit=Decimal("0.5"))

        response = admin_client.get(
            reverse("admin:providers_modeloffer_changelist"), {"q": "deepseek-chat"}
        )

        content = response.content.decode()
        assert "0.28 USD" in content
        assert "$0.28 / $0.42" in content
        assert "2.00 CNY" in content
        assert "$1.00 / $1.50" in content

    @pytest.mark.parametrize("url_name", ["provider", "upstreamkey", "modeloffer"])
    def test_the_list_query_count_does_not_grow_with_its_rows(
        self, admin_client, catalog, url_name
    ):
        url = reverse(f"admin:providers_{url_name}_changelist")
        few = queries_for(admin_client, url)
        for index in range(5):
            provider = services.create_provider(
                slug=f"more-{index}", preset="openai-compatible", base_url="http://x.test/v1"
            )
            services.add_upstream_key(provider=provider, secret=f"sk-more-secret-{index}")
            services.set_price(
                provider=provider,
                model="m",
                input_per_mtok=Decimal(1),
                output_per_mtok=Decimal(2),
            )

        assert queries_for(admin_client, url) == few

    def test_an_offer_in_a_currency_without_rate_says_so(self, admin_client, catalog):
        CurrencyRate.objects.filter(currency="CNY").delete()

        response = admin_client.get(reverse("admin:providers_modeloffer_changelist"))

        assert "no CNY rate" in response.content.decode()


class TestProviderAdmin:
    def test_adding_a_provider_from_the_deepseek_preset_seeds_its_prices(self, admin_client):
        response = admin_client.post(
            reverse("admin:providers_provider_add"),
            {"preset": "deepseek", "slug": "deepseek", "name": "", "base_url": "", "currency": ""},
        )

        assert response.status_code == 302
        provider = Provider.objects.get(slug="deepseek")
        assert provider.currency == "CNY"
        assert provider.base_url == "https://api.deepseek.com"
        assert provider.balance_method == Provider.BalanceMethod.DEEPSEEK
        assert set(provider.offers.values_list("canonical_id", "price_source")) == {
            ("deepseek/deepseek-chat", "manual"),
            ("deepseek/deepseek-reasoner", "manual"),
        }

    def test_the_add_form_is_pre_filled_from_a_preset(self, admin_client):
        response = admin_client.get(reverse("admin:providers_provider_add"), {"preset": "zenmux"})

        form = response.context["adminform"].form
        assert form["base_url"].value() == "https://zenmux.ai/api/v1"
        assert form["slug"].value() == "zenmux"
        assert form["preset"].value() == "zenmux"

    def test_a_custom_provider_without_a_base_url_is_refused_with_the_reason(self, admin_client):
        response = admin_client.post(
            reverse("admin:providers_provider_add"),
            {"preset": "openai-compatible", "slug": "moonshot"},
        )

        assert response.status_code == 200
        assert "needs its base URL" in response.content.decode()
        assert not Provider.objects.exists()

    def test_a_provider_in_a_currency_without_rate_is_added_with_a_warning(self, admin_client):
        response = admin_client.post(
            reverse("admin:providers_provider_add"),
            {
                "preset": "openai-compatible",
                "slug": "mistral",
                "base_url": "https://api.mistral.ai/v1",
                "currency": "EUR",
            },
            follow=True,
        )

        assert Provider.objects.get(slug="mistral").currency == "EUR"
        assert any("No exchange rate for EUR" in m for m in messages_of(response))

    def test_a_provider_change_page_edits_its_model_aliases(self, admin_client, openrouter):
        url = reverse("admin:providers_provider_change", args=[openrouter.pk])
        data = {
            "name": "OpenRouter",
            "slug": "openrouter",
            "enabled": "on",
            "base_url": "https://openrouter.example/api/v1",
            "currency": "USD",
            "auth_style": "bearer",
            "read_timeout_s": "300",
            "catalog_format": "openrouter",
            "default_vendor": "",
            "balance_method": "openrouter_credits",
            "key_check": "openrouter_key",
            "key_check_model": "",
            "aliases-TOTAL_FORMS": "1",
            "aliases-INITIAL_FORMS": "0",
            "aliases-MIN_NUM_FORMS": "0",
            "aliases-MAX_NUM_FORMS": "1000",
            "aliases-0-upstream_model_id": "Qwen/Qwen3-Max",
            "aliases-0-canonical_id": "Qwen/Qwen3-Max-Preview",
        }

        response = admin_client.post(url, data)

        assert response.status_code == 302
        openrouter.refresh_from_db()
        assert openrouter.base_url == "https://openrouter.example/api/v1"
        assert openrouter.aliases.get().canonical_id == "qwen/qwen3-max-preview"


class TestUpstreamKeyAdmin:
    def test_adding_a_key_stores_it_encrypted_with_an_automatic_balance(
        self, admin_client, openrouter
    ):
        response = admin_client.post(
            reverse("admin:providers_upstreamkey_add"),
            {
                "provider": openrouter.pk,
                "label": "main",
                "secret": SECRET_A,
                "multiplier": "1",
                "balance": "",
            },
        )

        assert response.status_code == 302
        key = UpstreamKey.objects.get()
        assert key.secret == SECRET_A
        assert key.balance_source == UpstreamKey.BalanceSource.AUTO

    def test_adding_a_duplicate_key_is_refused_without_showing_the_secret(
        self, admin_client, openrouter
    ):
        services.add_upstream_key(provider=openrouter, secret=SECRET_A, label="main")

        response = admin_client.post(
            reverse("admin:providers_upstreamkey_add"),
            {"provider": openrouter.pk, "secret": SECRET_A, "multiplier": "1"},
        )

        content = response.content.decode()
        assert response.status_code == 200
        assert "already stored" in content
        assert SECRET_A not in content
        assert UpstreamKey.objects.count() == 1

    def test_the_secret_is_required_when_adding_a_key(self, admin_client, openrouter):
        response = admin_client.post(
            reverse("admin:providers_upstreamkey_add"),
            {"provider": openrouter.pk, "secret": "", "multiplier": "1"},
        )

        assert response.status_code == 200
        assert response.context["adminform"].form.errors["secret"]
        assert not UpstreamKey.objects.exists()

    def test_the_disable_and_enable_actions_say_what_they_did(self, admin_client, openrouter):
        first = services.add_upstream_key(provider=openrouter, secret=SECRET_A)
        second = services.add_upstream_key(provider=openrouter, secret=SECRET_B)
        url = reverse("admin:providers_upstreamkey_changelist")

        response = admin_client.post(url, select("disable_selected", first, second), follow=True)

        assert "Disabled 2 key(s)." in messages_of(response)
        assert not UpstreamKey.objects.filter(enabled=True).exists()

        response = admin_client.post(url, select("enable_selected", first), follow=True)

        assert "Enabled 1 key(s)." in messages_of(response)
        assert list(UpstreamKey.objects.filter(enabled=True)) == [first]

    def test_the_validate_action_counts_accepted_and_rejected_keys(
        self, admin_client, openrouter, fake_upstream
    ):
        pytest.importorskip("providers.refresh")
        from tests.fake_upstream import Reply

        good = services.add_upstream_key(provider=openrouter, secret=SECRET_A, label="good")
        bad = services.add_upstream_key(provider=openrouter, secret=SECRET_B, label="bad")
        fake_upstream.handle(
            "GET",
            "/openrouter/api/v1/key",
            lambda request: (
                Reply(status=200, json_body={"data": {}})
                if request.bearer == SECRET_A
                else Reply(status=401, json_body={"error": {"message": "User not found."}})
            ),
        )

        response = admin_client.post(
            reverse("admin:providers_upstreamkey_changelist"),
            select("validate_keys", good, bad),
            follow=True,
        )

        [message] = messages_of(response)
        assert message.startswith("Validated 2 key(s): 1 OK, 1 invalid")
        assert "openrouter:bad" in message
        bad.refresh_from_db()
        good.refresh_from_db()
        assert bad.health == UpstreamKey.Health.INVALID
        assert good.health == UpstreamKey.Health.OK

    def test_the_balance_action_reads_the_providers_credits(
        self, admin_client, openrouter, fake_upstream
    ):
        pytest.importorskip("providers.refresh")
        key = services.add_upstream_key(provider=openrouter, secret=SECRET_A, label="main")
        fake_upstream.reply(
            "GET",
            "/openrouter/api/v1/credits",
            json_body=openrouter_credits(20, 7.5),
        )

        response = admin_client.post(
            reverse("admin:providers_upstreamkey_changelist"),
            select("refresh_balances", key),
            follow=True,
        )

        key.refresh_from_db()
        assert key.balance == Decimal("12.5")
        assert messages_of(response) == [
            "Refreshed the balance of 1 key(s) (openrouter:main: 12.50 USD)."
        ]

    def test_the_balance_action_reports_a_provider_failure(
        self, admin_client, openrouter, fake_upstream
    ):
        pytest.importorskip("providers.refresh")
        key = services.add_upstream_key(provider=openrouter, secret=SECRET_A, label="main")
        fake_upstream.reply("GET", "/openrouter/api/v1/credits", status=500, body=b"boom")

        response = admin_client.post(
            reverse("admin:providers_upstreamkey_changelist"),
            select("refresh_balances", key),
            follow=True,
        )

        [message] = messages_of(response)
        assert "1 failed (openrouter:main:" in message
        assert SECRET_A not in message

    def test_the_health_badge_is_coloured(self, admin_client, openrouter):
        key = services.add_upstream_key(provider=openrouter, secret=SECRET_A)
        key.health = UpstreamKey.Health.INVALID
        key.save()
        cooling = services.add_upstream_key(provider=openrouter, secret=SECRET_B)
        cooling.cooldown_until = timezone.now() + timedelta(minutes=1)
        cooling.save()

        page = admin_client.get(reverse("admin:providers_upstreamkey_changelist")).content.decode()

        assert 'class="kd-badge kd-health-invalid">Invalid<' in page
        assert 'class="kd-badge kd-health-cooling">Cooling down<' in page
        assert "keyaos/dashboard" in page  # the stylesheet that colours the badges


class TestModelOfferAdmin:
    def test_the_refresh_button_runs_a_refresh_and_reports_it(
        self, admin_client, openrouter, fake_upstream
    ):
        pytest.importorskip("providers.refresh")
        serve_openrouter(
            fake_upstream,
            openrouter_model("openai/gpt-4o", prompt="0.0000025", completion="0.00001"),
            openrouter_model(
                "deepseek/deepseek-chat", prompt="0.00000028", completion="0.00000042"
            ),
            prefix="openrouter/api/v1",
        )

        response = admin_client.post(reverse("admin:providers_modeloffer_refresh"), follow=True)

        run = RefreshRun.objects.get()
        assert run.trigger == RefreshRun.Trigger.ADMIN
        assert response.redirect_chain[-1][0] == reverse("admin:providers_modeloffer_changelist")
        assert messages_of(response)[0].startswith("Refreshed 1 provider(s)")
        assert "2 offer(s) added" in messages_of(response)[0]
        offer = ModelOffer.objects.get(upstream_model_id="openai/gpt-4o")
        assert offer.input_price_per_mtok == Decimal("2.5")

    def test_the_refresh_button_shows_each_providers_error(
        self, admin_client, openrouter, fake_upstream
    ):
        pytest.importorskip("providers.refresh")
        fake_upstream.reply("GET", "/openrouter/api/v1/models", status=503, body=b"down")

        response = admin_client.post(reverse("admin:providers_modeloffer_refresh"), follow=True)

        assert any(message.startswith("openrouter: ") for message in messages_of(response))
        assert RefreshRun.objects.get().error_count == 1

    def test_the_refresh_button_only_accepts_post(self, admin_client):
        response = admin_client.get(reverse("admin:providers_modeloffer_refresh"))

        assert response.status_code == 405

    def test_the_changelist_has_the_refresh_button(self, admin_client):
        response = admin_client.get(reverse("admin:providers_modeloffer_changelist"))

        assert "Refresh models now" in response.content.decode()

    def test_the_compare_page_lists_every_provider_offering_a_model(self, admin_client, catalog):
        url = reverse("admin:model", args=["deepseek/deepseek-chat"])

        response = admin_client.get(url)

        content = response.content.decode()
        assert response.status_code == 200
        rows = response.context["rows"]
        assert {row["offer"].provider.slug for row in rows} == {"openrouter", "deepseek"}
        assert "2.00 CNY" in content
        assert "0.28 USD" in content
        assert "131072" in content

    def test_each_offer_row_links_to_the_compare_page(self, admin_client, catalog):
        response = admin_client.get(reverse("admin:providers_modeloffer_changelist"))

        url = reverse("admin:model", args=["deepseek/deepseek-chat"])
        assert url in response.content.decode()

    def test_editing_a_price_in_the_admin_makes_it_manual_and_records_it(
        self, admin_client, openrouter
    ):
        offer = ModelOffer.objects.create(
            provider=openrouter,
            upstream_model_id="openai/gpt-4o",
            canonical_id="openai/gpt-4o",
            input_price_per_mtok=Decimal("2.5"),
            output_price_per_mtok=Decimal("10"),
        )
        offer.record_price()
        url = reverse("admin:providers_modeloffer_change", args=[offer.pk])
        page = admin_client.get(url)
        history = page.context["inline_admin_formsets"][0].formset.management_form

        response = admin_client.post(
            url,
            {
                "provider": openrouter.pk,
                "upstream_model_id": "openai/gpt-4o",
                "canonical_id": "openai/gpt-4o",
                "display_name": "",
                "kind": "chat",
                "active": "on",
                "context_length": "",
                "input_price_per_mtok": "2",
                "output_price_per_mtok": "10",
                "cached_input_price_per_mtok": "",
                "price_tiers": "{}",
                **{history.add_prefix(name): value for name, value in history.initial.items()},
            },
        )

        assert response.status_code == 302
        offer.refresh_from_db()
        assert offer.price_source == ModelOffer.PriceSource.MANUAL
        assert offer.input_price_per_mtok == Decimal("2")
        assert offer.price_history.count() == 2

    def test_a_negative_price_is_refused(self, admin_client, openrouter):
        response = admin_client.post(
            reverse("admin:providers_modeloffer_add"),
            {
                "provider": openrouter.pk,
                "upstream_model_id": "x/y",
                "kind": "chat",
                "input_price_per_mtok": "-1",
                "output_price_per_mtok": "1",
                "price_tiers": "{}",
            },
        )

        assert response.status_code == 200
        assert "cannot be negative" in response.content.decode()
        assert not ModelOffer.objects.exists()

    def test_an_offer_added_by_hand_gets_its_canonical_id_and_a_manual_price(
        self, admin_client, openrouter
    ):
        response = admin_client.post(
            reverse("admin:providers_modeloffer_add"),
            {
                "provider": openrouter.pk,
                "upstream_model_id": "Vendor/Model-X",
                "canonical_id": "",
                "kind": "chat",
                "active": "on",
                "input_price_per_mtok": "1",
                "output_price_per_mtok": "2",
                "price_tiers": "{}",
            },
        )

        assert response.status_code == 302
        offer = ModelOffer.objects.get()
        assert offer.canonical_id == "vendor/model-x"
        assert offer.price_source == ModelOffer.PriceSource.MANUAL
        assert offer.price_history.count() == 1


class TestBillingAdmin:
    def test_adding_a_client_key_shows_it_once(self, admin_client):
        response = admin_client.post(
            reverse("admin:billing_apikey_add"),
            {"name": "ci", "enabled": "on", "budget_period": "lifetime"},
            follow=True,
        )

        [shown] = [m for m in messages_of(response) if "Copy it now" in m]
        plain = re.search(r"sk-keyaos-[A-Za-z0-9_-]+", shown).group(0)
        api_key = ApiKey.objects.get()
        assert api_key.key_hash == hash_api_key(plain)
        assert plain.startswith(api_key.prefix)
        for url in (
            reverse("admin:billing_apikey_changelist"),
            reverse("admin:billing_apikey_change", args=[api_key.pk]),
        ):
            content = admin_client.get(url).content.decode()
            assert plain not in content
            assert api_key.key_hash not in content

    def test_the_client_key_add_form_never_asks_for_the_key_itself(self, admin_client):
        response = admin_client.get(reverse("admin:billing_apikey_add"))

        fields = list(response.context["adminform"].form.fields)
        assert fields[:2] == ["name", "enabled"]
        assert not {"key_hash", "prefix", "spent_usd"} & set(fields)

    def test_usd_needs_no_rate(self, admin_client):
        response = admin_client.post(
            reverse("admin:billing_currencyrate_add"), {"currency": "USD", "usd_per_unit": "1"}
        )

        assert response.status_code == 200
        assert not CurrencyRate.objects.filter(currency="USD").exists()

    def test_a_currency_rate_must_be_positive(self, admin_client):
        response = admin_client.post(
            reverse("admin:billing_currencyrate_add"), {"currency": "eur", "usd_per_unit": "0"}
        )

        assert response.status_code == 200
        assert not CurrencyRate.objects.filter(currency="EUR").exists()

    def test_a_currency_rate_is_stored_upper_case(self, admin_client):
        response = admin_client.post(
            reverse("admin:billing_currencyrate_add"), {"currency": "eur", "usd_per_unit": "1.08"}
        )

        assert response.status_code == 302
        assert CurrencyRate.objects.get(currency="EUR").usd_per_unit == Decimal("1.08")

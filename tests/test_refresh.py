"""The refresh keeps offers, prices and balances current and never trusts a failed fetch."""

from __future__ import annotations

from decimal import Decimal

import pytest

from providers.models import (
    ModelAlias,
    ModelOffer,
    PriceHistory,
    Provider,
    RefreshRun,
    UpstreamKey,
)
from providers.presets import PRESETS
from providers.refresh import UnknownProvider, refresh_providers
from routing.models import SnapshotVersion
from tests.payloads import (
    deepinfra_model,
    deepseek_balance,
    deepseek_balance_info,
    deepseek_models,
    openrouter_credits,
    openrouter_model,
    serve_deepinfra,
    serve_openrouter,
    serve_zenmux,
    upstream_error,
    zenmux_model,
    zenmux_tiers,
)

pytestmark = pytest.mark.django_db


def make_provider(fake_upstream, preset: str, slug: str | None = None, **fields) -> Provider:
    slug = slug or preset
    values = PRESETS[preset].provider_fields() | fields
    values["base_url"] = fake_upstream.url(slug)
    return Provider.objects.create(slug=slug, **values)


def make_key(provider: Provider, label: str = "main", **fields) -> UpstreamKey:
    key = UpstreamKey(provider=provider, label=label, **fields)
    key.set_secret(f"sk-or-v1-test-{provider.slug}-{label}-0123456789")
    key.save()
    return key


def offer(provider: Provider, upstream_model_id: str) -> ModelOffer:
    return ModelOffer.objects.get(provider=provider, upstream_model_id=upstream_model_id)


def active_ids(provider: Provider) -> set[str]:
    return set(provider.offers.filter(active=True).values_list("upstream_model_id", flat=True))


class TestCatalogs:
    def test_it_creates_offers_priced_per_million_in_the_providers_currency(self, fake_upstream):
        openrouter = make_provider(fake_upstream, "openrouter")
        deepinfra = make_provider(fake_upstream, "deepinfra")
        zenmux = make_provider(fake_upstream, "zenmux")
        serve_openrouter(fake_upstream, openrouter_model("google/gemini-2.5-pro"))
        serve_deepinfra(fake_upstream, deepinfra_model("Qwen/Qwen3-Max"))
        serve_zenmux(
            fake_upstream,
            zenmux_model(
                "openai/gpt-5",
                prompt=zenmux_tiers(1.25, 2.5),
                completion=zenmux_tiers(10, 15),
            ),
        )

        run = refresh_providers(trigger="command")

        assert run.error_count == 0
        gemini = offer(openrouter, "google/gemini-2.5-pro")
        assert gemini.price_tuple() == (Decimal("1"), Decimal("2"), Decimal("0.1"))
        assert gemini.canonical_id == "google/gemini-2.5-pro"
        qwen = offer(deepinfra, "Qwen/Qwen3-Max")
        assert qwen.canonical_id == "qwen/qwen3-max"
        assert qwen.price_tuple() == (Decimal("0.5"), Decimal("1.5"), None)
        gpt = offer(zenmux, "openai/gpt-5")
        assert gpt.price_tuple() == (Decimal("1.25"), Decimal("10"), None)
        assert [t["value"] for t in gpt.price_tiers["prompt"]] == ["1.25", "2.5"]
        assert PriceHistory.objects.count() == 3
        assert all(o.last_refreshed_at for o in ModelOffer.objects.all())

    def test_it_records_what_it_did_for_each_provider(self, fake_upstream):
        openrouter = make_provider(fake_upstream, "openrouter")
        serve_openrouter(fake_upstream, openrouter_model("a/one"), openrouter_model("a/two"))

        run = refresh_providers(trigger="schedule")

        run.refresh_from_db()
        assert run.trigger == RefreshRun.Trigger.SCHEDULE
        assert run.duration_ms is not None
        assert run.ok
        [result] = run.results.all()
        assert result.provider == openrouter
        assert (result.offers_seen, result.added, result.updated, result.deactivated) == (
            2,
            2,
            0,
            0,
        )
        assert result.error == ""

    def test_it_keeps_the_operators_prices_for_a_catalog_without_prices(self, fake_upstream):
        deepseek = make_provider(fake_upstream, "deepseek")
        make_key(deepseek)
        for model_id, cached in [("deepseek-chat", "0.2"), ("deepseek-reasoner", "0.25")]:
            ModelOffer.objects.create(
                provider=deepseek,
                upstream_model_id=model_id,
                canonical_id=f"deepseek/{model_id}",
                input_price_per_mtok=Decimal("2"),
                output_price_per_mtok=Decimal("3"),
                cached_input_price_per_mtok=Decimal(cached),
                context_length=131072,
                price_source=ModelOffer.PriceSource.MANUAL,
            )
        fake_upstream.reply(
            "GET",
            "/deepseek/models",
            json_body=deepseek_models("deepseek-chat", "deepseek-reasoner"),
        )
        fake_upstream.reply(
            "GET",
            "/deepseek/user/balance",
            json_body=deepseek_balance(deepseek_balance_info("CNY", "5")),
        )

        run = refresh_providers(trigger="command")

        assert run.error_count == 0
        chat = offer(deepseek, "deepseek-chat")
        assert chat.price_tuple() == (Decimal("2"), Decimal("3"), Decimal("0.2"))
        assert chat.currency == "CNY"
        assert chat.context_length == 131072
        assert chat.price_source == ModelOffer.PriceSource.MANUAL
        assert offer(deepseek, "deepseek-reasoner").cached_input_price_per_mtok == Decimal("0.25")
        assert active_ids(deepseek) == {"deepseek-chat", "deepseek-reasoner"}
        assert PriceHistory.objects.count() == 0

    def test_a_price_set_by_the_operator_survives_a_catalog_that_has_prices(self, fake_upstream):
        openrouter = make_provider(fake_upstream, "openrouter")
        ModelOffer.objects.create(
            provider=openrouter,
            upstream_model_id="a/model",
            canonical_id="a/model",
            input_price_per_mtok=Decimal("0.7"),
            output_price_per_mtok=Decimal("0.9"),
            price_source=ModelOffer.PriceSource.MANUAL,
        )
        serve_openrouter(fake_upstream, openrouter_model("a/model", name="A/Model"))

        refresh_providers(trigger="command")

        manual = offer(openrouter, "a/model")
        assert manual.price_tuple() == (Decimal("0.7"), Decimal("0.9"), None)
        assert manual.display_name == "A/Model"

    def test_new_offers_of_a_catalog_without_prices_start_unpriced(self, fake_upstream):
        local = make_provider(fake_upstream, "openai-compatible", slug="local")
        fake_upstream.reply(
            "GET",
            "/local/models",
            json_body={"data": [{"id": "llama3.1:8b"}, {"id": "nomic-embed-text"}]},
        )

        refresh_providers(trigger="command")

        assert not offer(local, "llama3.1:8b").has_prices
        assert offer(local, "nomic-embed-text").kind == ModelOffer.Kind.EMBEDDING
        assert PriceHistory.objects.count() == 0


class TestDeactivation:
    def test_it_deactivates_exactly_the_offer_missing_from_a_successful_fetch(self, fake_upstream):
        openrouter = make_provider(fake_upstream, "openrouter")
        serve_openrouter(fake_upstream, *(openrouter_model(f"v/m{i}") for i in range(3)))
        refresh_providers(trigger="command")
        serve_openrouter(fake_upstream, openrouter_model("v/m0"), openrouter_model("v/m2"))

        run = refresh_providers(trigger="command")

        assert active_ids(openrouter) == {"v/m0", "v/m2"}
        assert run.results.get().deactivated == 1

    @pytest.mark.parametrize(
        "reply",
        [
            {"status": 500, "json_body": upstream_error("internal error")},
            {"status": 200, "json_body": {"data": []}, "delay_s": 1.5},
            {"status": 200, "body": b'{"data": [{"id": "v/m0"', "content_type": "application/json"},
            {"status": 200, "json_body": {"data": []}},
        ],
        ids=["http-500", "timeout", "malformed-json", "empty-list"],
    )
    def test_it_leaves_offers_active_when_the_fetch_fails(self, fake_upstream, settings, reply):
        settings.KEYAOS_FETCH_TIMEOUT_S = 0.3
        deepinfra = make_provider(fake_upstream, "deepinfra")
        models = [deepinfra_model("v/m0"), deepinfra_model("v/m1")]
        fake_upstream.reply("GET", "/deepinfra/models", json_body={"data": models})
        refresh_providers(trigger="command")
        fake_upstream.reply("GET", "/deepinfra/models", **reply)

        run = refresh_providers(trigger="command")

        assert active_ids(deepinfra) == {"v/m0", "v/m1"}
        result = run.results.get()
        assert result.error
        assert (result.added, result.updated, result.deactivated) == (0, 0, 0)
        assert run.error_count == 1
        assert not run.ok

    def test_an_offer_that_comes_back_is_reactivated(self, fake_upstream):
        deepinfra = make_provider(fake_upstream, "deepinfra")
        serve_deepinfra(fake_upstream, deepinfra_model("v/m0"))
        refresh_providers(trigger="command")
        ModelOffer.objects.filter(provider=deepinfra).update(active=False)

        run = refresh_providers(trigger="command")

        assert active_ids(deepinfra) == {"v/m0"}
        assert run.results.get().updated == 1


class TestIsolation:
    def test_a_failing_slow_or_malformed_provider_does_not_stop_the_others(
        self, fake_upstream, settings
    ):
        settings.KEYAOS_FETCH_TIMEOUT_S = 0.3
        healthy = make_provider(fake_upstream, "deepinfra", slug="healthy")
        make_provider(fake_upstream, "deepinfra", slug="broken")
        make_provider(fake_upstream, "deepinfra", slug="slow")
        make_provider(fake_upstream, "deepinfra", slug="garbled")
        fake_upstream.reply("GET", "/healthy/models", json_body={"data": [deepinfra_model("a/b")]})
        fake_upstream.reply("GET", "/broken/models", status=502, body=b"Bad Gateway")
        fake_upstream.reply(
            "GET", "/slow/models", json_body={"data": [deepinfra_model("a/b")]}, delay_s=1.5
        )
        fake_upstream.reply(
            "GET", "/garbled/models", json_body={"data": [{"id": "a/b", "metadata": "nope"}]}
        )
        seen = []

        run = refresh_providers(trigger="command", progress=seen.append)

        assert active_ids(healthy) == {"a/b"}
        assert ModelOffer.objects.count() == 1
        errors = {r.provider_slug: r.error for r in run.results.all()}
        assert errors["healthy"] == ""
        assert "HTTP 502" in errors["broken"]
        assert "0.3 s" in errors["slow"]
        assert "metadata" in errors["garbled"]
        assert run.error_count == 3
        assert sorted(r.provider_slug for r in seen) == ["broken", "garbled", "healthy", "slow"]

    def test_disabled_providers_are_skipped(self, fake_upstream):
        make_provider(fake_upstream, "deepinfra", enabled=False)

        run = refresh_providers(trigger="command")

        assert run.results.count() == 0
        assert fake_upstream.requests == []

    def test_it_refreshes_only_the_named_provider(self, fake_upstream):
        deepinfra = make_provider(fake_upstream, "deepinfra")
        make_provider(fake_upstream, "zenmux")
        serve_deepinfra(fake_upstream, deepinfra_model("a/b"))

        run = refresh_providers(trigger="command", provider_slug="deepinfra")

        assert [r.provider for r in run.results.all()] == [deepinfra]
        assert fake_upstream.received("/zenmux/models") == []

    def test_an_unknown_slug_is_a_clear_error(self):
        with pytest.raises(UnknownProvider, match="nope") as caught:
            refresh_providers(trigger="command", provider_slug="nope")

        assert isinstance(caught.value, Provider.DoesNotExist)
        assert RefreshRun.objects.count() == 0


class TestPriceHistory:
    def test_a_price_change_writes_one_price_history_row(self, fake_upstream):
        openrouter = make_provider(fake_upstream, "openrouter")
        serve_openrouter(fake_upstream, openrouter_model("a/m", prompt="0.000001"))
        refresh_providers(trigger="command")
        serve_openrouter(fake_upstream, openrouter_model("a/m", prompt="0.0000015"))

        run = refresh_providers(trigger="command")

        model = offer(openrouter, "a/m")
        assert model.input_price_per_mtok == Decimal("1.5")
        prices = list(
            model.price_history.order_by("id").values_list("input_price_per_mtok", flat=True)
        )
        assert prices == [Decimal("1"), Decimal("1.5")]
        assert run.results.get().updated == 1

    def test_no_price_change_writes_no_price_history(self, fake_upstream):
        openrouter = make_provider(fake_upstream, "openrouter")
        serve_openrouter(fake_upstream, openrouter_model("a/m"))
        refresh_providers(trigger="command")

        run = refresh_providers(trigger="command")

        assert offer(openrouter, "a/m").price_history.count() == 1
        assert run.results.get().updated == 0

    def test_a_zenmux_tier_change_updates_the_tiers(self, fake_upstream):
        zenmux = make_provider(fake_upstream, "zenmux")
        serve_zenmux(
            fake_upstream,
            zenmux_model("a/m", prompt=zenmux_tiers(1, 2), completion=zenmux_tiers(8, 12)),
        )
        refresh_providers(trigger="command")
        serve_zenmux(
            fake_upstream,
            zenmux_model("a/m", prompt=zenmux_tiers(1, 3), completion=zenmux_tiers(8, 18)),
        )

        refresh_providers(trigger="command")

        model = offer(zenmux, "a/m")
        assert model.price_tiers["prompt"][1]["value"] == 3
        assert model.price_history.count() == 1


class TestCanonicalIds:
    def test_an_alias_edited_in_the_admin_takes_effect_at_the_next_refresh(self, fake_upstream):
        deepseek = make_provider(fake_upstream, "deepseek")
        make_key(deepseek, balance_source=UpstreamKey.BalanceSource.MANUAL)
        fake_upstream.reply("GET", "/deepseek/models", json_body=deepseek_models("deepseek-chat"))
        refresh_providers(trigger="command")
        assert offer(deepseek, "deepseek-chat").canonical_id == "deepseek/deepseek-chat"
        ModelAlias.objects.create(
            provider=deepseek,
            upstream_model_id="deepseek-chat",
            canonical_id="deepseek/deepseek-v3",
        )

        refresh_providers(trigger="command")

        assert offer(deepseek, "deepseek-chat").canonical_id == "deepseek/deepseek-v3"


class TestBalances:
    def test_it_stores_openrouter_balances_in_usd_for_auto_keys_only(self, fake_upstream):
        openrouter = make_provider(fake_upstream, "openrouter")
        auto = make_key(openrouter, "auto", balance_source=UpstreamKey.BalanceSource.AUTO)
        manual = make_key(
            openrouter,
            "manual",
            balance_source=UpstreamKey.BalanceSource.MANUAL,
            balance=Decimal("9"),
        )
        serve_openrouter(fake_upstream, openrouter_model("a/m"))
        fake_upstream.reply(
            "GET",
            "/openrouter/credits",
            json_body=openrouter_credits(10, 2.5),
        )

        run = refresh_providers(trigger="command")

        auto.refresh_from_db()
        manual.refresh_from_db()
        assert auto.balance == Decimal("7.5")
        assert auto.balance_updated_at is not None
        assert manual.balance == Decimal("9")
        assert run.results.get().balances_updated == 1
        [credits] = fake_upstream.received("/openrouter/credits")
        assert credits.bearer == auto.secret

    def test_it_keeps_a_deepseek_balance_in_cny_even_when_usd_comes_first(self, fake_upstream):
        deepseek = make_provider(fake_upstream, "deepseek")
        key = make_key(deepseek, balance_source=UpstreamKey.BalanceSource.AUTO)
        fake_upstream.reply("GET", "/deepseek/models", json_body=deepseek_models("deepseek-chat"))
        fake_upstream.reply(
            "GET",
            "/deepseek/user/balance",
            json_body=deepseek_balance(
                deepseek_balance_info("USD", "3.00"), deepseek_balance_info("CNY", "42.17")
            ),
        )

        refresh_providers(trigger="command")

        key.refresh_from_db()
        assert key.balance == Decimal("42.17")
        assert key.provider.currency == "CNY"

    @pytest.mark.parametrize(
        ("credits", "balance", "health", "usable"),
        [
            pytest.param(
                openrouter_credits(20, 0),
                Decimal("20"),
                UpstreamKey.Health.OK,
                True,
                id="with-credit-again-serves-again",
            ),
            pytest.param(
                openrouter_credits(5, 5),
                Decimal("0"),
                UpstreamKey.Health.EXHAUSTED,
                False,
                id="still-without-credit-stays-exhausted",
            ),
        ],
    )
    def test_an_exhausted_key_follows_its_refreshed_balance(
        self, fake_upstream, credits, balance, health, usable
    ):
        openrouter = make_provider(fake_upstream, "openrouter")
        key = make_key(
            openrouter,
            balance_source=UpstreamKey.BalanceSource.AUTO,
            health=UpstreamKey.Health.EXHAUSTED,
        )
        serve_openrouter(fake_upstream, openrouter_model("a/m"))
        fake_upstream.reply("GET", "/openrouter/credits", json_body=credits)

        refresh_providers(trigger="command")

        key.refresh_from_db()
        assert key.health == health
        assert key.balance == balance
        assert key.is_usable() is usable

    def test_a_failed_balance_is_recorded_while_the_catalog_still_updates(self, fake_upstream):
        openrouter = make_provider(fake_upstream, "openrouter")
        key = make_key(openrouter, balance_source=UpstreamKey.BalanceSource.AUTO)
        serve_openrouter(fake_upstream, openrouter_model("a/m"))
        fake_upstream.reply(
            "GET",
            "/openrouter/credits",
            status=401,
            json_body=upstream_error(f"No auth credentials found for {key.secret}"),
        )

        run = refresh_providers(trigger="command")

        result = run.results.get()
        assert result.added == 1
        assert "balance of key main" in result.error
        assert key.secret not in result.error
        key.refresh_from_db()
        assert key.balance is None


class TestSnapshot:
    def test_a_change_tells_the_gateway_to_rebuild_its_snapshot(
        self, fake_upstream, django_capture_on_commit_callbacks
    ):
        make_provider(fake_upstream, "deepinfra")
        serve_deepinfra(fake_upstream, deepinfra_model("a/b"))
        before = SnapshotVersion.current()

        with django_capture_on_commit_callbacks(execute=True):
            refresh_providers(trigger="command")

        assert SnapshotVersion.current() not in (None, before)


class TestUnreachableProviders:
    def test_it_does_not_wait_for_balances_of_a_provider_that_did_not_answer(
        self, fake_upstream, settings
    ):
        settings.KEYAOS_FETCH_TIMEOUT_S = 0.3
        openrouter = make_provider(fake_upstream, "openrouter")
        for label in ("one", "two"):
            make_key(openrouter, label, balance_source=UpstreamKey.BalanceSource.AUTO)
        fake_upstream.reply("GET", "/openrouter/models", json_body={"data": []}, delay_s=1.5)

        run = refresh_providers(trigger="schedule")

        error = run.results.get().error
        assert "no answer within 0.3 s" in error
        assert "balance of key one: skipped" in error
        assert fake_upstream.received("/openrouter/credits") == []
        assert run.results.get().duration_ms < 1400


class TestLogging:
    def test_it_logs_one_line_per_provider_without_secrets(self, fake_upstream, caplog):
        openrouter = make_provider(fake_upstream, "openrouter")
        key = make_key(openrouter, balance_source=UpstreamKey.BalanceSource.AUTO)
        make_provider(fake_upstream, "deepinfra")
        serve_openrouter(fake_upstream, openrouter_model("a/m"))
        fake_upstream.reply(
            "GET", "/openrouter/credits", status=403, json_body={"error": f"bad key {key.secret}"}
        )
        serve_deepinfra(fake_upstream, deepinfra_model("a/b"))

        with caplog.at_level("INFO", logger="providers.refresh"):
            refresh_providers(trigger="command")

        lines = [r.getMessage() for r in caplog.records if r.name == "providers.refresh"]
        assert len(lines) == 2
        assert lines[0].startswith("refresh deepinfra: 1 seen, 1 added")
        assert lines[1].startswith("refresh openrouter: FAILED")
        assert key.secret not in caplog.text

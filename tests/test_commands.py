from __future__ import annotations

import io
from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command

from providers.models import ModelOffer, PriceHistory, Provider, UpstreamKey
from tests.factories import make_offer

pytestmark = pytest.mark.django_db

SECRET = "sk-or-v1-fake-0123456789abcdef0123456789"


def run(*args, stdin: str | None = None, **options) -> tuple[str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    if stdin is not None:
        options["stdin"] = io.StringIO(stdin)
    call_command(*args, stdout=stdout, stderr=stderr, **options)
    return stdout.getvalue(), stderr.getvalue()


@pytest.fixture
def openrouter() -> Provider:
    run("add_provider", "openrouter", "--preset", "openrouter")
    return Provider.objects.get(slug="openrouter")


class TestAddProvider:
    def test_it_creates_a_provider_from_a_preset(self):
        out, _ = run("add_provider", "openrouter", "--preset", "openrouter")

        provider = Provider.objects.get(slug="openrouter")
        assert provider.name == "OpenRouter"
        assert provider.base_url == "https://openrouter.ai/api/v1"
        assert provider.catalog_format == Provider.CatalogFormat.OPENROUTER
        assert provider.balance_method == Provider.BalanceMethod.OPENROUTER
        assert provider.currency == "USD"
        assert "Added provider openrouter" in out

    def test_a_new_provider_waits_keyaos_read_timeout_s_for_its_answers(self, settings):
        settings.KEYAOS_READ_TIMEOUT_S = 42.0

        run("add_provider", "openrouter", "--preset", "openrouter")

        assert Provider.objects.get(slug="openrouter").read_timeout_s == 42.0

    def test_the_deepseek_preset_seeds_manual_cny_prices(self):
        out, _ = run("add_provider", "deepseek", "--preset", "deepseek")

        provider = Provider.objects.get(slug="deepseek")
        assert provider.currency == "CNY"
        chat = provider.offers.get(upstream_model_id="deepseek-chat")
        assert chat.canonical_id == "deepseek/deepseek-chat"
        assert chat.price_source == ModelOffer.PriceSource.MANUAL
        assert chat.input_price_per_mtok == Decimal("2")
        assert chat.output_price_per_mtok == Decimal("3")
        assert chat.cached_input_price_per_mtok == Decimal("0.2")
        assert chat.context_length == 131072
        assert provider.offers.count() == 2
        assert PriceHistory.objects.filter(offer__provider=provider).count() == 2
        assert "Seeded 2 manual price(s)" in out

    def test_a_deepseek_provider_billed_in_another_currency_gets_no_seed_prices(self):
        _, err = run("add_provider", "deepseek-usd", "--preset", "deepseek", "--currency", "USD")

        assert not ModelOffer.objects.filter(provider__slug="deepseek-usd").exists()
        assert "set_price" in err

    def test_a_custom_provider_needs_a_base_url(self):
        with pytest.raises(CommandError, match="base URL"):
            run("add_provider", "moonshot", "--preset", "openai-compatible")

    def test_it_creates_a_custom_provider_named_after_its_slug(self):
        run(
            "add_provider",
            "moonshot",
            "--preset",
            "openai-compatible",
            "--base-url",
            "https://api.moonshot.ai/v1",
        )

        provider = Provider.objects.get(slug="moonshot")
        assert provider.name == "moonshot"
        assert provider.base_url == "https://api.moonshot.ai/v1"
        assert provider.currency == "USD"
        assert provider.catalog_format == Provider.CatalogFormat.OPENAI

    def test_it_warns_when_the_currency_has_no_rate(self):
        _, err = run(
            "add_provider",
            "euro",
            "--preset",
            "openai-compatible",
            "--base-url",
            "https://example.com/v1",
            "--currency",
            "EUR",
        )

        assert Provider.objects.get(slug="euro").currency == "EUR"
        assert "Billing > Currency rates" in err

    def test_it_rejects_an_unknown_preset(self):
        with pytest.raises(CommandError, match="invalid choice"):
            run("add_provider", "x", "--preset", "nonsense")

    def test_it_rejects_a_duplicate_slug(self, openrouter):
        with pytest.raises(CommandError, match="already exists"):
            run("add_provider", "openrouter", "--preset", "openrouter")

    def test_it_rejects_a_bad_url(self):
        with pytest.raises(CommandError, match="not a valid http"):
            run("add_provider", "x", "--preset", "openai-compatible", "--base-url", "nope")

    @pytest.mark.parametrize("currency", ["DOLLARS", "U1D", "$"])
    def test_it_rejects_a_bad_currency_code(self, currency):
        with pytest.raises(CommandError, match="currency code"):
            run("add_provider", "openrouter", "--preset", "openrouter", "--currency", currency)
        assert not Provider.objects.exists()


class TestAddUpstreamKey:
    def test_it_reads_the_secret_from_stdin_and_prints_it_masked(self, openrouter):
        out, err = run("add_upstream_key", "openrouter", "--label", "main", stdin=SECRET + "\n")

        key = UpstreamKey.objects.get()
        assert key.secret == SECRET
        assert key.label == "main"
        assert f"#{key.pk}" in out
        assert key.secret_masked in out
        assert SECRET not in out + err

    def test_a_key_of_a_provider_with_a_balance_endpoint_gets_its_balance_automatically(
        self, openrouter
    ):
        run("add_upstream_key", "openrouter", stdin=SECRET)

        key = UpstreamKey.objects.get()
        assert key.balance_source == UpstreamKey.BalanceSource.AUTO
        assert key.balance is None

    def test_a_given_balance_is_manual(self, openrouter):
        run(
            "add_upstream_key",
            "openrouter",
            "--balance",
            "10.00",
            "--multiplier",
            "0.8",
            stdin=SECRET,
        )

        key = UpstreamKey.objects.get()
        assert key.balance == Decimal("10")
        assert key.balance_source == UpstreamKey.BalanceSource.MANUAL
        assert key.balance_updated_at is not None
        assert key.multiplier == Decimal("0.8")

    def test_a_provider_without_a_balance_endpoint_has_a_manual_unknown_balance(self):
        run("add_provider", "deepinfra", "--preset", "deepinfra")

        run("add_upstream_key", "deepinfra", stdin="di-secret-value-1234")

        key = UpstreamKey.objects.get()
        assert key.balance_source == UpstreamKey.BalanceSource.MANUAL
        assert key.balance is None

    def test_it_reads_the_secret_from_an_environment_variable(self, openrouter, monkeypatch):
        monkeypatch.setenv("OPENROUTER_KEY", SECRET)

        run("add_upstream_key", "openrouter", "--secret-env", "OPENROUTER_KEY")

        assert UpstreamKey.objects.get().secret == SECRET

    def test_a_missing_environment_variable_is_an_error(self, openrouter, monkeypatch):
        monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)

        with pytest.raises(CommandError, match="NO_SUCH_KEY_VAR is not set"):
            run("add_upstream_key", "openrouter", "--secret-env", "NO_SUCH_KEY_VAR")

    @pytest.mark.parametrize("stdin", ["", "\n", "   \n"])
    def test_an_empty_secret_is_an_error(self, openrouter, stdin):
        with pytest.raises(CommandError, match="secret is empty"):
            run("add_upstream_key", "openrouter", stdin=stdin)
        assert not UpstreamKey.objects.exists()

    def test_a_duplicate_key_is_an_error_that_names_the_stored_key_not_the_secret(self, openrouter):
        run("add_upstream_key", "openrouter", "--label", "main", stdin=SECRET)

        with pytest.raises(CommandError) as error:
            run("add_upstream_key", "openrouter", "--label", "again", stdin=SECRET + "\n")

        message = str(error.value)
        assert "already stored" in message
        assert "main" in message
        assert SECRET not in message
        assert UpstreamKey.objects.count() == 1

    def test_the_same_secret_may_serve_two_providers(self, openrouter):
        run("add_provider", "openrouter-b", "--preset", "openrouter")

        run("add_upstream_key", "openrouter", stdin=SECRET)
        run("add_upstream_key", "openrouter-b", stdin=SECRET)

        assert UpstreamKey.objects.count() == 2

    def test_an_unknown_provider_is_an_error(self):
        with pytest.raises(CommandError, match="no provider 'nope'"):
            run("add_upstream_key", "nope", stdin=SECRET)

    @pytest.mark.parametrize(
        "option, value", [("--multiplier", "abc"), ("--multiplier", "-1"), ("--balance", "-1")]
    )
    def test_a_bad_number_is_an_error(self, openrouter, option, value):
        with pytest.raises(CommandError, match=option):
            run("add_upstream_key", "openrouter", option, value, stdin=SECRET)
        assert not UpstreamKey.objects.exists()


class TestSetPrice:
    def test_it_creates_a_manual_offer_with_its_price_history(self):
        run("add_provider", "deepseek-usd", "--preset", "deepseek", "--currency", "USD")

        out, _ = run(
            "set_price",
            "deepseek-usd",
            "deepseek-chat",
            "--input",
            "0.27",
            "--output",
            "1.10",
            "--cached-input",
            "0.07",
            "--create",  # no seeded prices and no catalog yet
        )

        offer = ModelOffer.objects.get(provider__slug="deepseek-usd")
        assert offer.canonical_id == "deepseek/deepseek-chat"
        assert offer.input_price_per_mtok == Decimal("0.27")
        assert offer.output_price_per_mtok == Decimal("1.10")
        assert offer.cached_input_price_per_mtok == Decimal("0.07")
        assert offer.price_source == ModelOffer.PriceSource.MANUAL
        assert offer.price_history.count() == 1
        assert "deepseek/deepseek-chat" in out

    def test_it_updates_a_price_and_records_only_real_changes(self):
        run("add_provider", "deepseek", "--preset", "deepseek")

        run("set_price", "deepseek", "deepseek-chat", "--input", "4", "--output", "6")
        run("set_price", "deepseek", "deepseek-chat", "--input", "4.0", "--output", "6")

        offer = ModelOffer.objects.get(upstream_model_id="deepseek-chat")
        assert offer.input_price_per_mtok == Decimal("4")
        assert offer.cached_input_price_per_mtok is None
        assert offer.price_history.count() == 2

    def test_it_reactivates_a_catalog_offer_and_makes_its_price_manual(self, openrouter):
        offer = make_offer(openrouter, "openai/gpt-4o", input="2.5", output="10", active=False)

        run("set_price", "openrouter", "openai/gpt-4o", "--input", "2", "--output", "8")

        offer.refresh_from_db()
        assert offer.active
        assert offer.price_source == ModelOffer.PriceSource.MANUAL
        assert offer.output_price_per_mtok == Decimal("8")

    def test_it_applies_the_providers_model_alias(self):
        run(
            "add_provider",
            "local",
            "--preset",
            "openai-compatible",
            "--base-url",
            "http://127.0.0.1:11434/v1",
        )
        provider = Provider.objects.get(slug="local")
        provider.aliases.create(upstream_model_id="qwen3:8b", canonical_id="qwen/qwen3-8b")

        run("set_price", "local", "qwen3:8b", "--input", "0", "--output", "0", "--create")

        assert provider.offers.get().canonical_id == "qwen/qwen3-8b"

    def test_an_unknown_provider_is_an_error(self):
        with pytest.raises(CommandError, match="no provider 'nope'"):
            run("set_price", "nope", "m", "--input", "1", "--output", "1")

    @pytest.mark.parametrize("value", ["abc", "-1", "NaN", "inf"])
    def test_a_bad_price_is_an_error(self, openrouter, value):
        with pytest.raises(CommandError, match="--input"):
            run("set_price", "openrouter", "m", "--input", value, "--output", "1")
        assert not ModelOffer.objects.exists()


class TestRotateUpstreamSecrets:
    def test_it_reports_how_many_secrets_it_re_encrypted(self, openrouter):
        run("add_upstream_key", "openrouter", stdin=SECRET)

        out, _ = run("rotate_upstream_secrets")

        assert "Re-encrypted 1 upstream secret(s)" in out
        assert UpstreamKey.objects.get().secret == SECRET

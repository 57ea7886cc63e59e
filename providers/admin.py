"""The operator's dashboard for providers, upstream keys, the model catalog and refresh runs.

Upstream secrets are write-only here: a form takes a new one, pages show only ``secret_masked``.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.db.models import Count, OuterRef, Q, Subquery
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.loader import render_to_string
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.text import Truncator
from django.views.decorators.http import require_POST

from billing.currency import UnknownCurrency, load_rates, usd_per_unit
from billing.selectors import recent_spend
from keyaos.admin_format import (
    exact_amount,
    plain_amount,
    relative_time,
    short_amount,
    spend_summary,
    usd_pair,
)
from keyaos.admin_mixins import (
    AddFormMixin,
    EnableActionsMixin,
    LatestRowsInline,
    ReadOnlyAdminMixin,
    ReadOnlyInline,
)
from providers import background, services
from providers.crypto import SecretDecryptionError
from providers.identity import settle_identity
from providers.models import (
    UNPRICED,
    BalanceReading,
    ModelAlias,
    ModelOffer,
    PriceHistory,
    Provider,
    RefreshResult,
    RefreshRun,
    UpstreamKey,
)
from providers.presets import PRESETS

PRICE_FIELDS = ("input_price_per_mtok", "output_price_per_mtok", "cached_input_price_per_mtok")


# Providers


class ModelAliasInline(admin.TabularInline):
    model = ModelAlias
    extra = 0
    fields = ("upstream_model_id", "canonical_id")
    verbose_name = "model id mapping (native id -> canonical vendor/model id)"
    verbose_name_plural = "model id mappings (native id -> canonical vendor/model id)"


class ProviderAddForm(forms.ModelForm):
    """Creates a provider from a preset; empty fields take the preset's values."""

    preset = forms.ChoiceField(
        choices=[(slug, preset.name) for slug, preset in PRESETS.items()],
        help_text="Fills the fields you leave empty, and seeds known prices (DeepSeek).",
    )

    class Meta:
        model = Provider
        fields = ("preset", "slug", "name", "base_url", "currency")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for name in ("name", "base_url", "currency"):
            self.fields[name].required = False
        base_url = self.fields["base_url"]
        base_url.help_text = "Empty: the preset's URL. Required for an OpenAI-compatible provider."

    def clean(self) -> dict:
        data = super().clean()
        if self.errors:
            return data
        try:
            services.provider_fields(
                slug=data["slug"],
                preset=data["preset"],
                base_url=data.get("base_url") or None,
                currency=data.get("currency") or None,
                name=data.get("name") or None,
            )
        except services.SetupError as exc:
            raise forms.ValidationError(str(exc)) from None
        return data

    def save(self, commit: bool = True) -> Provider:
        # The admin calls save(commit=False) and then save_model(); creating here, through the
        # service, is what seeds the preset's prices in the same transaction.
        data = self.cleaned_data
        self.instance = services.create_provider(
            slug=data["slug"],
            preset=data["preset"],
            base_url=data.get("base_url") or None,
            currency=data.get("currency") or None,
            name=data.get("name") or None,
        )
        self.save_m2m = lambda: None
        return self.instance


@admin.register(Provider)
class ProviderAdmin(AddFormMixin, admin.ModelAdmin):
    add_form = ProviderAddForm
    add_form_template = "admin/providers/provider/add_form.html"
    list_display = (
        "name",
        "slug",
        "currency",
        "enabled",
        "active_offers",
        "unpriced_offers",
        "key_count",
        "last_refresh",
    )
    list_filter = ("enabled", "preset", "currency")
    search_fields = ("slug", "name", "base_url")
    readonly_fields = ("preset", "created_at", "last_refresh")
    actions = ["refresh_selected"]
    fieldsets = (
        (None, {"fields": ("name", "slug", "preset", "enabled", "created_at", "last_refresh")}),
        (
            "Upstream",
            {
                "fields": (
                    "base_url",
                    "currency",
                    "auth_style",
                    "read_timeout_s",
                    "native_protocols",
                )
            },
        ),
        (
            "Catalog, balance and key check",
            {
                "fields": (
                    "catalog_format",
                    "default_vendor",
                    "balance_method",
                    "key_check",
                    "key_check_model",
                )
            },
        ),
    )
    inlines = [ModelAliasInline]

    def get_queryset(self, request: HttpRequest):
        latest = RefreshResult.objects.filter(provider=OuterRef("pk")).order_by("-run__started_at")
        unpriced = Q(offers__active=True) & (
            Q(offers__input_price_per_mtok__isnull=True)
            | Q(offers__output_price_per_mtok__isnull=True)
        )
        return (
            super()
            .get_queryset(request)
            .annotate(
                active_offer_count=Count("offers", filter=Q(offers__active=True), distinct=True),
                unpriced_offer_count=Count("offers", filter=unpriced, distinct=True),
                key_total=Count("keys", distinct=True),
                last_refresh_id=Subquery(latest.values("pk")[:1]),
            )
        )

    def get_changelist(self, request: HttpRequest, **kwargs):
        return ProviderChangeList

    @admin.display(description="active offers", ordering="active_offer_count")
    def active_offers(self, provider: Provider) -> int:
        return provider.active_offer_count

    @admin.display(description="without price", ordering="unpriced_offer_count")
    def unpriced_offers(self, provider: Provider) -> str:
        count = provider.unpriced_offer_count
        if not count:
            return "0"
        url = reverse("admin:providers_modeloffer_changelist")
        return format_html(
            '<a class="kd-bad" href="{}?provider__id__exact={}&amp;priced=no">{} (not served)</a>',
            url,
            provider.pk,
            count,
        )

    @admin.display(description="last refresh")
    def last_refresh(self, provider: Provider) -> str:
        if hasattr(provider, "page_refresh"):
            result = provider.page_refresh
        else:
            result = (
                RefreshResult.objects.filter(provider=provider)
                .select_related("run")
                .order_by("-run__started_at")
                .first()
            )
        if result is None:
            return "never"
        url = reverse("admin:providers_refreshrun_change", args=[result.run_id])
        when = relative_time(result.run.started_at)
        if result.error:
            return format_html(
                '<a href="{}">{}</a>: <span class="kd-bad" title="{}">failed: {}</span>',
                url,
                when,
                result.error,
                Truncator(result.error).chars(80),
            )
        return format_html(
            '<a href="{}">{}</a>: <span class="kd-good">ok</span>, {} offer(s) seen',
            url,
            when,
            result.offers_seen,
        )

    @admin.action(description="Refresh the selected providers now")
    def refresh_selected(self, request: HttpRequest, queryset) -> None:
        from providers.refresh import refresh_providers

        for provider in queryset.order_by("slug"):
            run = refresh_providers(trigger=RefreshRun.Trigger.ADMIN, provider_slug=provider.slug)
            report_run(self, request, run)

    @admin.display(description="keys", ordering="key_total")
    def key_count(self, provider: Provider) -> int:
        return provider.key_total

    def get_changeform_initial_data(self, request: HttpRequest) -> dict:
        initial = super().get_changeform_initial_data(request)
        preset = PRESETS.get(request.GET.get("preset", ""))
        if preset is not None:
            initial.update(preset=preset.slug, currency=preset.currency, base_url=preset.base_url)
            if preset.slug != services.CUSTOM_PRESET:
                initial.update(slug=preset.slug, name=preset.name)
        return initial

    def add_view(self, request: HttpRequest, form_url: str = "", extra_context=None):
        extra_context = {**(extra_context or {}), "presets": PRESETS.values()}
        return super().add_view(request, form_url, extra_context)

    def save_model(self, request: HttpRequest, obj: Provider, form, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        background.refresh_soon(obj)
        self.message_user(
            request,
            f"The first refresh of {obj.slug} (catalog, prices, balances) runs now in the "
            "background: its result shows under 'last refresh' in a few seconds. Add an "
            "upstream key next if the provider's catalog needs one.",
        )
        seeded = obj.offers.count()
        if seeded:
            self.message_user(
                request, f"Seeded {seeded} manual price(s) in {obj.currency} from the preset."
            )
        elif PRESETS[obj.preset].seed_prices:
            self.message_user(
                request,
                f"The preset's prices are not in {obj.currency}: set them under Model offers.",
                messages.WARNING,
            )
        try:
            usd_per_unit(obj.currency)
        except UnknownCurrency as exc:
            self.message_user(request, str(exc), messages.WARNING)


def report_run(model_admin: admin.ModelAdmin, request: HttpRequest, run: RefreshRun) -> None:
    """A refresh run's summary, then each provider's error, as admin messages."""
    results = list(run.results.all())
    level = messages.WARNING if any(r.unpriced_models for r in results) else messages.SUCCESS
    model_admin.message_user(request, run.summary(), level)
    for result in results:
        if result.error:
            model_admin.message_user(
                request, f"{result.provider_slug}: {result.error}", messages.ERROR
            )


class ProviderChangeList(ChangeList):
    """Loads the last refresh result of every provider on the page in one query."""

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        ids = [p.last_refresh_id for p in self.result_list if p.last_refresh_id]
        results = RefreshResult.objects.select_related("run").in_bulk(ids)
        for provider in self.result_list:
            provider.page_refresh = results.get(provider.last_refresh_id)


# Upstream keys


class UpstreamKeyAddForm(forms.ModelForm):
    secret = forms.CharField(
        widget=forms.PasswordInput(render_value=False),
        strip=True,
        help_text="Stored encrypted; shown only masked from now on.",
    )

    class Meta:
        model = UpstreamKey
        fields = ("provider", "label", "secret", "multiplier", "balance")

    def clean(self) -> dict:
        data = super().clean()
        if data.get("provider") and data.get("secret"):
            try:
                services.ensure_secret_is_new(provider=data["provider"], secret=data["secret"])
            except services.SetupError as exc:
                self.add_error("secret", str(exc))
        return data

    def save(self, commit: bool = True) -> UpstreamKey:
        # Saved through the service, which also decides where the balance comes from.
        data = self.cleaned_data
        self.instance = services.add_upstream_key(
            provider=data["provider"],
            secret=data["secret"],
            label=data.get("label") or "",
            multiplier=data["multiplier"],
            balance=data.get("balance"),
        )
        self.save_m2m = lambda: None
        return self.instance


class UpstreamKeyChangeForm(forms.ModelForm):
    secret = forms.CharField(
        widget=forms.PasswordInput(render_value=False),
        required=False,
        strip=True,
        label="New secret",
        help_text="Leave empty to keep the current secret.",
    )

    class Meta:
        model = UpstreamKey
        fields = (
            "provider",
            "label",
            "secret",
            "enabled",
            "multiplier",
            "balance",
            "balance_source",
            "health",
            "cooldown_until",
        )

    def clean(self) -> dict:
        data = super().clean()
        if data.get("secret") and data.get("provider"):
            try:
                services.ensure_secret_is_new(
                    provider=data["provider"], secret=data["secret"], exclude=self.instance
                )
            except services.SetupError as exc:
                self.add_error("secret", str(exc))
        return data


def health_badge(key: UpstreamKey) -> str:
    return render_to_string("admin/keyaos/health_badge.html", {"key": key})


class BalanceReadingInline(LatestRowsInline):
    """The provider's figure next to the local count at each refresh: the drift."""

    model = BalanceReading
    parent_field = "key"
    fields = ("read_at", "provider_balance", "local_balance", "drift")
    ordering = ("-read_at", "-id")
    verbose_name_plural = "recent balance readings"


@admin.register(UpstreamKey)
class UpstreamKeyAdmin(AddFormMixin, EnableActionsMixin, admin.ModelAdmin):
    class Media:
        css = {"all": ["keyaos/dashboard.css"]}  # the health badges

    add_form = UpstreamKeyAddForm
    form = UpstreamKeyChangeForm
    change_form_template = "admin/providers/upstreamkey/change_form.html"
    inlines = [BalanceReadingInline]
    list_display = (
        "__str__",
        "secret_masked",
        "enabled",
        "health_status",
        "balance_with_currency",
        "last_drift",
        "multiplier",
        "short_last_error",
    )
    list_display_links = ("__str__",)
    list_filter = ("provider", "health", "enabled", "balance_source")
    list_select_related = ("provider",)
    search_fields = ("label", "secret_masked")
    readonly_fields = (
        "secret_masked",
        "balance_updated_at",
        "last_error",
        "last_error_at",
        "created_at",
        "spend_last_30_days",
    )
    actions = ["validate_keys", "refresh_balances", *EnableActionsMixin.actions]
    enabled_noun = "key(s)"

    def get_queryset(self, request: HttpRequest):
        from django.db.models import OuterRef, Subquery

        latest = BalanceReading.objects.filter(key=OuterRef("pk")).order_by("-read_at", "-id")
        return (
            super()
            .get_queryset(request)
            .annotate(latest_drift=Subquery(latest.values("drift")[:1]))
        )

    def get_inlines(self, request: HttpRequest, obj):
        # The readings are read-only: a save has nothing to post for them.
        return self.inlines if obj is not None and request.method == "GET" else []

    @admin.display(description="balance", ordering="balance")
    def balance_with_currency(self, key: UpstreamKey) -> str:
        if key.balance is None:
            return "unknown"
        return format_html(
            '<span title="{}">{}</span>',
            exact_amount(key.balance, key.provider.currency),
            short_amount(key.balance, key.provider.currency),
        )

    @admin.display(description="last drift")
    def last_drift(self, key: UpstreamKey) -> str:
        drift = getattr(key, "latest_drift", None)
        if drift is None:
            return "-"
        sign = "+" if drift > 0 else ""
        return f"{sign}{plain_amount(drift)} {key.provider.currency}"

    @admin.display(description="spend, last 30 days")
    def spend_last_30_days(self, key: UpstreamKey) -> str:
        return spend_summary(recent_spend(upstream_key=key), "upstream_key", key.pk)

    @admin.display(description="health", ordering="health")
    def health_status(self, key: UpstreamKey) -> str:
        badge = health_badge(key)
        if key.cooldown_until is None or key.cooldown_until <= timezone.now():
            return badge
        return format_html("{} until {}", badge, relative_time(key.cooldown_until))

    @admin.display(description="last error", ordering="last_error_at")
    def short_last_error(self, key: UpstreamKey) -> str:
        if not key.last_error:
            return "-"
        text = format_html(
            '<span title="{}">{}</span>', key.last_error, Truncator(key.last_error).chars(70)
        )
        if key.last_error_at is None:
            return text
        return format_html("{} ({})", text, relative_time(key.last_error_at))

    def get_urls(self):
        check = path(
            "<path:object_id>/check/",
            self.admin_site.admin_view(require_POST(self.check_view)),
            name="providers_upstreamkey_check",
        )
        return [check, *super().get_urls()]

    def check_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """ "Check this key now": the provider's key check (a passing key serves again, whatever
        marked it invalid or exhausted), then its balance."""
        key = self.get_object(request, object_id)
        if key is None or not self.has_change_permission(request, key):
            raise PermissionDenied
        keys = UpstreamKey.objects.filter(pk=key.pk)
        self.validate_keys(request, keys)
        self.refresh_balances(request, keys)
        return HttpResponseRedirect(reverse("admin:providers_upstreamkey_change", args=[key.pk]))

    def get_fields(self, request: HttpRequest, obj=None):
        return (
            ("provider", "label"),
            ("secret_masked", "secret"),
            ("enabled", "multiplier"),
            ("balance", "balance_source", "balance_updated_at"),
            ("health", "cooldown_until"),
            "last_error",
            "last_error_at",
            "created_at",
            "spend_last_30_days",
        )

    def save_model(self, request: HttpRequest, obj: UpstreamKey, form, change: bool) -> None:
        if not change:  # UpstreamKeyAddForm.save() created it
            background.refresh_soon(obj.provider, check=obj)
            self.message_user(
                request,
                f"Checking the key with {obj.provider.name} and refreshing {obj.provider.slug}'s "
                "catalog, prices and balances in the background: the key's health and balance "
                "show here in a few seconds.",
            )
            return
        if form.cleaned_data.get("secret"):
            services.replace_upstream_secret(key=obj, secret=form.cleaned_data["secret"])
        super().save_model(request, obj, form, change)

    @admin.action(description="Validate the selected keys with their provider")
    def validate_keys(self, request: HttpRequest, queryset) -> None:
        from providers.refresh import validate_key

        failures = []
        keys = list(queryset.select_related("provider"))
        for key in keys:
            try:
                result = validate_key(key)
            except SecretDecryptionError as exc:
                failures.append(f"{key}: {exc}")
                continue
            if not result.ok:
                failures.append(f"{key}: {result.message}")
        level = messages.WARNING if failures else messages.SUCCESS
        summary = f"Validated {len(keys)} key(s): {len(keys) - len(failures)} OK"
        if failures:
            summary += f", {len(failures)} invalid ({'; '.join(failures)})"
        self.message_user(request, summary + ".", level)

    @admin.action(description="Refresh the balance of the selected keys")
    def refresh_balances(self, request: HttpRequest, queryset) -> None:
        from providers.adapters import UpstreamError
        from providers.refresh import refresh_key_balance

        refreshed, manual, failed = [], [], []
        for key in queryset.select_related("provider"):
            try:
                balance = refresh_key_balance(key)
            except (UpstreamError, SecretDecryptionError) as exc:
                failed.append(f"{key}: {exc}")
                continue
            if balance is None:
                manual.append(str(key))
            else:
                refreshed.append(f"{key}: {exact_amount(balance, key.provider.currency)}")
        summary = f"Refreshed the balance of {len(refreshed)} key(s)"
        if refreshed:
            summary += f" ({'; '.join(refreshed)})"
        if manual:
            summary += (
                f"; {len(manual)} key(s) keep a balance entered by hand ({', '.join(manual)})"
            )
        if failed:
            summary += f"; {len(failed)} failed ({'; '.join(failed)})"
        self.message_user(request, summary + ".", messages.WARNING if failed else messages.SUCCESS)


# Model catalog


class PriceHistoryInline(LatestRowsInline):
    model = PriceHistory
    parent_field = "offer"
    fields = ("recorded_at", *PRICE_FIELDS)
    ordering = ("-recorded_at",)
    verbose_name_plural = f"price history (latest {LatestRowsInline.limit})"


class OfferChangeList(ChangeList):
    """Loads the currency rates once per page for the USD price column."""

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        rates = load_rates()
        for offer in self.result_list:
            offer.page_rates = rates


class PricedFilter(admin.SimpleListFilter):
    title = "price"
    parameter_name = "priced"

    def lookups(self, request: HttpRequest, model_admin):
        return [("yes", "priced"), ("no", "no price (not served)")]

    def queryset(self, request: HttpRequest, queryset):
        if self.value() == "no":
            return queryset.filter(UNPRICED)
        if self.value() == "yes":
            return queryset.exclude(UNPRICED)
        return queryset


class ModelOfferForm(forms.ModelForm):
    create_anyway = forms.BooleanField(
        required=False,
        label="Create anyway",
        help_text="Add this native id although the provider's catalog does not list it.",
    )

    class Meta:
        model = ModelOffer
        fields = (
            "provider",
            "upstream_model_id",
            "canonical_id",
            "display_name",
            "kind",
            "active",
            "context_length",
            *PRICE_FIELDS,
            "price_tiers",
        )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if "canonical_id" in self.fields:
            self.fields["canonical_id"].required = False
            self.fields["canonical_id"].help_text = (
                "Empty: derived from the native id by the identity rules. A different id typed "
                "here becomes the provider's mapping for this native id."
            )

    def clean(self) -> dict:
        data = super().clean()
        for name in PRICE_FIELDS:
            price = data.get(name)
            if price is not None and price < 0:
                self.add_error(name, "A price cannot be negative.")
        provider, model = data.get("provider"), data.get("upstream_model_id")
        if provider and model and "upstream_model_id" in self.changed_data:
            try:
                data["upstream_model_id"] = services.native_model_id(
                    provider,
                    model,
                    create=data.get("create_anyway", False),
                    create_hint="tick 'Create anyway'",
                )
            except services.SetupError as error:
                self.add_error("upstream_model_id", str(error))
        return data


@admin.register(ModelOffer)
class ModelOfferAdmin(admin.ModelAdmin):
    form = ModelOfferForm
    change_list_template = "admin/providers/modeloffer/change_list.html"
    list_display = (
        "upstream_model_id",
        "model_link",
        "provider",
        "identity",
        "input_price",
        "output_price",
        "cached_input_price",
        "usd_price",
        "price_source",
        "active",
    )
    list_filter = ("provider", "active", PricedFilter, "kind", "price_source", "identity_rule")
    list_select_related = ("provider",)
    search_fields = ("canonical_id", "upstream_model_id", "display_name")
    readonly_fields = (
        "price_source",
        "first_seen_at",
        "last_refreshed_at",
        "identity_rule",
        "identity_note",
    )
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "provider",
                    "upstream_model_id",
                    "canonical_id",
                    "identity_rule",
                    "identity_note",
                    "display_name",
                    "kind",
                    "active",
                    "context_length",
                )
            },
        ),
        (
            "Price per 1M tokens, in the provider's currency",
            {"fields": (*PRICE_FIELDS, "price_tiers", "price_source")},
        ),
        (None, {"fields": ("first_seen_at", "last_refreshed_at")}),
    )
    inlines = [PriceHistoryInline]

    def get_changelist(self, request: HttpRequest, **kwargs):
        return OfferChangeList

    def get_fieldsets(self, request: HttpRequest, obj=None):
        if obj is not None:
            return self.fieldsets
        (name, options), *rest = self.fieldsets
        return ((name, {**options, "fields": (*options["fields"], "create_anyway")}), *rest)

    def get_inlines(self, request: HttpRequest, obj):
        return self.inlines if obj is not None else []

    def changelist_view(self, request: HttpRequest, extra_context=None):
        extra_context = {
            **(extra_context or {}),
            "can_refresh": self.has_change_permission(request),
        }
        return super().changelist_view(request, extra_context)

    @admin.display(description="input / 1M", ordering="input_price_per_mtok")
    def input_price(self, offer: ModelOffer) -> str:
        return self._price(offer.input_price_per_mtok, offer)

    @admin.display(description="output / 1M", ordering="output_price_per_mtok")
    def output_price(self, offer: ModelOffer) -> str:
        return self._price(offer.output_price_per_mtok, offer)

    @admin.display(description="cached input / 1M", ordering="cached_input_price_per_mtok")
    def cached_input_price(self, offer: ModelOffer) -> str:
        return self._price(offer.cached_input_price_per_mtok, offer)

    @staticmethod
    def _price(price, offer: ModelOffer) -> str:
        return exact_amount(price, offer.currency)

    @admin.display(description="identity", ordering="identity_rule")
    def identity(self, offer: ModelOffer) -> str:
        label = offer.get_identity_rule_display()
        if offer.identity_note:
            return format_html("<strong>{}</strong>: {}", label, offer.identity_note)
        return label

    @admin.display(description="USD in / out per 1M")
    def usd_price(self, offer: ModelOffer) -> str:
        rates = getattr(offer, "page_rates", None) or load_rates()
        return usd_pair(offer, rates)

    @admin.display(description="canonical model (all providers)", ordering="canonical_id")
    def model_link(self, offer: ModelOffer) -> str:
        url = reverse("admin:model", args=[offer.canonical_id])
        return format_html('<a href="{}">{}</a>', url, offer.canonical_id)

    def get_urls(self):
        return [
            path(
                "refresh/",
                self.admin_site.admin_view(require_POST(self.refresh_view)),
                name="providers_modeloffer_refresh",
            ),
            *super().get_urls(),
        ]

    def refresh_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_change_permission(request):
            raise PermissionDenied
        from providers.refresh import refresh_providers

        run = refresh_providers(trigger=RefreshRun.Trigger.ADMIN)
        report_run(self, request, run)
        return HttpResponseRedirect(reverse("admin:providers_modeloffer_changelist"))

    def save_model(self, request: HttpRequest, obj: ModelOffer, form, change: bool) -> None:
        chosen = obj.canonical_id if "canonical_id" in form.changed_data else ""
        obj.canonical_id = obj.canonical_id or obj.upstream_model_id.lower()
        price_changed = not change or any(name in form.changed_data for name in PRICE_FIELDS)
        if price_changed:
            obj.price_source = ModelOffer.PriceSource.MANUAL
        super().save_model(request, obj, form, change)
        settle_identity(obj, chosen_canonical_id=chosen)
        if price_changed:
            obj.record_price()


# Refresh runs


class RefreshResultInline(ReadOnlyInline):
    model = RefreshResult
    fields = (
        "provider_slug",
        "offers_seen",
        "added",
        "updated",
        "deactivated",
        "balances_updated",
        "duration_ms",
        "error",
    )


@admin.register(RefreshRun)
class RefreshRunAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    allow_delete = True
    list_display = ("started", "trigger", "duration_ms", "error_count", "is_ok")
    list_filter = ("trigger",)
    date_hierarchy = "started_at"
    fields = ("started_at", "trigger", "duration_ms", "error_count")
    readonly_fields = fields
    inlines = [RefreshResultInline]

    @admin.display(description="started", ordering="started_at")
    def started(self, run: RefreshRun) -> str:
        return relative_time(run.started_at)

    @admin.display(description="ok", boolean=True)
    def is_ok(self, run: RefreshRun) -> bool:
        return run.ok

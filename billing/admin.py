"""Admin for currency rates and client API keys (shown once, stored as a keyed hash)."""

from __future__ import annotations

import secrets

from django import forms
from django.contrib import admin, messages
from django.http import HttpRequest

from billing.models import API_KEY_PREFIX, ApiKey, CurrencyRate


class CurrencyRateForm(forms.ModelForm):
    class Meta:
        model = CurrencyRate
        fields = ("currency", "usd_per_unit")

    def clean_currency(self) -> str:
        currency = self.cleaned_data["currency"].strip().upper()
        if currency == "USD":
            raise forms.ValidationError("USD needs no rate: amounts are converted to USD.")
        return currency

    def clean_usd_per_unit(self):
        rate = self.cleaned_data["usd_per_unit"]
        if rate <= 0:
            raise forms.ValidationError("A rate must be greater than zero.")
        return rate


@admin.register(CurrencyRate)
class CurrencyRateAdmin(admin.ModelAdmin):
    form = CurrencyRateForm
    list_display = ("currency", "usd_per_unit", "updated_at")
    readonly_fields = ("updated_at",)
    fields = ("currency", "usd_per_unit", "updated_at")


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("name", "prefix", "enabled", "created_at", "last_used_at")
    list_filter = ("enabled",)
    search_fields = ("name", "prefix")
    readonly_fields = ("prefix", "created_at", "last_used_at")
    actions = ["enable_keys", "disable_keys"]

    def get_exclude(self, request: HttpRequest, obj=None):
        return ("created_at", "last_used_at") if obj is None else ()

    def get_readonly_fields(self, request: HttpRequest, obj=None):
        return () if obj is None else self.readonly_fields

    def save_model(self, request: HttpRequest, obj: ApiKey, form, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        plain = API_KEY_PREFIX + secrets.token_urlsafe(32)
        obj.set_key(plain)
        super().save_model(request, obj, form, change)
        self.message_user(
            request,
            f"The key for {obj.name} is {plain} . Copy it now, it will not be shown again.",
            messages.WARNING,
        )

    @admin.action(description="Enable the selected client keys")
    def enable_keys(self, request: HttpRequest, queryset) -> None:
        self._set_enabled(request, queryset, True)

    @admin.action(description="Disable the selected client keys")
    def disable_keys(self, request: HttpRequest, queryset) -> None:
        self._set_enabled(request, queryset, False)

    def _set_enabled(self, request: HttpRequest, queryset, enabled: bool) -> None:
        from providers.signals import bump_snapshot_version

        count = queryset.update(enabled=enabled)
        bump_snapshot_version()
        self.message_user(request, f"{'Enabled' if enabled else 'Disabled'} {count} client key(s).")

"""What several admin pages share: read-only rows, the latest rows of a child table, an add form
that differs from the change form, and enable/disable actions."""

from __future__ import annotations

from django import forms
from django.contrib import admin
from django.http import HttpRequest

from keyaos.lib.signals import routing_data_changed


class ReadOnlyAdminMixin:
    """Rows the gateway writes: viewed here, never added or edited (deleted only if allowed)."""

    allow_delete = False

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return self.allow_delete and super().has_delete_permission(request, obj)


class ReadOnlyInline(ReadOnlyAdminMixin, admin.TabularInline):
    """A child table shown as it is: every field read-only, no empty form, no delete box."""

    extra = 0
    max_num = 0
    can_delete = False

    def get_readonly_fields(self, request: HttpRequest, obj=None):
        return self.fields


class LatestRowsInline(ReadOnlyInline):
    """The ``limit`` newest child rows of the object on the page (``ordering`` says newest)."""

    limit = 20
    parent_field: str

    def get_queryset(self, request: HttpRequest):
        queryset = super().get_queryset(request)
        match = request.resolver_match
        parent_id = match.kwargs.get("object_id") if match else None
        if parent_id is None:
            return queryset.none()
        latest = queryset.filter(**{f"{self.parent_field}_id": parent_id}).order_by(*self.ordering)[
            : self.limit
        ]
        return queryset.filter(pk__in=list(latest.values_list("pk", flat=True)))


class AddFormMixin:
    """A different form for adding (``add_form``, its fields only, no inlines, nothing read-only)
    than for changing."""

    add_form: type[forms.ModelForm]

    def get_form(self, request: HttpRequest, obj=None, change=False, **kwargs):
        if obj is None:
            kwargs["form"] = self.add_form
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fieldsets(self, request: HttpRequest, obj=None):
        if obj is None:
            return ((None, {"fields": self.add_form.Meta.fields}),)
        return super().get_fieldsets(request, obj)

    def get_readonly_fields(self, request: HttpRequest, obj=None):
        return () if obj is None else super().get_readonly_fields(request, obj)

    def get_inlines(self, request: HttpRequest, obj):
        return super().get_inlines(request, obj) if obj is not None else []


class EnableActionsMixin:
    """ "Enable" and "Disable" actions for models with an ``enabled`` flag that routing reads."""

    actions = ["enable_selected", "disable_selected"]
    enabled_noun = "row(s)"

    @admin.action(description="Enable the selected %(verbose_name_plural)s")
    def enable_selected(self, request: HttpRequest, queryset) -> None:
        self._set_enabled(request, queryset, True)

    @admin.action(description="Disable the selected %(verbose_name_plural)s")
    def disable_selected(self, request: HttpRequest, queryset) -> None:
        self._set_enabled(request, queryset, False)

    def _set_enabled(self, request: HttpRequest, queryset, enabled: bool) -> None:
        count = queryset.update(enabled=enabled)
        routing_data_changed()
        verb = "Enabled" if enabled else "Disabled"
        self.message_user(request, f"{verb} {count} {self.enabled_noun}.")

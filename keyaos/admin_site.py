"""The Keyaos admin site: the dashboard as its index and one page per canonical model.

Installed by ``keyaos.apps.KeyaosAdminConfig`` (``INSTALLED_APPS``) as ``admin.site``, so every
``@admin.register`` lands here.
"""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.urls import path, reverse

TASKS_APP = "django_q"


class KeyaosAdminSite(admin.AdminSite):
    site_header = "Keyaos"
    site_title = "Keyaos admin"
    index_title = "Gateway administration"
    site_url = "/admin/"
    # The navigation sidebar takes a fifth of a laptop screen on every list: lists get it back.
    enable_nav_sidebar = False

    def get_app_list(self, request: HttpRequest, app_label: str | None = None) -> list[dict]:
        """The task queue's pages (django-q2) stay out of the operator's lists: one "Tasks"
        link (``tasks_url``) leads to them."""
        apps = super().get_app_list(request, app_label)
        if app_label is None:
            apps = [app for app in apps if app["app_label"] != TASKS_APP]
        return apps

    def each_context(self, request: HttpRequest) -> dict:
        context = super().each_context(request)
        if request.user.is_active and request.user.is_superuser:
            context["tasks_url"] = reverse("admin:app_list", kwargs={"app_label": TASKS_APP})
        return context

    def index(self, request: HttpRequest, extra_context: dict | None = None) -> HttpResponse:
        # The dashboard's modules load with the first page that needs them, not with every
        # manage.py command (admin modules are imported at start-up).
        context = dict(extra_context or {})
        if request.user.has_perm("billing.view_ledgerentry"):
            from keyaos.dashboard.pages import index_context

            context = {**index_context(request), **context}
        return super().index(request, context)

    def get_urls(self):
        return [
            path("models/<path:canonical_id>/", self.admin_view(self.model_view), name="model"),
            *super().get_urls(),
        ]

    def model_view(self, request: HttpRequest, canonical_id: str) -> HttpResponse:
        from keyaos.dashboard.model_page import model_page

        return model_page(request, self, canonical_id)

"""The admin site around the pages: where ``/`` leads, the favicon, the Tasks link, the lists'
width."""

from __future__ import annotations

import pytest
from django.contrib.staticfiles import finders
from django.urls import reverse

pytestmark = pytest.mark.django_db


def test_the_root_redirects_to_the_admin(client):
    response = client.get("/")
    assert response.status_code == 302 and response["Location"] == "/admin/"


def test_view_site_leads_to_the_admin_not_a_404(admin_client):
    page = admin_client.get(reverse("admin:index")).content.decode()
    assert 'href="/admin/">View site' in page


def test_the_favicon_is_served_and_linked(client, admin_client):
    response = client.get("/favicon.ico")
    assert response.status_code == 302 and response["Location"].endswith("keyaos/favicon.svg")
    assert finders.find("keyaos/favicon.svg")
    page = admin_client.get(reverse("admin:index")).content.decode()
    assert 'rel="icon"' in page and "keyaos/favicon.svg" in page


def test_the_task_queue_is_one_tasks_link_not_a_block_of_lists(admin_client):
    page = admin_client.get(reverse("admin:index")).content.decode()
    assert "Scheduled tasks" not in page
    assert 'href="/admin/django_q/">Tasks</a>' in page
    assert admin_client.get("/admin/django_q/").status_code == 200


def test_lists_have_no_navigation_sidebar(admin_client):
    page = admin_client.get(reverse("admin:billing_ledgerentry_changelist")).content.decode()
    assert 'id="nav-sidebar"' not in page


def test_the_model_page_breadcrumbs_use_the_admins_styled_list(admin_client):
    page = admin_client.get(reverse("admin:model", args=["vendor/model"])).content.decode()
    assert '<ol class="breadcrumbs">' in page and '<div class="breadcrumbs">' not in page

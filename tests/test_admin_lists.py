"""What an operator scans for in the lists: relative times with the exact time on hover."""

from __future__ import annotations

from datetime import timedelta

from django.urls import reverse
from django.utils import timezone

from tests.factories import make_client_key, make_key, make_provider


def test_key_lists_show_cooldowns_errors_and_last_use_as_relative_times(admin_client):
    provider = make_provider("openrouter", "http://127.0.0.1:9/or")
    now = timezone.now()
    make_key(
        provider,
        "sk-or-v1-" + "t" * 40,
        label="hot",
        cooldown_until=now + timedelta(minutes=3),
        last_error="429 slow down",
        last_error_at=now - timedelta(minutes=5),
    )
    api_key, _ = make_client_key("laptop")
    api_key.last_used_at = now - timedelta(hours=2)
    api_key.save()

    keys_page = admin_client.get(reverse("admin:providers_upstreamkey_changelist")).content.decode()
    clients_page = admin_client.get(reverse("admin:billing_apikey_changelist")).content.decode()

    assert "from now" in keys_page and "5\xa0minutes ago" in keys_page
    assert "2\xa0hours ago" in clients_page
    assert 'title="' in keys_page

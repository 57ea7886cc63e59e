"""One set of rules for a client key's limits: the admin form and ``create_api_key`` accept and
refuse the same things (``billing.services.validate_limits``)."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone

from billing.models import ApiKey

pytestmark = pytest.mark.django_db

ADD_FORM = {
    "name": "ci",
    "enabled": "on",
    "budget_usd": "",
    "budget_period": "lifetime",
    "allowed_models": "",
    "allowed_ips": "",
    "rpm_limit": "",
    "tpm_limit": "",
    "expires_at_0": "",
    "expires_at_1": "",
}
PAST = (timezone.now() - timedelta(days=3)).date().isoformat()

# (form fields, command options): the same mistake in each surface
MISTAKES = [
    ({"budget_period": "day"}, ["--period", "day"]),
    ({"budget_usd": "-1"}, ["--budget", "-1"]),
    ({"rpm_limit": "0"}, ["--rpm", "0"]),
    ({"tpm_limit": "3000000000"}, ["--tpm", "3000000000"]),
    ({"allowed_ips": "10.0.0.300/8"}, ["--ips", "10.0.0.300/8"]),
    ({"expires_at_0": PAST, "expires_at_1": "12:00:00"}, ["--expires", PAST]),
]


@pytest.mark.parametrize(("form", "options"), MISTAKES)
def test_the_admin_and_the_command_refuse_the_same_limits(admin_client, form, options):
    response = admin_client.post(reverse("admin:billing_apikey_add"), {**ADD_FORM, **form})
    assert response.status_code == 200  # the form again, with the error
    assert response.context["adminform"].form.errors

    with pytest.raises(CommandError):
        call_command("create_api_key", "ci", *options, stdout=StringIO())

    assert not ApiKey.objects.exists()


def test_both_normalise_limits_the_same_way(admin_client):
    form = {"allowed_models": "openai/*, *-mini", "allowed_ips": "10.0.0.0/8,203.0.113.7"}
    admin_client.post(reverse("admin:billing_apikey_add"), {**ADD_FORM, **form, "name": "a"})
    call_command(
        "create_api_key",
        "b",
        "--models",
        "openai/*, *-mini",
        "--ips",
        "10.0.0.0/8,203.0.113.7",
        stdout=StringIO(),
    )

    made = {k.name: (k.allowed_models, k.allowed_ips) for k in ApiKey.objects.all()}
    assert made["a"] == made["b"] == ("openai/*\n*-mini", "10.0.0.0/8\n203.0.113.7/32")


def test_an_operator_may_expire_an_existing_key_now(admin_client):
    api_key, _ = ApiKey.create_key(name="old")
    change = reverse("admin:billing_apikey_change", args=[api_key.pk])
    form = {**ADD_FORM, "name": "old", "expires_at_0": PAST, "expires_at_1": "12:00:00"}

    response = admin_client.post(change, form)

    assert response.status_code == 302, response.context["adminform"].form.errors
    api_key.refresh_from_db()
    assert api_key.is_expired()

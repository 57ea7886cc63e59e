"""``manage.py refresh_models``, the scheduled task and the 5-minute schedule share one refresh."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django_q.models import Schedule

from providers.models import Provider, RefreshRun
from providers.presets import PRESETS
from providers.tasks import scheduled_refresh
from tests.payloads import deepinfra_model, serve_deepinfra

pytestmark = pytest.mark.django_db

SCHEDULE_NAME = "keyaos-refresh-models"


def make_provider(fake_upstream, preset: str, slug: str | None = None) -> Provider:
    slug = slug or preset
    fields = PRESETS[preset].provider_fields() | {"base_url": fake_upstream.url(slug)}
    return Provider.objects.create(slug=slug, **fields)


def serve_models(fake_upstream, slug: str, *ids: str) -> None:
    serve_deepinfra(fake_upstream, *(deepinfra_model(i, 1, 2) for i in ids), prefix=slug)


def refresh_models(*args: str) -> str:
    out = StringIO()
    call_command("refresh_models", *args, stdout=out)
    return out.getvalue()


class TestRefreshModelsCommand:
    def test_it_prints_one_line_per_provider_and_succeeds(self, fake_upstream):
        make_provider(fake_upstream, "deepinfra")
        make_provider(fake_upstream, "deepinfra", slug="second")
        serve_models(fake_upstream, "deepinfra", "a/one", "a/two")
        serve_models(fake_upstream, "second", "a/one")

        output = refresh_models()

        lines = output.splitlines()
        assert lines[0].startswith("deepinfra: 2 seen, 2 added, 0 updated, 0 deactivated")
        assert lines[1].startswith("second: 1 seen, 1 added")
        assert "Refreshed 2 provider(s)" in lines[2]
        assert RefreshRun.objects.get().trigger == RefreshRun.Trigger.COMMAND

    def test_it_exits_with_an_error_when_a_provider_failed(self, fake_upstream):
        make_provider(fake_upstream, "deepinfra")
        make_provider(fake_upstream, "deepinfra", slug="broken")
        serve_models(fake_upstream, "deepinfra", "a/one")
        fake_upstream.reply("GET", "/broken/models", status=500, json_body={"error": "down"})
        out = StringIO()

        with pytest.raises(CommandError, match="1 of 2 provider"):
            call_command("refresh_models", stdout=out)

        assert "broken: FAILED" in out.getvalue()
        assert "HTTP 500" in out.getvalue()
        assert "deepinfra: 1 seen, 1 added" in out.getvalue()

    def test_it_refreshes_only_the_provider_named(self, fake_upstream):
        make_provider(fake_upstream, "deepinfra")
        make_provider(fake_upstream, "deepinfra", slug="other")
        serve_models(fake_upstream, "other", "a/one")

        output = refresh_models("--provider", "other")

        assert output.startswith("other: 1 seen")
        assert "deepinfra" not in output

    def test_an_unknown_provider_slug_is_a_command_error(self):
        with pytest.raises(CommandError, match="No provider with the slug 'nope'"):
            refresh_models("--provider", "nope")

    def test_it_says_so_when_there_is_nothing_to_refresh(self):
        assert refresh_models() == "No enabled provider to refresh.\n"


class TestSchedule:
    def test_migrations_create_one_five_minute_schedule_for_the_refresh(self):
        call_command("migrate", verbosity=0)

        schedule = Schedule.objects.get(name=SCHEDULE_NAME)
        assert schedule.func == "providers.tasks.scheduled_refresh"
        assert schedule.minutes == 5
        assert Schedule.objects.filter(name=SCHEDULE_NAME).count() == 1

    def test_the_scheduled_task_refreshes_and_summarises(self, fake_upstream):
        make_provider(fake_upstream, "deepinfra")
        serve_models(fake_upstream, "deepinfra", "a/one")

        summary = scheduled_refresh()

        assert summary.startswith("refreshed 1 provider(s)")
        assert summary.endswith("0 error(s)")
        assert RefreshRun.objects.get().trigger == RefreshRun.Trigger.SCHEDULE

"""Tasks run by django-q2, and the schedule that runs them."""

from __future__ import annotations

from django.conf import settings

from providers.models import RefreshRun
from providers.refresh import refresh_providers

REFRESH_SCHEDULE_NAME = "keyaos-refresh-models"


def scheduled_refresh() -> str:
    run = refresh_providers(trigger=RefreshRun.Trigger.SCHEDULE)
    providers = run.results.count()
    return f"refreshed {providers} provider(s) in {run.duration_ms} ms, {run.error_count} error(s)"


def first_refresh(slug: str) -> str:
    """A new provider's first refresh, queued by ``manage.py add_provider``."""
    run = refresh_providers(trigger=RefreshRun.Trigger.COMMAND, provider_slug=slug)
    return run.summary()


def queue_first_refresh(slug: str) -> None:
    """Queue ``first_refresh`` for the task cluster (``make run`` runs it within seconds)."""
    from django_q.tasks import async_task

    async_task("providers.tasks.first_refresh", slug, task_name=f"first refresh of {slug}")


def ensure_refresh_schedule() -> bool:
    """Keep the one refresh schedule's interval equal to KEYAOS_REFRESH_MINUTES.

    The data migration creates the schedule; this only updates it (``manage.py serve`` calls it
    before starting the cluster). Returns True when the interval changed.
    """
    from django_q.models import Schedule

    return bool(
        Schedule.objects.filter(name=REFRESH_SCHEDULE_NAME)
        .exclude(minutes=settings.KEYAOS_REFRESH_MINUTES)
        .update(minutes=settings.KEYAOS_REFRESH_MINUTES)
    )

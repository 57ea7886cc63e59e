"""Tasks run by django-q2 (the schedule is created by a data migration)."""

from __future__ import annotations

from providers.models import RefreshRun
from providers.refresh import refresh_providers


def scheduled_refresh() -> str:
    run = refresh_providers(trigger=RefreshRun.Trigger.SCHEDULE)
    providers = run.results.count()
    return f"refreshed {providers} provider(s) in {run.duration_ms} ms, {run.error_count} error(s)"

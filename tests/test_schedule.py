from __future__ import annotations

import pytest
from django_q.models import Schedule

from providers.tasks import REFRESH_SCHEDULE_NAME, ensure_refresh_schedule


@pytest.mark.django_db
def test_the_refresh_schedule_follows_keyaos_refresh_minutes(settings):
    assert Schedule.objects.get(name=REFRESH_SCHEDULE_NAME).minutes == 5
    settings.KEYAOS_REFRESH_MINUTES = 15
    assert ensure_refresh_schedule() is True
    assert ensure_refresh_schedule() is False
    schedule = Schedule.objects.get(name=REFRESH_SCHEDULE_NAME)
    assert (schedule.minutes, schedule.func) == (15, "providers.tasks.scheduled_refresh")

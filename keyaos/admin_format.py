"""Small display helpers shared by the admin pages."""

from __future__ import annotations

from datetime import datetime

from django.contrib.humanize.templatetags.humanize import naturaltime
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html


def relative_time(value: datetime | None) -> str:
    """'3 minutes ago' / '25 seconds from now', with the exact time on hover."""
    if value is None:
        return "-"
    exact = date_format(timezone.localtime(value), "DATETIME_FORMAT")
    return format_html('<span title="{}">{}</span>', exact, naturaltime(value))

"""The base of the operator's ``manage.py`` commands."""

from __future__ import annotations

from django.core.management.base import BaseCommand


class OperatorCommand(BaseCommand):
    """A command an operator scripts: it starts without the system checks, which import every
    URL, view and admin module (they run with ``manage.py check``, ``migrate`` and ``serve``)."""

    requires_system_checks = []

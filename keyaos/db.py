"""Database work started from the event loop outside a request."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps

from asgiref.sync import sync_to_async
from django.db import connection


def db_task[**P, R](function: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """Run ``function`` in a worker thread and give its connection back afterwards.

    Django closes connections at the end of a request only; background work (the snapshot
    poller, the ledger writer) would otherwise keep one open per thread (see DJANGO_NOTES).
    """

    def closing(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        finally:
            connection.close()

    return wraps(function)(sync_to_async(closing, thread_sensitive=False))

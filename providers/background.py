"""Work the admin and the setup commands start at once and do not wait for: the first refresh
of a new provider, the first check of a new key.

A daemon thread, started when the saving transaction commits (so it sees the new rows, and a test
inside a transaction starts none). It needs no task cluster: it runs under ``make run``,
``runserver`` and a bare ``manage.py`` command alike.
"""

from __future__ import annotations

import logging
import threading

from django.db import close_old_connections, connections, transaction

from providers.models import Provider, RefreshRun, UpstreamKey

logger = logging.getLogger(__name__)

_threads: list[threading.Thread] = []
# One at a time: a provider saved and its key saved a second later refresh one after the other.
_one_at_a_time = threading.Lock()


def refresh_soon(
    provider: Provider, *, trigger: str = RefreshRun.Trigger.ADMIN, check: UpstreamKey | None = None
) -> None:
    """After commit, check ``check`` (a new key) with its provider, then refresh ``provider``'s
    catalog, prices and balances."""
    slug, key_id = provider.slug, check.pk if check else None

    def start() -> None:
        thread = threading.Thread(
            target=_run, args=(slug, key_id, trigger), name=f"keyaos-refresh-{slug}", daemon=True
        )
        _threads.append(thread)
        thread.start()

    transaction.on_commit(start)


def wait(timeout_s: float = 60) -> None:
    """Wait for the background work started so far (a command before it exits; tests)."""
    while _threads:
        _threads.pop(0).join(timeout_s)


def _run(slug: str, key_id: int | None, trigger: str) -> None:
    from providers.refresh import refresh_providers, validate_key

    close_old_connections()
    try:
        with _one_at_a_time:
            if key_id is not None:
                key = UpstreamKey.objects.select_related("provider").filter(pk=key_id).first()
                if key is not None:
                    validate_key(key)
            refresh_providers(trigger=trigger, provider_slug=slug)
    except Exception:
        logger.exception("background refresh of %s failed", slug)
    finally:
        connections.close_all()

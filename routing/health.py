"""Key health seen by the gateway: cooldowns shared through the cache, hard failures persisted.

Cooldowns live in the Django cache (Redis when configured), so every gateway process honours a
429 that one of them received; each process keeps a local copy, merged from the cache by the
snapshot poller, so the request path reads memory only.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from django.conf import settings
from django.core.cache import cache

from keyaos.lib.db import db_task
from providers.models import UpstreamKey, unusable_reason
from providers.upstream import Failure, health_after
from routing.snapshot import KeyInfo

logger = logging.getLogger("keyaos.health")

COOLDOWN_KEY = "cooldown:{}"
FAILURES_KEY = "failures:{}"


class HealthBoard:
    def __init__(self) -> None:
        self.cooldowns: dict[int, float] = {}  # key id -> epoch seconds
        self.marked: dict[int, str] = {}  # key id -> health set here, until the snapshot shows it
        self.failures: dict[int, int] = {}

    def unusable_reason(self, key: KeyInfo, now: float | None = None) -> str | None:
        now = time.time() if now is None else now
        health = self.marked.get(key.id, key.health)
        until = max(self.cooldowns.get(key.id, 0.0), _epoch(key))
        usable_balance = key.balance is None or key.balance > 0
        if health == UpstreamKey.Health.OK and until <= now and usable_balance:
            return None
        return unusable_reason(
            health=health,
            last_error=key.last_error,
            cooldown_until=datetime.fromtimestamp(until, UTC) if until > now else None,
            balance=key.balance,
        )

    def forget_marks(self, keys: dict[int, list[KeyInfo]]) -> None:
        """Drop local marks once a rebuilt snapshot carries the persisted state."""
        seen = {key.id: key.health for provider_keys in keys.values() for key in provider_keys}
        for key_id, health in list(self.marked.items()):
            if seen.get(key_id) == health:
                del self.marked[key_id]

    async def merge_shared(self, key_ids: list[int]) -> None:
        if not key_ids:
            return
        shared = await cache.aget_many([COOLDOWN_KEY.format(key_id) for key_id in key_ids])
        for name, until in shared.items():
            key_id = int(name.split(":")[1])
            if until > self.cooldowns.get(key_id, 0.0):
                self.cooldowns[key_id] = until

    def record_success(self, key: KeyInfo) -> None:
        if self.failures.pop(key.id, None):
            self.cooldowns.pop(key.id, None)

    async def record_failure(
        self, key: KeyInfo, failure: Failure, message: str, retry_after_s: float | None = None
    ) -> None:
        """Take the key out of this process's routing now, then tell the others."""
        outcome = self.note_failure(key, failure, retry_after_s)
        if outcome is not None:
            await self.share_failure(key, outcome, message)

    def note_failure(
        self, key: KeyInfo, failure: Failure, retry_after_s: float | None = None
    ) -> Failure | float | None:
        """Update local state at once: the failure class, or the cooldown's seconds."""
        if failure == Failure.CLIENT:
            return None
        if failure in (Failure.INVALID, Failure.EXHAUSTED):
            self.marked[key.id] = health_after(failure)
            return failure
        if failure == Failure.RATE_LIMITED:
            seconds = (
                retry_after_s
                if retry_after_s is not None
                else settings.KEYAOS_RATE_LIMIT_COOLDOWN_S
            )
        else:
            count = self.failures.get(key.id, 0) + 1
            self.failures[key.id] = count
            seconds = settings.KEYAOS_TRANSIENT_COOLDOWN_S * 2 ** (count - 1)
        seconds = min(seconds, settings.KEYAOS_MAX_COOLDOWN_S)
        self.cooldowns[key.id] = time.time() + seconds
        return seconds

    async def share_failure(self, key: KeyInfo, outcome: Failure | float, message: str) -> None:
        """Persist a hard failure, or share a cooldown through the cache (I/O: off the path)."""
        if isinstance(outcome, Failure):
            await db_task(persist_health)(key.id, health_after(outcome), message)
            return
        until = self.cooldowns[key.id]
        await cache.aset(COOLDOWN_KEY.format(key.id), until, timeout=int(outcome) + 1)
        await db_task(persist_cooldown)(key.id, outcome, message)


def persist_health(key_id: int, health: str, message: str) -> None:
    UpstreamKey.objects.filter(pk=key_id).mark(health, message)
    logger.warning("upstream key %s marked %s: %s", key_id, health, message)


def persist_cooldown(key_id: int, seconds: float, message: str) -> None:
    UpstreamKey.objects.filter(pk=key_id).cool_down(seconds, message)


def _epoch(key: KeyInfo) -> float:
    return key.cooldown_until.timestamp() if key.cooldown_until else 0.0

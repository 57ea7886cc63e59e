"""Routing state shared between processes."""

from __future__ import annotations

import uuid

from django.db import models


class SnapshotVersion(models.Model):
    """A token replaced whenever routing data changes.

    Every gateway process polls this one row (off the request path) and rebuilds its in-process
    snapshot when the token differs from the one it built from, so a change made by the scheduler,
    a command or an admin save reaches all of them within a poll interval. A fresh random token
    (rather than a counter) cannot come back to a value a process has already seen.
    """

    token = models.UUIDField(default=uuid.uuid4)

    def __str__(self) -> str:
        return str(self.token)

    @classmethod
    def bump(cls) -> None:
        if not cls.objects.filter(pk=1).update(token=uuid.uuid4()):
            cls.objects.update_or_create(pk=1, defaults={"token": uuid.uuid4()})

    @classmethod
    def current(cls) -> uuid.UUID | None:
        return cls.objects.filter(pk=1).values_list("token", flat=True).first()

"""The signal that routing data changed where no ``post_save`` says so (``QuerySet.update``).

Whoever changes it in bulk calls ``routing_data_changed()``; routing (``routing/signals.py``)
listens and renews the snapshot version once the transaction commits.
"""

from __future__ import annotations

from django.dispatch import Signal

routing_data_change = Signal()


def routing_data_changed() -> None:
    routing_data_change.send(sender=None)

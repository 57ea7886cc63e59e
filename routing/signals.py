"""A change to routing data tells every gateway process to rebuild its snapshot.

Connected in ``RoutingConfig.ready()`` to the models the snapshot is built from, and to
``keyaos.lib.signals.routing_data_change`` for bulk updates. The version is renewed when the
transaction commits, so a process never rebuilds from data that is not there yet.
"""

from __future__ import annotations

from django.db import transaction
from django.db.models.signals import post_delete, post_save

from billing.models import ApiKey, CurrencyRate
from keyaos.lib.signals import routing_data_change
from providers.models import ModelAlias, ModelOffer, Provider, UpstreamKey
from routing.models import SnapshotVersion

ROUTING_MODELS = (Provider, UpstreamKey, ModelOffer, ModelAlias, CurrencyRate, ApiKey)


def bump_snapshot_version(**kwargs) -> None:
    transaction.on_commit(SnapshotVersion.bump)


def connect() -> None:
    for model in ROUTING_MODELS:
        uid = f"snapshot-{model._meta.label}"
        post_save.connect(bump_snapshot_version, sender=model, dispatch_uid=uid)
        post_delete.connect(bump_snapshot_version, sender=model, dispatch_uid=uid)
    routing_data_change.connect(bump_snapshot_version, dispatch_uid="snapshot-bulk")

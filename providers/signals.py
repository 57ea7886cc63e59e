"""Any change to routing data tells the gateway processes to rebuild their snapshot."""

from __future__ import annotations

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from billing.models import ApiKey, CurrencyRate
from providers.models import ModelAlias, ModelOffer, Provider, UpstreamKey, key_health_changed

ROUTING_MODELS = (Provider, UpstreamKey, ModelOffer, ModelAlias, CurrencyRate, ApiKey)


def bump_snapshot_version() -> None:
    from routing.models import SnapshotVersion

    transaction.on_commit(SnapshotVersion.bump)


@receiver(post_save)
@receiver(post_delete)
def routing_data_changed(sender, **kwargs) -> None:
    if sender in ROUTING_MODELS:
        bump_snapshot_version()


@receiver(key_health_changed)
def key_health_moved(sender, **kwargs) -> None:
    bump_snapshot_version()

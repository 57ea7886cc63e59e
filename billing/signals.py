"""Daily rollups outlive the client keys, providers and upstream keys they count."""

from __future__ import annotations

from django.db.models.signals import pre_delete
from django.dispatch import receiver

from billing.models import ApiKey, DailyUsage
from providers.models import Provider, UpstreamKey

OWNER_FIELDS = {ApiKey: "api_key", Provider: "provider", UpstreamKey: "upstream_key"}


@receiver(pre_delete, sender=ApiKey)
@receiver(pre_delete, sender=Provider)
@receiver(pre_delete, sender=UpstreamKey)
def fold_rollups_of_deleted_owner(sender, instance, **kwargs) -> None:
    # Runs inside the deletion's transaction, before SET NULL would merge two groups into one.
    DailyUsage.objects.forget(OWNER_FIELDS[sender], instance.pk)

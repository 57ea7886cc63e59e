"""Model identity across providers: which canonical ``vendor/model`` each offer serves.

The rules live on ``Provider.identify``; this module keeps the identity source's published ids
(read from OpenRouter's catalog by the refresh) and re-keys offers when the rules' inputs change:
new published ids, or an operator's mapping saved or deleted (which takes effect at once).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.utils import timezone

from keyaos.lib.signals import routing_data_changed
from providers.models import ModelAlias, ModelOffer, Provider, PublishedIdentity

if TYPE_CHECKING:  # the adapters (httpx) load with the first refresh, not with every command
    from providers.adapters import CatalogEntry

IDENTITY_FIELDS = ["canonical_id", "identity_rule", "identity_note"]


def published_ids(entries: Iterable[CatalogEntry]) -> dict[str, set[str]]:
    """Native id (lowercased) -> the canonical ids that publish it, from OpenRouter entries.

    A variant (``vendor/model:free``) shares its base model's ``hugging_face_id``: when the base
    is listed too, the variant does not claim the id, so it is no conflict.
    """
    claims: dict[str, set[str]] = defaultdict(set)
    for entry in entries:
        canonical = entry.upstream_model_id.lower()
        for native in (entry.hugging_face_id, entry.canonical_slug):
            native = native.strip().lower()
            if native and native != canonical:
                claims[native].add(canonical)
    for canonicals in claims.values():
        bases = {c for c in canonicals if ":" not in c}
        if bases:
            canonicals -= {c for c in canonicals if ":" in c and c.split(":", 1)[0] in bases}
    return dict(claims)


@transaction.atomic
def store_published(published: dict[str, set[str]], *, source: str) -> bool:
    """Replace the stored published ids; returns whether they changed."""
    if PublishedIdentity.as_map() == published:
        return False
    PublishedIdentity.objects.all().delete()
    now = timezone.now()
    PublishedIdentity.objects.bulk_create(
        PublishedIdentity(native_id=native, canonical_id=canonical, source=source, fetched_at=now)
        for native, canonicals in sorted(published.items())
        for canonical in sorted(canonicals)
    )
    return True


def apply_identity(offer: ModelOffer, provider: Provider, aliases, published) -> bool:
    """Set the offer's canonical id and rule; returns whether anything changed."""
    identity = provider.identify(offer.upstream_model_id, aliases, published)
    wanted = (identity.canonical_id, identity.rule, identity.note[:300])
    if (offer.canonical_id, offer.identity_rule, offer.identity_note) == wanted:
        return False
    offer.canonical_id, offer.identity_rule, offer.identity_note = wanted
    return True


def provider_aliases(provider: Provider) -> dict[str, str]:
    return dict(provider.aliases.values_list("upstream_model_id", "canonical_id"))


@transaction.atomic
def rekey_offers(provider: Provider | None = None) -> int:
    """Re-apply the identity rules to every offer (of ``provider``); returns how many changed."""
    published = PublishedIdentity.as_map()
    providers = [provider] if provider is not None else list(Provider.objects.all())
    changed = []
    for each in providers:
        aliases = provider_aliases(each)
        for offer in each.offers.only("id", "upstream_model_id", *IDENTITY_FIELDS):
            if apply_identity(offer, each, aliases, published):
                changed.append(offer)
    if changed:
        ModelOffer.objects.bulk_update(changed, IDENTITY_FIELDS, batch_size=500)
        routing_data_changed()
    return len(changed)


@receiver(post_save, sender=ModelAlias)
@receiver(post_delete, sender=ModelAlias)
def mapping_changed(sender, instance: ModelAlias, **kwargs) -> None:
    """An operator's mapping takes effect at once, not at the next refresh."""
    provider = Provider.objects.filter(pk=instance.provider_id).first()
    if provider is not None:
        rekey_offers(provider)


def settle_identity(offer: ModelOffer, *, chosen_canonical_id: str = "") -> None:
    """Give a saved offer its identity. A canonical id the operator typed that the rules would
    not give becomes their mapping, so it survives every refresh."""
    provider = offer.provider
    aliases, published = provider_aliases(provider), PublishedIdentity.as_map()
    chosen = chosen_canonical_id.strip().lower()
    rules_give = provider.identify(offer.upstream_model_id, aliases, published).canonical_id
    if chosen and chosen != rules_give:
        ModelAlias.objects.update_or_create(
            provider=provider,
            upstream_model_id=offer.upstream_model_id,
            defaults={"canonical_id": chosen},
        )  # the signal re-keys the offer
        offer.refresh_from_db(fields=IDENTITY_FIELDS)
        return
    if apply_identity(offer, provider, aliases, published):
        offer.save(update_fields=IDENTITY_FIELDS)

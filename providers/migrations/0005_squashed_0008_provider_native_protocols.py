"""The wave's provider and catalog fields in one migration: offer identity (0005), the prompt
cache lifetime and the refresh's unpriced models (the two 0006s and their merge, 0007), and
native protocols (0008).

Every landed build had either none of 0005-0008 applied or all of them, so ``replaces`` is all
an existing database needs: Django records this migration as applied where the four are, and
runs it where none is.
"""

import django.core.validators
import django.utils.timezone
from django.db import migrations, models

import providers.models


def label_existing_offers(apps, schema_editor):
    """The rule that gave each existing offer its canonical id (no published ids yet)."""
    ModelOffer = apps.get_model("providers", "ModelOffer")
    ModelAlias = apps.get_model("providers", "ModelAlias")
    mapped = set(ModelAlias.objects.values_list("provider_id", "upstream_model_id"))
    offers = list(ModelOffer.objects.select_related("provider"))
    for offer in offers:
        if (offer.provider_id, offer.upstream_model_id) in mapped:
            offer.identity_rule = "mapping"
        elif "/" not in offer.upstream_model_id and offer.provider.default_vendor:
            offer.identity_rule = "vendor"
    ModelOffer.objects.bulk_update(offers, ["identity_rule"], batch_size=500)


IDENTITY_RULES = [
    ("mapping", "Operator's mapping"),
    ("published", "Published id (OpenRouter's hugging_face_id or canonical_slug)"),
    ("vendor", "Provider's default vendor"),
    ("lowercase", "Native id, lowercased"),
    ("conflict", "Conflict: several canonical ids publish this id"),
]
AUTH_STYLES = [
    ("bearer", "Authorization: Bearer"),
    ("x-api-key", "x-api-key header"),
    ("anthropic", "x-api-key and anthropic-version (Anthropic)"),
]
CATALOG_FORMATS = [
    ("openrouter", "OpenRouter (per-token price strings)"),
    ("deepinfra", "DeepInfra (metadata.pricing per 1M)"),
    ("zenmux", "ZenMux (tiered pricings per 1M)"),
    ("openai", "OpenAI list (ids only, prices set by hand)"),
    ("anthropic", "Anthropic list (ids and names, prices set by hand)"),
]


class Migration(migrations.Migration):
    replaces = [
        ("providers", "0005_offer_identity"),
        ("providers", "0006_provider_prompt_cache_ttl"),
        ("providers", "0006_refresh_result_unpriced_models"),
        ("providers", "0007_merge_unpriced_models_and_prompt_cache_ttl"),
        ("providers", "0008_provider_native_protocols"),
    ]

    dependencies = [
        ("providers", "0004_provider_read_timeout_default"),
    ]

    operations = [
        migrations.AddField(
            model_name="modeloffer",
            name="identity_note",
            field=models.CharField(blank=True, max_length=300),
        ),
        migrations.AddField(
            model_name="modeloffer",
            name="identity_rule",
            field=models.CharField(
                choices=IDENTITY_RULES,
                default="lowercase",
                help_text="Which rule gave the canonical id.",
                max_length=10,
            ),
        ),
        migrations.CreateModel(
            name="PublishedIdentity",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("native_id", models.CharField(db_index=True, max_length=200)),
                ("canonical_id", models.CharField(max_length=200)),
                ("source", models.CharField(max_length=300)),
                ("fetched_at", models.DateTimeField(default=django.utils.timezone.now)),
            ],
            options={
                "ordering": ["native_id", "canonical_id"],
                "constraints": [
                    models.UniqueConstraint(
                        fields=("native_id", "canonical_id"), name="unique_published_identity"
                    )
                ],
            },
        ),
        migrations.RunPython(label_existing_offers, migrations.RunPython.noop),
        migrations.AddField(
            model_name="provider",
            name="prompt_cache_ttl_s",
            field=models.FloatField(
                default=300.0,
                help_text=(
                    "How long this provider keeps a conversation's prompt prefix cached: "
                    "routing expects a key that served a session this recently to bill that "
                    "prefix at the cached price."
                ),
                validators=[django.core.validators.MinValueValidator(0.0)],
                verbose_name="prompt cache lifetime (s)",
            ),
        ),
        migrations.AddField(
            model_name="refreshresult",
            name="unpriced_models",
            field=models.JSONField(
                blank=True,
                default=list,
                help_text="Active offers without a price: they do not serve.",
            ),
        ),
        migrations.AddField(
            model_name="provider",
            name="native_protocols",
            field=models.JSONField(
                blank=True,
                default=dict,
                help_text=(
                    "Client protocols this provider serves natively, with their base URL up to "
                    'and including /v1 ("" for the base URL above), e.g. {"anthropic": '
                    '"https://api.deepseek.com/anthropic/v1"}. Requests in that protocol are '
                    "passed through untranslated."
                ),
                validators=[providers.models.validate_native_protocols],
            ),
        ),
        migrations.AlterField(
            model_name="provider",
            name="auth_style",
            field=models.CharField(choices=AUTH_STYLES, default="bearer", max_length=20),
        ),
        migrations.AlterField(
            model_name="provider",
            name="catalog_format",
            field=models.CharField(choices=CATALOG_FORMATS, default="openai", max_length=20),
        ),
    ]

import django.utils.timezone
from django.db import migrations, models


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


class Migration(migrations.Migration):

    dependencies = [
        ('providers', '0004_provider_read_timeout_default'),
    ]

    operations = [
        migrations.AddField(
            model_name='modeloffer',
            name='identity_note',
            field=models.CharField(blank=True, max_length=300),
        ),
        migrations.AddField(
            model_name='modeloffer',
            name='identity_rule',
            field=models.CharField(choices=[('mapping', "Operator's mapping"), ('published', "Published id (OpenRouter's hugging_face_id or canonical_slug)"), ('vendor', "Provider's default vendor"), ('lowercase', 'Native id, lowercased'), ('conflict', 'Conflict: several canonical ids publish this id')], default='lowercase', help_text='Which rule gave the canonical id.', max_length=10),
        ),
        migrations.CreateModel(
            name='PublishedIdentity',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('native_id', models.CharField(db_index=True, max_length=200)),
                ('canonical_id', models.CharField(max_length=200)),
                ('source', models.CharField(max_length=300)),
                ('fetched_at', models.DateTimeField(default=django.utils.timezone.now)),
            ],
            options={
                'ordering': ['native_id', 'canonical_id'],
                'constraints': [models.UniqueConstraint(fields=('native_id', 'canonical_id'), name='unique_published_identity')],
            },
        ),
        migrations.RunPython(label_existing_offers, migrations.RunPython.noop),
    ]

import django.db.models.functions.comparison
from django.db import migrations, models
from django.db.models import Count, Min

GROUP = ("day", "api_key_id", "provider_id", "upstream_key_id", "requested_model")
SUMS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cost_usd", "list_cost_usd")


def merge_duplicate_groups(apps, schema_editor):
    """Rows the old prune created twice for one group become one, before the constraint."""
    DailyUsage = apps.get_model("billing", "DailyUsage")
    duplicated = (
        DailyUsage.objects.order_by()
        .values(*GROUP)
        .annotate(n=Count("id"), first=Min("id"))
        .filter(n__gt=1)
    )
    for group in list(duplicated):
        rows = DailyUsage.objects.filter(**{name: group[name] for name in GROUP})
        kept = DailyUsage.objects.get(pk=group["first"])
        for row in rows.exclude(pk=kept.pk):
            for name in SUMS:
                setattr(kept, name, getattr(kept, name) + getattr(row, name))
            row.delete()
        kept.save()


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0003_limits_rollups_and_readings"),
        ("providers", "0004_provider_read_timeout_default"),
    ]

    operations = [
        migrations.RunPython(merge_duplicate_groups, migrations.RunPython.noop),
        migrations.AddConstraint(
            model_name="dailyusage",
            constraint=models.UniqueConstraint(
                models.F("day"),
                django.db.models.functions.comparison.Coalesce(
                    "api_key", models.Value(0), output_field=models.BigIntegerField()
                ),
                django.db.models.functions.comparison.Coalesce(
                    "provider", models.Value(0), output_field=models.BigIntegerField()
                ),
                django.db.models.functions.comparison.Coalesce(
                    "upstream_key", models.Value(0), output_field=models.BigIntegerField()
                ),
                models.F("requested_model"),
                name="one_daily_usage_per_group",
            ),
        ),
    ]

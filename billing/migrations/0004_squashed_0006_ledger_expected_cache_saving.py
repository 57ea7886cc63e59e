"""The wave's ledger fields in one migration: one daily usage row per group (0004), client
errors in the rollups (0005) and the expected prompt-cache saving (0006).

Every landed build had either none of 0004-0006 applied or all of them, so ``replaces`` is all
an existing database needs: Django records this migration as applied where the three are, and
runs it where none is.
"""

from decimal import Decimal

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


def key_or_zero(name):
    return django.db.models.functions.comparison.Coalesce(
        name, models.Value(0), output_field=models.BigIntegerField()
    )


class Migration(migrations.Migration):
    replaces = [
        ("billing", "0004_daily_usage_one_row_per_group"),
        ("billing", "0005_daily_usage_client_errors"),
        ("billing", "0006_ledger_expected_cache_saving"),
    ]

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
                key_or_zero("api_key"),
                key_or_zero("provider"),
                key_or_zero("upstream_key"),
                models.F("requested_model"),
                name="one_daily_usage_per_group",
            ),
        ),
        migrations.AddField(
            model_name="dailyusage",
            name="client_errors",
            field=models.PositiveIntegerField(
                default=0, help_text="Errors of the client's making: client errors and disconnects."
            ),
        ),
        migrations.AddField(
            model_name="ledgerentry",
            name="expected_cache_saving_usd",
            field=models.DecimalField(
                decimal_places=12,
                default=Decimal("0"),
                help_text="What routing expected the prompt cache to save on this request (USD).",
                max_digits=28,
            ),
        ),
    ]

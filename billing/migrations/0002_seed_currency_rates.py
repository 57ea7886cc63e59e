"""Seed an editable CNY rate so DeepSeek (billed in CNY) works out of the box."""

from decimal import Decimal

from django.db import migrations


def seed_rates(apps, schema_editor):
    CurrencyRate = apps.get_model("billing", "CurrencyRate")
    CurrencyRate.objects.get_or_create(currency="CNY", defaults={"usd_per_unit": Decimal("0.14")})


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_initial")]
    operations = [migrations.RunPython(seed_rates, migrations.RunPython.noop)]

from decimal import Decimal
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('billing', '0005_daily_usage_client_errors'),
    ]

    operations = [
        migrations.AddField(
            model_name='ledgerentry',
            name='expected_cache_saving_usd',
            field=models.DecimalField(decimal_places=12, default=Decimal('0'), help_text='What routing expected the prompt cache to save on this request (USD).', max_digits=28),
        ),
    ]

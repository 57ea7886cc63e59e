import django.core.validators
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('providers', '0005_offer_identity'),
    ]

    operations = [
        migrations.AddField(
            model_name='provider',
            name='prompt_cache_ttl_s',
            field=models.FloatField(default=300.0, help_text="How long this provider keeps a conversation's prompt prefix cached: routing expects a key that served a session this recently to bill that prefix at the cached price.", validators=[django.core.validators.MinValueValidator(0.0)], verbose_name='prompt cache lifetime (s)'),
        ),
    ]

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ('providers', '0006_provider_prompt_cache_ttl'),
        ('providers', '0006_refresh_result_unpriced_models'),
    ]

    operations = [
    ]

"""The 5-minute refresh schedule, created idempotently (migrating twice leaves one row)."""

from django.db import migrations

SCHEDULE_NAME = "keyaos-refresh-models"


def create_schedule(apps, schema_editor):
    Schedule = apps.get_model("django_q", "Schedule")
    Schedule.objects.get_or_create(
        name=SCHEDULE_NAME,
        defaults={
            "func": "providers.tasks.scheduled_refresh",
            "schedule_type": "I",
            "minutes": 5,
            "repeats": -1,
        },
    )


def delete_schedule(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name=SCHEDULE_NAME).delete()


class Migration(migrations.Migration):
    dependencies = [("providers", "0001_initial"), ("django_q", "0018_task_success_index")]
    operations = [migrations.RunPython(create_schedule, delete_schedule)]

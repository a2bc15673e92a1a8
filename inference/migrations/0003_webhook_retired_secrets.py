"""Rotated-out webhook secrets: one `previous_secret` becomes a list, so a second rotation within
the overlap keeps the first retired secret signing."""

from django.db import migrations, models


def previous_secret_to_list(apps, schema_editor):
    from django.utils import timezone

    WebhookEndpoint = apps.get_model("inference", "WebhookEndpoint")
    now = timezone.now()
    for endpoint in WebhookEndpoint.objects.exclude(previous_secret="").filter(
            previous_secret_expires_at__gt=now):
        endpoint.retired_secrets = [{"secret": endpoint.previous_secret,
                                     "expires_at": endpoint.previous_secret_expires_at.isoformat()}]
        endpoint.save(update_fields=["retired_secrets"])


def list_to_previous_secret(apps, schema_editor):
    from datetime import datetime

    WebhookEndpoint = apps.get_model("inference", "WebhookEndpoint")
    for endpoint in WebhookEndpoint.objects.exclude(retired_secrets=[]):
        newest = endpoint.retired_secrets[-1]
        endpoint.previous_secret = newest["secret"]
        endpoint.previous_secret_expires_at = datetime.fromisoformat(newest["expires_at"])
        endpoint.save(update_fields=["previous_secret", "previous_secret_expires_at"])


class Migration(migrations.Migration):
    dependencies = [("inference", "0002_webhooks")]

    operations = [
        migrations.AddField(
            model_name="webhookendpoint",
            name="retired_secrets",
            field=models.JSONField(blank=True, default=list),
        ),
        migrations.RunPython(previous_secret_to_list, list_to_previous_secret),
        migrations.RemoveField(model_name="webhookendpoint", name="previous_secret"),
        migrations.RemoveField(model_name="webhookendpoint", name="previous_secret_expires_at"),
    ]

"""The job id of the events recorded before WebhookEvent.job_id existed, from their payload
(`data.id` of a `data.object` "job"), so a job's deletion or expiry finds them too.

Not atomic: each batch commits on its own, so a large table is never locked as a whole (event
recording goes on meanwhile) and an interrupted run resumes where a rerun finds null job ids."""

from django.db import migrations
from django.db.models.fields.json import KT

BATCH = 2000


def job_ids_from_payloads(apps, schema_editor):
    WebhookEvent = apps.get_model("inference", "WebhookEvent")
    after = ""
    while True:
        # Walked in primary-key order (its index), one bounded range per UPDATE.
        batch = list(WebhookEvent.objects.filter(pk__gt=after).order_by("pk")
                     .values_list("pk", flat=True)[:BATCH])
        if not batch:
            return
        WebhookEvent.objects.filter(
            pk__gte=batch[0], pk__lte=batch[-1], job_id__isnull=True, payload__data__object="job",
        ).update(job_id=KT("payload__data__id"))
        after = batch[-1]


class Migration(migrations.Migration):

    atomic = False

    dependencies = [
        ('inference', '0007_webhookevent_job_id'),
    ]

    operations = [
        migrations.RunPython(job_ids_from_payloads, migrations.RunPython.noop, elidable=True),
    ]

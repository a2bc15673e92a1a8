from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('inference', '0006_job_content_expirable'),
    ]

    operations = [
        migrations.AddField(
            model_name='webhookevent',
            name='job_id',
            field=models.CharField(blank=True, max_length=40, null=True),
        ),
        # Built while every row's job_id is still null: the partial index starts empty.
        migrations.AddIndex(
            model_name='webhookevent',
            index=models.Index(condition=models.Q(('job_id__isnull', False)), fields=['job_id'], name='webhook_event_job'),
        ),
    ]

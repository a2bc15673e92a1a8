"""The Celery app. Workers are started per queue (`make run` starts one per SLUICE_WORKER_QUEUES)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

app = Celery("sluice")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.task(name="portal.ping")
def ping() -> str:
    """Round trip through the broker; used by readiness checks of workers and by tests."""
    return "pong"

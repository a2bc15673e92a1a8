"""The Celery app. Workers are started per queue (`make run` starts one per SLUICE_WORKER_QUEUES)."""

import os

from celery import Celery
from celery.signals import setup_logging, worker_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

app = Celery("sluice")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.task(name="portal.ping")
def ping() -> str:
    """Round trip through the broker; used by readiness checks of workers and by tests."""
    return "pong"


@setup_logging.connect
def _log_like_the_web_server(**_):
    """Workers log through Django's LOGGING (JSON by default, with job and pool ids) instead of
    Celery's own format: connecting this signal is how Celery is told to leave logging alone."""
    from logging.config import dictConfig

    from django.conf import settings

    dictConfig(settings.LOGGING)


@worker_init.connect
def _serve_worker_metrics(**_):
    from portal.metrics import worker_metrics_serve

    worker_metrics_serve()

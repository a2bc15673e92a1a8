"""The Celery app. Workers are started per queue (`make run` starts one per SLUICE_WORKER_QUEUES)."""

import os

from celery import Celery
from celery.signals import (
    setup_logging,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_ready,
)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

app = Celery("sluice")
app.config_from_object("django.conf:settings", namespace="CELERY")
# Celery's Django fixup closes the database connection before and after every task unless told
# to reuse it: a fresh PostgreSQL backend (connect, fork, authenticate) per job. Reuse it, and
# let Django retire a broken or old one around each task, as it does around each request
# (CONN_MAX_AGE, CONN_HEALTH_CHECKS; workers run with SLUICE_DB_CONN_MAX_AGE=60).
app.conf.CELERY_DB_REUSE_MAX = 1_000_000
app.autodiscover_tasks()


@app.task(name="portal.ping")
def ping() -> str:
    """Round trip through the broker; used by readiness checks of workers and by tests."""
    return "pong"


@task_prerun.connect
@task_postrun.connect
def _retire_unusable_database_connections(**_):
    from django.db import close_old_connections

    close_old_connections()


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


@worker_init.connect
def _load_the_urlconf(**_):
    """Job events carry API URLs (`reverse`), and the URLconf imports every API module, the
    tokenizers' transformers among them: ~5 s of CPU. Load it in the worker before it forks, or
    each prefork child pays that on its first finished job (which then finishes 5 s late)."""
    from django.urls import get_resolver

    get_resolver().url_patterns  # noqa: B018 - the import is the point


@worker_ready.connect
def _load_the_safety_classifier(sender, **_):
    """A text pool's worker moderates every stream it runs: load the classifier before its
    first job, not in it (moderation/classifier.py: classifier_preload)."""
    from inference.registry import text_variants
    from moderation.classifier import classifier_preload

    consumed = set(sender.app.amqp.queues.consume_from or ())
    if consumed & {spec.pool for spec, _variant in text_variants()}:
        classifier_preload()


@worker_ready.connect
@worker_process_init.connect
def _freeze_long_lived_objects(**_):
    """The worker (and each prefork child) has loaded what it keeps: take it out of the
    garbage collector's full passes (portal/heap.py)."""
    from portal.heap import long_lived_freeze

    long_lived_freeze(after="worker start-up")

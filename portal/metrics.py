"""Every Prometheus metric Sluice exports, the scrape-time collectors, and exposition.

Processes: the web server and each Celery worker are separate processes (prefork workers fork
children too). With PROMETHEUS_MULTIPROC_DIR set (`make run`: var/prometheus, cleared at start;
a pod: an emptyDir), every process writes its samples to files there and whoever serves the
scrape adds them up: `make run`'s web server for the whole machine, a worker pod's own
exporter (SLUICE_METRICS_PORT) in a cluster. Without it (tests, a shell) the process-local
default registry is served.

Labels are bounded by construction: tier slugs, model ids, pools, priorities, error codes and
outcomes. Never a tenant, a job, a key or a prompt: the test suite checks every sample.

Events are recorded by one `*_observe` call at the one place each happens (the ledger, the job
services, the engines, the safety cascade, webhook delivery); queue depths and engine health are
read when Prometheus scrapes.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import threading
from collections.abc import Mapping
from datetime import datetime

from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from redis import RedisError

logger = logging.getLogger(__name__)

# Seconds, from a short completion to a long 4K video.
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TOKENS_PER_S_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
_STEPS_PER_S_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100)
_SAFETY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)

# --- admission and compute units (quotas/ledger.py) -------------------------------------------

ADMISSION_DECISIONS = Counter(
    "sluice_admission_decisions_total",
    "Admission decisions. outcome: admitted | queued | rejected; code: the error code of a "
    "rejection, fail_open for an admission made while Redis was unreachable, else none.",
    ["pool", "outcome", "code"],
)
CU_ESTIMATED = Counter(
    "sluice_cu_estimated_total", "CU estimated for requests that reached admission.",
    ["tier", "model"],
)
CU_RESERVED = Counter("sluice_cu_reserved_total", "CU reserved by admitted or queued requests.",
                      ["tier", "model"])
CU_SETTLED = Counter("sluice_cu_settled_total", "CU charged at settlement.", ["tier", "model"])
CU_REFUNDED = Counter("sluice_cu_refunded_total",
                      "CU reserved but not used, given back at settlement.", ["tier", "model"])

# --- jobs (inference/services.py) ---------------------------------------------------------------

JOBS_FINISHED = Counter(
    "sluice_jobs_finished_total",
    "Jobs by final status (succeeded | failed | cancelled).",
    ["pool", "model", "status"],
)
JOB_WAIT_SECONDS = Histogram(
    "sluice_job_wait_seconds", "From submission to a worker claiming the job (each attempt).",
    ["pool", "priority"], buckets=_DURATION_BUCKETS,
)
JOB_RUN_SECONDS = Histogram(
    "sluice_job_run_seconds", "From a worker claiming the job to its final status.",
    ["pool", "model", "status"], buckets=_DURATION_BUCKETS,
)

# --- engines ---------------------------------------------------------------------------------------

TEXT_TTFT_SECONDS = Histogram(
    "sluice_text_time_to_first_token_seconds",
    "From sending a request to the text engine to its first generated token.",
    ["model", "variant"], buckets=_TTFT_BUCKETS,
)
TEXT_TOKENS_PER_SECOND = Histogram(
    "sluice_text_tokens_per_second", "Decode rate of a text job after its first token.",
    ["model", "variant"], buckets=_TOKENS_PER_S_BUCKETS,
)
VIDEO_STEPS_PER_SECOND = Histogram(
    "sluice_video_steps_per_second", "Denoising steps per second of a video job.",
    ["model"], buckets=_STEPS_PER_S_BUCKETS,
)

# --- safety (moderation/cascade.py) ------------------------------------------------------------

SAFETY_STAGE_SECONDS = Histogram(
    "sluice_safety_stage_seconds",
    "Latency of each safety cascade stage (normalize | rules | classifier | total).",
    ["direction", "stage"], buckets=_SAFETY_BUCKETS,
)
SAFETY_VERDICTS = Counter(
    "sluice_safety_verdicts_total",
    "Safety verdicts. direction: input | output | api (/v1/moderations); "
    "action: allow | review | block; "
    "stage: the stage that decided.",
    ["direction", "action", "stage"],
)

# --- webhooks (inference/webhooks.py) ------------------------------------------------------------

WEBHOOK_DELIVERY_ATTEMPTS = Counter(
    "sluice_webhook_delivery_attempts_total",
    "Webhook delivery attempts by outcome: succeeded | failed (a retry is scheduled) | "
    "giving_up (no retries left).",
    ["outcome"],
)


def _cu(mcu: int) -> float:
    return mcu / 1000


def admission_observe(*, pool: str, tier: str, model: str, cost_mcu: int, outcome: str,
                      code: str = "none") -> None:
    ADMISSION_DECISIONS.labels(pool=pool, outcome=outcome, code=code).inc()
    CU_ESTIMATED.labels(tier=tier, model=model).inc(_cu(cost_mcu))
    if outcome != "rejected":
        CU_RESERVED.labels(tier=tier, model=model).inc(_cu(cost_mcu))


def settlement_observe(*, tier: str, model: str, settled_mcu: int, refunded_mcu: int) -> None:
    CU_SETTLED.labels(tier=tier, model=model).inc(_cu(settled_mcu))
    CU_REFUNDED.labels(tier=tier, model=model).inc(_cu(refunded_mcu))


def job_claim_observe(*, pool: str, priority: int, queued_at: datetime,
                      started_at: datetime) -> None:
    JOB_WAIT_SECONDS.labels(pool=pool, priority=str(priority)).observe(
        max(0.0, (started_at - queued_at).total_seconds())
    )


def job_finish_observe(*, pool: str, model: str, status: str, started_at: datetime | None,
                       finished_at: datetime) -> None:
    JOBS_FINISHED.labels(pool=pool, model=model, status=status).inc()
    if started_at is not None:
        JOB_RUN_SECONDS.labels(pool=pool, model=model, status=status).observe(
            max(0.0, (finished_at - started_at).total_seconds())
        )


def text_generation_observe(*, model: str, variant: str, ttft_s: float | None, tokens: int,
                            decode_s: float) -> None:
    if ttft_s is None:
        return  # nothing was generated
    TEXT_TTFT_SECONDS.labels(model=model, variant=variant).observe(ttft_s)
    if tokens > 1 and decode_s > 0:
        # The first token's time is TTFT's; the rate is over the tokens after it.
        TEXT_TOKENS_PER_SECOND.labels(model=model, variant=variant).observe((tokens - 1) / decode_s)


def video_generation_observe(*, model: str, steps: int, seconds: float) -> None:
    if steps and seconds > 0:
        VIDEO_STEPS_PER_SECOND.labels(model=model).observe(steps / seconds)


def safety_verdict_observe(*, direction: str, action: str, stage: str,
                           timings_ms: dict[str, float]) -> None:
    SAFETY_VERDICTS.labels(direction=direction, action=action, stage=stage).inc()
    for stage_name, milliseconds in timings_ms.items():
        SAFETY_STAGE_SECONDS.labels(direction=direction, stage=stage_name).observe(milliseconds / 1000)


def webhook_attempt_observe(*, outcome: str) -> None:
    WEBHOOK_DELIVERY_ATTEMPTS.labels(outcome=outcome).inc()


# --- read at scrape time ---------------------------------------------------------------------------


class QueueCollector:
    """Queue depth and the oldest queued job's age per pool and priority (the database: jobs
    waiting in the scheduler and those sent to a pool's Celery queue but not claimed yet),
    running jobs per pool, jobs waiting for pool capacity in the scheduler (Redis), and each
    Celery queue's backlog."""

    def collect(self):
        # Each source is read apart: a database or Redis that does not answer costs the scrape
        # only the families read from it. A failing collector failed the whole scrape (500), and
        # with it every counter of the pod: SluiceAdmissionFailOpen, the alert for a Redis
        # outage, could never fire during one.
        try:
            database_families = self._from_database()
        except DatabaseError as exc:
            logger.warning("metrics: the database did not answer (%s); queue gauges left out",
                           exc.__class__.__name__)
            database_families = ()
        yield from database_families
        try:
            redis_families = self._from_redis()
        except RedisError as exc:
            logger.warning("metrics: Redis did not answer (%s); scheduler and Celery queue "
                           "gauges left out", exc.__class__.__name__)
            redis_families = ()
        yield from redis_families

    def _from_database(self):
        from django.db.models import Count, Min

        from inference.models import Job
        from inference.selectors import jobs_running_by_pool

        depth = GaugeMetricFamily(
            "sluice_queue_jobs", "Queued jobs (not claimed by a worker yet).", labels=["pool", "priority"]
        )
        age = GaugeMetricFamily(
            "sluice_queue_oldest_job_age_seconds", "Age of the oldest queued job.",
            labels=["pool", "priority"],
        )
        running = GaugeMetricFamily(
            "sluice_jobs_running", "Jobs a worker is running now.", labels=["pool"]
        )
        now = timezone.now()
        rows = (Job.objects.filter(status=Job.Status.QUEUED).values("pool", "priority")
                .annotate(jobs=Count("id"), oldest=Min("queued_at")))
        for row in rows:
            labels = [row["pool"], str(row["priority"])]
            depth.add_metric(labels, row["jobs"])
            age.add_metric(labels, max(0.0, (now - row["oldest"]).total_seconds()))
        # Every pool, zeros included: autoscalers add this to the queue depth (docs/operations.md).
        for pool, jobs in jobs_running_by_pool().items():
            running.add_metric([pool], jobs)
        return depth, age, running

    def _from_redis(self):
        from inference.scheduler import scheduler_depths, scheduler_pools
        from portal.redis import redis_client

        waiting = GaugeMetricFamily(
            "sluice_scheduler_waiting_jobs",
            "Jobs the scheduler holds back until their pool has capacity.", labels=["pool", "priority"],
        )
        backlog = GaugeMetricFamily(
            "sluice_celery_queue_messages", "Messages waiting in a Celery queue.", labels=["queue"]
        )
        client = redis_client()
        for pool in scheduler_pools():
            for priority, jobs in scheduler_depths(pool=pool).items():
                waiting.add_metric([pool, str(priority)], jobs)
        for queue in settings.SLUICE_WORKER_QUEUES:
            # Celery's Redis transport keeps each queue as a list under the queue's name.
            backlog.add_metric([queue], client.llen(queue))
        return waiting, backlog


class EngineHealthCollector:
    """1 when a text variant's vLLM server answers /health, else 0."""

    PROBE_TIMEOUT_S = 0.5

    def collect(self):
        from inference.engines.vllm import engine_ready
        from inference.registry import text_variants

        up = GaugeMetricFamily("sluice_engine_up", "The text engine answers /health.",
                               labels=["model", "variant"])
        for spec, variant in text_variants():
            if variant.served_name in settings.SLUICE_VLLM_URLS:
                ready = engine_ready(variant, timeout_s=self.PROBE_TIMEOUT_S)
                up.add_metric([spec.id, variant.served_name], 1.0 if ready else 0.0)
        yield up


class _ProcessLocalCollector:
    """The default registry, when this process is the only one that records (no multiprocess dir)."""

    def collect(self):
        return REGISTRY.collect()


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def metrics_exposition(*, queues: bool) -> tuple[bytes, str]:
    """The scrape body and its content type. queues=False for worker exporters: every web
    replica already reports the queues, and a worker reporting them too would double them."""
    registry = CollectorRegistry()
    if multiprocess_dir():
        MultiProcessCollector(registry)
    else:
        registry.register(_ProcessLocalCollector())
    if queues:
        registry.register(QueueCollector())
    if settings.SLUICE_METRICS_PROBE_ENGINES:
        registry.register(EngineHealthCollector())
    return generate_latest(registry), CONTENT_TYPE_LATEST


def scrape_allowed(environ: Mapping[str, str]) -> bool:
    """For a request's WSGI environ (Django's `request.META`). With SLUICE_METRICS_TOKEN set:
    `Bearer <token>`, compared in constant time. Without one: loopback clients only (one
    machine, `make run`), and never a request that came through a proxy (X-Forwarded-For or
    Forwarded). Behind a proxy whose headers the server trusts (uvicorn --proxy-headers), the
    client address is what the request says it is: `X-Forwarded-For: 127.0.0.1` would
    otherwise pass for loopback."""
    token = settings.SLUICE_METRICS_TOKEN
    if token:
        return hmac.compare_digest(environ.get("HTTP_AUTHORIZATION", "").encode(),
                                   f"Bearer {token}".encode())
    if "HTTP_X_FORWARDED_FOR" in environ or "HTTP_FORWARDED" in environ:
        return False
    try:
        return ipaddress.ip_address(environ.get("REMOTE_ADDR", "")).is_loopback
    except ValueError:
        return False


def worker_metrics_serve() -> threading.Thread | None:
    """A Celery worker's own scrape endpoint on SLUICE_METRICS_PORT (0: none). It runs in the
    worker's main process and adds up the samples its pool children write to the multiprocess
    directory; same token rule as the web's /metrics."""
    port = settings.SLUICE_METRICS_PORT
    if not port:
        return None
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    def app(environ, start_response):
        if not scrape_allowed(environ):
            start_response("401 Unauthorized", [("WWW-Authenticate", "Bearer")])
            return [b""]
        body, content_type = metrics_exposition(queues=False)
        start_response("200 OK", [("Content-Type", content_type)])
        return [body]

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
            pass  # one line per scrape is noise

    server = make_server("0.0.0.0", port, app, handler_class=QuietHandler)  # noqa: S104 - pod port
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="metrics")
    thread.start()
    logger.info("worker metrics on :%d/metrics", port)
    return thread

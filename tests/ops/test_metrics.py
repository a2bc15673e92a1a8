"""Metrics move when their event happens, /metrics is protected, and no label is unbounded."""

from __future__ import annotations

import re

import pytest
from django.utils import timezone
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from inference.services import job_claim, job_succeed, jobs_reap
from inference.webhook_models import WebhookDelivery
from inference.webhooks import (
    webhook_delivery_attempt,
    webhook_endpoint_create,
    webhook_event_publish,
)
from moderation.cascade import safety_check_input
from moderation.selectors import safety_policy_for_tenant
from portal.metrics import text_generation_observe
from quotas.errors import InsufficientQuota
from quotas.models import Reservation
from tests.factories import VIDEO_JOB_PARAMS, api_key_obj, tenant_with_limits, video_job_submit

pytestmark = pytest.mark.django_db
CU = {"tier": "pro", "model": "sluice-video-tiny"}


def scrape(client, **headers) -> dict[str, list]:
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.status_code
    return {family.name: family.samples
            for family in text_string_to_metric_families(response.content.decode())}


def test_admission_rejection_and_admission_are_counted_with_their_cu(sent_tasks, moved):
    api_key = api_key_obj(tenant_with_limits(budget_cu=2))
    with pytest.raises(InsufficientQuota):
        video_job_submit(api_key, cu=5)
    assert moved("sluice_admission_decisions_total", pool="video-hbm", outcome="rejected",
                 code="insufficient_quota") == 1
    assert moved("sluice_cu_reserved_total", **CU) == 0

    video_job_submit(api_key, cu=1.5)
    assert moved("sluice_admission_decisions_total", pool="video-hbm", outcome="admitted",
                 code="none") == 1
    assert moved("sluice_cu_estimated_total", **CU) == 6.5  # rejected requests were estimated too
    assert moved("sluice_cu_reserved_total", **CU) == 1.5


def test_a_finished_job_moves_the_histograms_and_settles_its_cu(sent_tasks, moved):
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    job = video_job_submit(api_key, cu=3).job
    claimed = job_claim(job_id=job.pk, attempt=1)
    priority = str(job.priority)
    assert moved("sluice_job_wait_seconds_count", pool="video-hbm", priority=priority) == 1
    job_succeed(job=claimed, actual_mcu=2000, result={}, usage={})

    done = {"pool": "video-hbm", "model": "sluice-video-tiny", "status": "succeeded"}
    assert moved("sluice_jobs_finished_total", **done) == 1
    assert moved("sluice_job_run_seconds_count", **done) == 1
    assert moved("sluice_cu_settled_total", **CU) == 2 and moved("sluice_cu_refunded_total", **CU) == 1

    failed = video_job_submit(api_key, cu=1).job
    # Its reservation ran out before any worker took it: failed, never started, no run time.
    Reservation.objects.filter(pk=failed.reservation_id).update(expires_at=timezone.now())
    assert jobs_reap() == {"timed_out": 1}
    assert moved("sluice_jobs_finished_total", **{**done, "status": "failed"}) == 1
    assert moved("sluice_job_run_seconds_count", **{**done, "status": "failed"}) == 0
    assert moved("sluice_cu_refunded_total", **CU) == 2


def test_safety_verdicts_and_stage_latencies_are_observed(cast, moved):
    policy = safety_policy_for_tenant(tenant=cast.tenant)
    verdict = safety_check_input(text="   ", policy=policy)
    assert moved("sluice_safety_verdicts_total", direction="input", action=verdict.action,
                 stage=verdict.stage) == 1
    for stage in verdict.timings_ms:
        assert moved("sluice_safety_stage_seconds_count", direction="input", stage=stage) == 1


def test_webhook_attempts_are_counted_by_outcome(cast, receiver, moved):
    webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    event = webhook_event_publish(tenant=cast.tenant, event_type="job.completed", data={"id": "job_1"})
    delivery = WebhookDelivery.objects.get(event=event)
    webhook_delivery_attempt(delivery_id=delivery.pk, attempt=1)
    assert moved("sluice_webhook_delivery_attempts_total", outcome="succeeded") == 1


def test_text_rates_leave_the_first_token_to_ttft(moved):
    text_generation_observe(model="m", variant="m-int8", ttft_s=0.2, tokens=11, decode_s=2.0)
    assert moved("sluice_text_time_to_first_token_seconds_sum", model="m", variant="m-int8") == 0.2
    assert moved("sluice_text_tokens_per_second_sum", model="m", variant="m-int8") == 5.0


def test_scrape_reports_queue_depth_age_and_scheduler_wait(cast, client, sent_tasks, settings):
    settings.SLUICE_METRICS_PROBE_ENGINES = False
    settings.SLUICE_POOL_SLOTS = {"text-batch": 32, "video-hbm": 1}
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    first = video_job_submit(api_key, cu=1).job  # takes the pool's only slot (sent to Celery, not claimed)
    video_job_submit(api_key, cu=1)  # waits in the scheduler for capacity
    families = scrape(client)
    labels = {"pool": "video-hbm", "priority": str(first.priority)}
    depth = {s.labels["pool"]: s.value for s in families["sluice_queue_jobs"] if s.labels == labels}
    assert depth == {"video-hbm": 2}
    (age,) = [s for s in families["sluice_queue_oldest_job_age_seconds"] if s.labels == labels]
    assert age.value >= 0
    waiting = [s.value for s in families["sluice_scheduler_waiting_jobs"] if s.labels == labels]
    assert waiting == [1]
    backlog = {s.labels["queue"] for s in families["sluice_celery_queue_messages"]}
    assert backlog == set(settings.SLUICE_WORKER_QUEUES)
    running = {s.labels["pool"]: s.value for s in families["sluice_jobs_running"]}
    assert running == {"text-batch": 0, "video-hbm": 0}


def test_engine_health_is_probed_at_scrape(client, settings):
    from portal.embedded_redis import free_port

    nobody = f"http://127.0.0.1:{free_port()}"
    settings.SLUICE_VLLM_URLS = {"sluice-code-tiny": nobody, "sluice-code-tiny-int8": nobody}
    settings.SLUICE_METRICS_PROBE_ENGINES = True
    up = scrape(client)["sluice_engine_up"]
    assert {(s.labels["variant"], s.value) for s in up} == {
        ("sluice-code-tiny", 0.0), ("sluice-code-tiny-int8", 0.0)}


def test_metrics_need_the_token_or_a_loopback_client(client, settings):
    settings.SLUICE_METRICS_PROBE_ENGINES = False
    settings.SLUICE_METRICS_TOKEN = ""
    assert client.get("/metrics").status_code == 200  # the test client is 127.0.0.1
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 401
    # Behind a proxy whose headers uvicorn trusts (deploy/k8s/web.yaml), the address is the
    # one the request claims: a proxied request never passes for loopback.
    for header in ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED"):
        assert client.get("/metrics", **{header: "127.0.0.1"}).status_code == 401, header

    settings.SLUICE_METRICS_TOKEN = "scrape-token-1"
    assert client.get("/metrics").status_code == 401  # loopback is no longer enough
    wrong = client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-token-2")
    assert wrong.status_code == 401 and wrong["WWW-Authenticate"] == "Bearer"
    families = scrape(client, HTTP_AUTHORIZATION="Bearer scrape-token-1", REMOTE_ADDR="10.1.2.3")
    assert "sluice_admission_decisions" in families and "sluice_queue_jobs" in families


# Label values a metric may carry: slugs, model ids, pools, codes, small integers.
_BOUNDED_VALUE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_ALLOWED_LABELS = {"pool", "priority", "outcome", "code", "tier", "model", "variant", "status",
                   "direction", "action", "stage", "queue", "le"}
_MAX_SERIES_PER_METRIC = 200


def test_no_label_carries_an_unbounded_value(cast, api, client, receiver, sent_tasks, settings):
    """Drive every instrumented event, then read every sluice_* sample: ids, prompts and keys
    must never appear, only values from small, fixed sets."""
    settings.SLUICE_METRICS_PROBE_ENGINES = False
    prompt = "a very particular prompt about otters 12345"
    api_key = api_key_obj(tenant_with_limits(budget_cu=3))
    job = video_job_submit(api_key, cu=2, params={**VIDEO_JOB_PARAMS, "prompt": prompt}).job
    job_succeed(job=job_claim(job_id=job.pk, attempt=1), actual_mcu=1000, result={}, usage={})
    with pytest.raises(InsufficientQuota):
        video_job_submit(api_key, cu=50)
    video_job_submit(api_key, cu=1)  # stays queued for the scrape
    safety_check_input(text=prompt, policy=safety_policy_for_tenant(tenant=cast.tenant))
    webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    event = webhook_event_publish(tenant=cast.tenant, event_type="job.completed", data={"id": job.pk})
    webhook_delivery_attempt(delivery_id=WebhookDelivery.objects.get(event=event).pk, attempt=1)

    forbidden = {job.pk, str(api_key.tenant_id), api_key.prefix, cast.tenant.slug, prompt}
    samples = [s for family in REGISTRY.collect() for s in family.samples]
    samples += [s for found in scrape(client).values() for s in found]
    series: dict[str, set] = {}
    for s in samples:
        if not s.name.startswith("sluice_"):
            continue
        assert set(s.labels) <= _ALLOWED_LABELS, (s.name, s.labels)
        for name, value in s.labels.items():
            if name == "le":
                float(value)  # a bucket bound
                continue
            assert _BOUNDED_VALUE.match(value), (s.name, name, value)
            assert value not in forbidden and not value.startswith(("job_", "res_", "sk-")), (s.name, value)
        series.setdefault(s.name, set()).add(tuple(sorted(s.labels.items())))
    assert "sluice_jobs_finished_total" in series and "sluice_queue_jobs" in series
    assert max(len(found) for found in series.values()) <= _MAX_SERIES_PER_METRIC


def test_worker_exporter_serves_the_same_metrics_behind_the_same_token(settings):
    import httpx

    from portal.embedded_redis import free_port
    from portal.metrics import worker_metrics_serve

    settings.SLUICE_METRICS_PORT = free_port()
    settings.SLUICE_METRICS_TOKEN = "scrape-token-1"
    settings.SLUICE_METRICS_PROBE_ENGINES = False
    worker_metrics_serve()
    url = f"http://127.0.0.1:{settings.SLUICE_METRICS_PORT}/metrics"
    assert httpx.get(url, timeout=5).status_code == 401
    answer = httpx.get(url, headers={"Authorization": "Bearer scrape-token-1"}, timeout=5)
    assert answer.status_code == 200 and "sluice_jobs_finished" in answer.text
    assert "sluice_queue_jobs" not in answer.text  # the web pods report the queues
    settings.SLUICE_METRICS_TOKEN = ""
    assert httpx.get(url, timeout=5).status_code == 200  # loopback
    assert httpx.get(url, headers={"X-Forwarded-For": "127.0.0.1"}, timeout=5).status_code == 401


def test_a_scrape_while_redis_is_down_still_serves_the_counters(client, settings, tmp_path):
    """SluiceAdmissionFailOpen is the alert for a Redis outage, and reads a counter the web pods
    export: a scrape that failed whole (500) on its first Redis read could never show it."""
    from portal.embedded_redis import embedded_redis_start
    from portal.metrics import admission_observe

    settings.SLUICE_METRICS_PROBE_ENGINES = False
    redis_server = embedded_redis_start(data_dir=tmp_path)
    settings.REDIS_URL = redis_server.url
    assert "sluice_scheduler_waiting_jobs" in scrape(client)
    redis_server.stop()
    # What reservation_open records for a fail-open tier's request while Redis is down.
    admission_observe(pool="text-batch", tier="pro", model="sluice-code-tiny", cost_mcu=1000,
                      outcome="admitted", code="fail_open")

    families = scrape(client)
    fail_open = [s for s in families["sluice_admission_decisions"]
                 if s.labels.get("code") == "fail_open" and s.name.endswith("_total")]
    assert fail_open and fail_open[0].value >= 1
    assert {s.labels["pool"] for s in families["sluice_jobs_running"]} == {"text-batch", "video-hbm"}
    # What only Redis knows is left out, not made up.
    assert not families.get("sluice_scheduler_waiting_jobs")
    assert not families.get("sluice_celery_queue_messages")

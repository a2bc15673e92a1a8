"""Publishing, signing, retries, giving up and auto-disable, against a real local receiver."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import threading
import time
from datetime import timedelta

import pytest
from django.core.serializers.json import DjangoJSONEncoder
from django.utils import timezone
from standardwebhooks import Webhook, WebhookVerificationError

from inference.webhook_models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent
from inference.webhooks import (
    retry_delay,
    webhook_deliveries_dispatch,
    webhook_delivery_attempt,
    webhook_delivery_redeliver,
    webhook_endpoint_create,
    webhook_endpoint_secret_rotate,
    webhook_endpoint_update,
    webhook_event_publish,
)
from portal.errors import InvalidParameter
from quotas.ledger import budget_alert_check
from quotas.limits import quota_limits_for
from tests.factories import api_key_obj, tenant_with_limits
from tests.inference.conftest import Reply

pytestmark = pytest.mark.django_db

Status = WebhookDelivery.Status


def publish(tenant, event_type="job.completed", **data) -> WebhookEvent | None:
    return webhook_event_publish(tenant=tenant, event_type=event_type,
                                 data=data or {"id": "job_1", "status": "succeeded"})


def only_delivery(event: WebhookEvent) -> WebhookDelivery:
    (delivery,) = event.deliveries.all()
    return delivery


def attempt_next(delivery: WebhookDelivery) -> WebhookDelivery | None:
    delivery.refresh_from_db()
    return webhook_delivery_attempt(delivery_id=delivery.id, attempt=delivery.attempts + 1)


def drive(delivery: WebhookDelivery) -> list[str]:
    """What a worker plus the dispatcher would do, without waiting for the schedule."""
    statuses = []
    delivery.refresh_from_db()
    while delivery.is_live:
        delivery = attempt_next(delivery)
        statuses.append(delivery.status)
    return statuses


def queued_messages(redis_client) -> list[dict]:
    return [json.loads(raw) for raw in redis_client.lrange("webhooks", 0, -1)]


# --- publishing ----------------------------------------------------------------------------


def test_publish_delivers_only_to_enabled_subscribed_endpoints_of_the_tenant(cast, receiver):
    everything = webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    progress_only = webhook_endpoint_create(tenant=cast.tenant, url=receiver.url,
                                            event_types=["job.progress"])
    webhook_endpoint_create(tenant=cast.tenant, url=receiver.url, enabled=False)
    webhook_endpoint_create(tenant=cast.outsider_tenant, url=receiver.url,
                            event_types=["job.completed", "job.progress"])

    completed = publish(cast.tenant)
    assert [d.endpoint_id for d in completed.deliveries.all()] == [everything.id]
    progress = publish(cast.tenant, "job.progress", id="job_1", progress=0.5)
    assert [d.endpoint_id for d in progress.deliveries.all()] == [progress_only.id]
    assert "job.progress" not in everything.event_types  # opt-in only
    # Nobody listens: nothing is stored.
    assert publish(cast.tenant, "moderation.case_opened") is not None  # `everything` listens
    assert webhook_event_publish(tenant=cast.tenant, event_type="job.queued", data={}) is not None
    WebhookEndpoint.objects.filter(tenant=cast.tenant).update(enabled=False)
    before = WebhookEvent.objects.count()
    assert publish(cast.tenant) is None
    assert WebhookEvent.objects.count() == before
    with pytest.raises(InvalidParameter):
        publish(cast.tenant, "job.exploded")


def test_event_payload_is_stored_as_sent(cast, receiver):
    webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    when = timezone.now()
    event = publish(cast.tenant, finished_at=when, id="job_1")
    assert event.id.startswith("msg_")
    assert event.payload["type"] == "job.completed"
    assert event.payload["timestamp"].endswith("Z")
    # Datetimes become DjangoJSONEncoder's ISO 8601 strings before storing, as they are sent.
    assert event.payload["data"] == {"finished_at": DjangoJSONEncoder().default(when),
                                     "id": "job_1"}


def test_publish_enqueues_one_message_per_delivery_on_commit(cast, receiver, clean_redis,
                                                             django_capture_on_commit_callbacks):
    webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        event = publish(cast.tenant)
        assert clean_redis.llen("webhooks") == 0  # nothing leaves before the commit
    assert len(callbacks) == 2
    messages = queued_messages(clean_redis)
    assert {m["headers"]["task"] for m in messages} == {"inference.webhook_deliver"}
    sent = {tuple(json.loads(base64.b64decode(m["body"]))[0]) for m in messages}
    assert sent == {(d.id, 1) for d in event.deliveries.all()}


def _endpoint_queries(queries) -> list[str]:
    return [q["sql"] for q in queries.captured_queries if "inference_webhookendpoint" in q["sql"]]


def test_job_events_of_a_tenant_without_endpoints_read_no_endpoint_rows(cast, receiver, clean_redis):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from inference.events import event_publish

    webhook_endpoint_create(tenant=cast.outsider_tenant, url=receiver.url)
    event_publish(job_id="job_w1", tenant_id=cast.tenant.pk, event_type="job.queued", data={})
    with CaptureQueriesContext(connection) as queries:
        for event_type in ("job.started", "job.progress", "job.completed"):
            event_publish(job_id="job_w1", tenant_id=cast.tenant.pk, event_type=event_type, data={})
    assert _endpoint_queries(queries) == []
    # The tenant with an endpoint still gets its events recorded.
    event_publish(job_id="job_w2", tenant_id=cast.outsider_tenant.pk, event_type="job.completed",
                  data={"status": "succeeded"})
    assert WebhookEvent.objects.filter(tenant=cast.outsider_tenant, type="job.completed").count() == 1


def test_endpoints_keep_getting_job_events_after_redis_loses_its_data(cast, receiver, clean_redis):
    from inference.events import event_publish

    webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    clean_redis.flushdb()  # a Redis restart: the index of tenants with endpoints is gone
    event_publish(job_id="job_w3", tenant_id=cast.tenant.pk, event_type="job.completed",
                  data={"status": "succeeded"})
    (event,) = WebhookEvent.objects.filter(tenant=cast.tenant, type="job.completed")
    assert event.payload["data"]["id"] == "job_w3"
    assert len(event.deliveries.all()) == 1
    # The index alone evicted, then another tenant's endpoint created: the index is partial,
    # and still the first tenant's events are recorded.
    from inference.events import WEBHOOK_TENANTS_KEY

    clean_redis.delete(WEBHOOK_TENANTS_KEY)
    webhook_endpoint_create(tenant=cast.outsider_tenant, url=receiver.url)
    event_publish(job_id="job_w4", tenant_id=cast.tenant.pk, event_type="job.completed",
                  data={"status": "succeeded"})
    assert WebhookEvent.objects.filter(tenant=cast.tenant, type="job.completed").count() == 2


def test_an_event_in_the_stream_is_published_even_if_the_webhook_index_cannot_be_rebuilt(
        cast, receiver, clean_redis, monkeypatch):
    """Raising after the event reached the stream would have the job's end counted as refused
    and published a second time by the reaper."""
    import redis as redis_lib

    from inference import events

    def refused():
        raise redis_lib.ConnectionError("Redis went away")

    clean_redis.flushdb()  # the index is gone: this publish would rebuild it
    monkeypatch.setattr(events, "webhook_tenants_rebuild", refused)
    seq = events.event_publish(job_id="job_w5", tenant_id=cast.tenant.pk,
                               event_type="job.completed", data={"status": "succeeded"})
    assert [event.seq for event in events.events_read(job_id="job_w5")] == [seq]


def test_no_endpoint_is_created_while_redis_is_unreachable(cast, receiver, settings):
    from quotas.errors import SystemOverloaded

    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    with pytest.raises(SystemOverloaded):
        webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    assert not WebhookEndpoint.objects.filter(tenant=cast.tenant).exists()


# --- signing and delivery ------------------------------------------------------------------


def test_delivery_is_signed_per_standard_webhooks(cast, receiver):
    endpoint = webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    assert endpoint.secret.startswith("whsec_")
    assert 24 <= len(base64.b64decode(endpoint.secret.removeprefix("whsec_"))) <= 64
    event = publish(cast.tenant, id="job_7", status="succeeded")

    delivery = attempt_next(only_delivery(event))

    (request,) = receiver.requests
    assert request.path == "/hooks"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["webhook-id"] == event.id
    verified = Webhook(endpoint.secret).verify(request.body, request.headers)
    assert verified == {"type": "job.completed", "timestamp": event.payload["timestamp"],
                        "data": {"id": "job_7", "status": "succeeded"}}
    with pytest.raises(WebhookVerificationError):
        tampered = request.body.replace(b"job_7", b"job_8")
        Webhook(endpoint.secret).verify(tampered, request.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(request.body,
                                                                          request.headers)

    assert delivery.status == Status.SUCCEEDED and delivery.attempts == 1
    assert delivery.last_status_code == 200 and delivery.last_response_snippet == "ok"
    assert delivery.next_attempt_at is None
    (logged,) = WebhookAttempt.objects.filter(delivery=delivery)
    assert (logged.number, logged.status_code, logged.error) == (1, 200, "")
    assert logged.latency_ms >= 0 and logged.url == receiver.url


def test_retries_after_500s_then_succeeds_with_the_same_webhook_id(cast, receiver):
    endpoint = webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(consecutive_failures=2)
    receiver.script(Reply(500, b"boom"), Reply(503, b"busy"))
    delivery = only_delivery(publish(cast.tenant))

    first = attempt_next(delivery)
    assert first.status == Status.FAILED and first.last_status_code == 500
    assert first.last_error == "HTTP 500" and first.last_response_snippet == "boom"
    # The first retry is due after the schedule's first delay (jitter is 0 in tests).
    assert first.next_attempt_at - first.updated_at == timedelta(seconds=0.01)
    assert drive(first) == [Status.FAILED, Status.SUCCEEDED]

    assert len(receiver.requests) == 3
    assert {r.headers["webhook-id"] for r in receiver.requests} == {delivery.event_id}
    for request in receiver.requests:  # each attempt is signed afresh and verifies
        Webhook(endpoint.secret).verify(request.body, request.headers)
    assert list(WebhookAttempt.objects.filter(delivery=delivery).order_by("number")
                .values_list("status_code", flat=True)) == [500, 503, 200]
    endpoint.refresh_from_db()
    assert endpoint.consecutive_failures == 0  # a success ends the failure run


def test_a_receiver_slower_than_the_timeout_is_retried(cast, receiver, settings):
    # 0.2 s was too little for the second, prompt answer on a loaded CI machine (it timed out too).
    settings.SLUICE_WEBHOOK_TIMEOUT_S = 0.5
    webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    receiver.script(Reply(200, delay_s=2.0))
    delivery = only_delivery(publish(cast.tenant))

    first = attempt_next(delivery)
    assert first.status == Status.FAILED
    assert first.last_status_code is None and "timed out" in first.last_error
    assert first.last_latency_ms < 2000
    assert attempt_next(first).status == Status.SUCCEEDED


class TricklingReceiver:
    """Sends `opening` at once, then one byte of `trickle` every 0.1 s for `for_s` seconds:
    every socket read returns well within any read timeout, so only a deadline over the whole
    exchange stops it."""

    def __init__(self, *, opening: bytes, trickle: bytes, for_s: float) -> None:
        self.opening, self.trickle, self.for_s = opening, trickle, for_s
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            connection, _ = self.listener.accept()
            with connection:
                connection.recv(65536)
                self.requests += 1
                connection.sendall(self.opening)
                ends_at = time.monotonic() + self.for_s
                while time.monotonic() < ends_at:
                    connection.sendall(self.trickle)
                    time.sleep(0.1)

    def close(self) -> None:
        self.listener.close()


def test_a_receiver_trickling_its_headers_cannot_hold_the_worker_past_the_timeout(
        cast, webhook_settings):
    """A receiver (or anything a redirect points at) chooses how fast it answers: the worker
    must be free again at SLUICE_WEBHOOK_TIMEOUT_S, and an answer that took longer is not a
    success. Here the status line comes at once and the headers never end."""
    webhook_settings.SLUICE_WEBHOOK_TIMEOUT_S = 0.5
    trickling = TricklingReceiver(opening=b"HTTP/1.1 200 OK\r\nX-Slow: ", trickle=b"a", for_s=4.0)
    try:
        webhook_endpoint_create(tenant=cast.tenant, url=f"http://127.0.0.1:{trickling.port}/hooks")
        delivery = only_delivery(publish(cast.tenant))

        started = time.monotonic()
        first = attempt_next(delivery)
        took_s = time.monotonic() - started
    finally:
        trickling.close()

    assert trickling.requests == 1
    assert took_s < 1.5
    assert first.status == Status.FAILED
    assert first.last_status_code is None and "timed out after 0.5 s" in first.last_error


def test_a_response_body_with_nul_bytes_is_logged_and_the_delivery_settled(cast, receiver):
    """PostgreSQL text cannot hold NUL: a receiver answering 200 with one (a binary body) must
    not make the attempt unrecordable (the delivery then stayed live and was sent again after
    every lease, for ever)."""
    webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    receiver.script(Reply(200, b"ok\x00\x01done"))
    delivery = only_delivery(publish(cast.tenant))

    first = attempt_next(delivery)

    assert first.status == Status.SUCCEEDED and first.next_attempt_at is None
    assert first.last_response_snippet == "ok\ufffd\x01done"
    assert WebhookAttempt.objects.get(delivery=delivery).response_snippet == "ok\ufffd\x01done"
    assert webhook_deliveries_dispatch(now=timezone.now() + timedelta(days=1)) == 0
    assert len(receiver.requests) == 1


def test_gives_up_after_the_schedule(cast, receiver):
    endpoint = webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    receiver.script(*[Reply(500)] * 10)
    delivery = only_delivery(publish(cast.tenant))

    # One attempt plus one per scheduled retry (two in tests), then no more.
    assert drive(delivery) == [Status.FAILED, Status.FAILED, Status.GIVING_UP]
    delivery.refresh_from_db()
    assert delivery.attempts == 3 and delivery.next_attempt_at is None
    assert webhook_delivery_attempt(delivery_id=delivery.id, attempt=4) is None
    assert len(receiver.requests) == 3
    endpoint.refresh_from_db()
    assert endpoint.consecutive_failures == 1 and endpoint.enabled


def test_default_schedule_spans_about_a_day(settings):
    settings.SLUICE_WEBHOOK_RETRY_SCHEDULE_S = [5, 300, 1800, 7200, 18000, 36000, 50400]
    settings.SLUICE_WEBHOOK_RETRY_JITTER = 0.2
    delays = [retry_delay(attempt=n) for n in range(1, 9)]
    assert delays[-1] is None
    total = sum(delays[:-1], timedelta())
    assert timedelta(hours=20) < total < timedelta(hours=40)
    assert timedelta(seconds=4) <= delays[0] <= timedelta(seconds=6)


def test_endpoint_is_disabled_after_a_run_of_failed_deliveries(cast, receiver, caplog):
    endpoint = webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    receiver.script(*[Reply(500)] * 100)
    caplog.set_level(logging.INFO)
    for _ in range(3):  # SLUICE_WEBHOOK_DISABLE_AFTER_FAILURES in tests
        drive(only_delivery(publish(cast.tenant)))

    endpoint.refresh_from_db()
    assert not endpoint.enabled and endpoint.auto_disabled
    assert "3 deliveries in a row failed" in endpoint.disabled_reason
    assert endpoint.disabled_at is not None
    assert f"webhook endpoint {endpoint.id} disabled" in caplog.text
    assert publish(cast.tenant) is None  # nothing further is sent to it

    webhook_endpoint_update(endpoint=endpoint, enabled=True)
    endpoint.refresh_from_db()
    assert endpoint.enabled and endpoint.disabled_reason == "" and endpoint.consecutive_failures == 0


def test_a_live_delivery_to_an_endpoint_disabled_meanwhile_gives_up(cast, receiver):
    endpoint = webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    delivery = only_delivery(publish(cast.tenant))
    webhook_endpoint_update(endpoint=endpoint, enabled=False)
    assert attempt_next(delivery) is None
    delivery.refresh_from_db()
    assert delivery.status == Status.GIVING_UP and delivery.last_error == "endpoint disabled"
    assert receiver.requests == []


def test_attempts_are_claimed_once(cast, receiver):
    webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    delivery = only_delivery(publish(cast.tenant))
    assert webhook_delivery_attempt(delivery_id=delivery.id, attempt=1).status == Status.SUCCEEDED
    # The same message delivered twice, a stale attempt number, a deleted row: all no-ops.
    assert webhook_delivery_attempt(delivery_id=delivery.id, attempt=1) is None
    assert webhook_delivery_attempt(delivery_id=delivery.id, attempt=2) is None
    assert webhook_delivery_attempt(delivery_id="wd_missing", attempt=1) is None
    assert len(receiver.requests) == 1


def test_dispatcher_hands_each_due_retry_to_the_queue_once(cast, receiver, clean_redis,
                                                           django_capture_on_commit_callbacks):
    webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    receiver.script(Reply(500))
    delivery = attempt_next(only_delivery(publish(cast.tenant)))
    clean_redis.delete("webhooks")
    assert webhook_deliveries_dispatch(now=delivery.next_attempt_at - timedelta(seconds=1)) == 0

    due = delivery.next_attempt_at
    with django_capture_on_commit_callbacks(execute=True):
        assert webhook_deliveries_dispatch(now=due) == 1
        assert webhook_deliveries_dispatch(now=due) == 0  # claimed for a lease
    (message,) = queued_messages(clean_redis)
    assert json.loads(base64.b64decode(message["body"]))[0] == [delivery.id, 2]


def test_a_lost_message_or_dead_worker_is_retried_after_its_lease(cast, receiver, clean_redis,
                                                                 django_capture_on_commit_callbacks):
    webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    lost = only_delivery(publish(cast.tenant))  # its message never ran (on_commit not executed)
    assert webhook_deliveries_dispatch(now=timezone.now()) == 0
    with django_capture_on_commit_callbacks(execute=True):
        assert webhook_deliveries_dispatch(now=lost.next_attempt_at) == 1
    (message,) = queued_messages(clean_redis)
    assert json.loads(base64.b64decode(message["body"]))[0] == [lost.id, 1]


def test_response_bodies_are_capped(cast, receiver, settings):
    settings.SLUICE_WEBHOOK_RESPONSE_MAX_BYTES = 1024
    webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    receiver.script(Reply(200, b"x" * 200_000))
    delivery = attempt_next(only_delivery(publish(cast.tenant)))
    assert delivery.status == Status.SUCCEEDED
    assert delivery.last_response_snippet == "x" * 1024


def test_redirects_are_followed_with_the_same_signed_post(cast, receiver, second_receiver):
    endpoint = webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    receiver.script(Reply(308, b"", headers={"Location": second_receiver.url}))
    delivery = attempt_next(only_delivery(publish(cast.tenant)))
    assert delivery.status == Status.SUCCEEDED
    (moved,) = second_receiver.requests
    Webhook(endpoint.secret).verify(moved.body, moved.headers)
    assert WebhookAttempt.objects.get(delivery=delivery).url == second_receiver.url


def test_too_many_redirects_fail_the_attempt(cast, receiver, settings):
    settings.SLUICE_WEBHOOK_MAX_REDIRECTS = 3
    webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    receiver.script(*[Reply(302, b"", headers={"Location": "/again"})] * 10)
    delivery = attempt_next(only_delivery(publish(cast.tenant)))
    assert delivery.status == Status.FAILED and "more than 3 redirects" in delivery.last_error
    assert len(receiver.requests) == 4


def test_after_rotation_both_secrets_sign_until_the_overlap_ends(cast, receiver, settings):
    endpoint = webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    old_secret = endpoint.secret
    webhook_endpoint_secret_rotate(endpoint=endpoint)
    assert endpoint.secret != old_secret and endpoint.secret.startswith("whsec_")
    attempt_next(only_delivery(publish(cast.tenant)))
    request = receiver.requests[-1]
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    Webhook(endpoint.secret).verify(request.body, request.headers)
    Webhook(old_secret).verify(request.body, request.headers)

    endpoint.retired_secrets[0]["expires_at"] = (timezone.now() - timedelta(seconds=1)).isoformat()
    endpoint.save(update_fields=["retired_secrets"])
    attempt_next(only_delivery(publish(cast.tenant)))
    request = receiver.requests[-1]
    Webhook(endpoint.secret).verify(request.body, request.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(old_secret).verify(request.body, request.headers)


def test_a_second_rotation_within_the_overlap_keeps_the_first_secret_signing(cast, receiver):
    """The receiver may not have taken the first new secret yet (or it leaked on the way): the
    original must still verify after a second rotation, until its own overlap ends."""
    endpoint = webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    original = endpoint.secret
    first = webhook_endpoint_secret_rotate(endpoint=endpoint).secret
    second = webhook_endpoint_secret_rotate(endpoint=endpoint).secret
    assert len({original, first, second}) == 3

    attempt_next(only_delivery(publish(cast.tenant)))
    request = receiver.requests[-1]
    assert len(request.headers["webhook-signature"].split(" ")) == 3
    for secret in (original, first, second):
        Webhook(secret).verify(request.body, request.headers)

    for _ in range(6):  # only the newest four retired secrets are kept
        webhook_endpoint_secret_rotate(endpoint=endpoint)
    attempt_next(only_delivery(publish(cast.tenant)))
    request = receiver.requests[-1]
    assert len(request.headers["webhook-signature"].split(" ")) == 5
    with pytest.raises(WebhookVerificationError):
        Webhook(original).verify(request.body, request.headers)
    Webhook(endpoint.secret).verify(request.body, request.headers)


def test_redeliver_sends_the_same_event_again_as_a_new_delivery(cast, receiver):
    endpoint = webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    receiver.script(*[Reply(500)] * 3)
    delivery = only_delivery(publish(cast.tenant))
    drive(delivery)
    again = webhook_delivery_redeliver(delivery=delivery)
    assert again.id != delivery.id and again.redelivery_of_id == delivery.id
    assert drive(again) == [Status.SUCCEEDED]
    assert receiver.requests[-1].headers["webhook-id"] == delivery.event_id

    webhook_endpoint_update(endpoint=endpoint, enabled=False)
    with pytest.raises(InvalidParameter):
        webhook_delivery_redeliver(delivery=delivery)


@pytest.mark.parametrize("withdrawal", ["deleted", "expired"])
def test_a_deleted_jobs_output_is_not_sent_again_by_a_retry_or_a_redelivery(receiver, sent_tasks,
                                                                            settings, withdrawal):
    """DELETE /v1/jobs/{id}, or the end of SLUICE_MEDIA_RETENTION_DAYS, removes what the job
    produced from every read: a job.completed delivery still retrying, or redelivered by hand,
    must not carry the completion to the receiver afterwards."""
    from inference.retention import jobs_content_expire
    from inference.services import job_claim, job_delete, job_succeed, text_job_create

    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    webhook_endpoint_create(tenant=api_key.tenant, url=receiver.url, event_types=["job.completed"])
    job = text_job_create(api_key=api_key, payload={"model": "sluice-code-tiny", "prompt": "x = 1",
                                                    "max_tokens": 4}).job
    receiver.script(Reply(500))
    job_succeed(job=job_claim(job_id=job.pk, attempt=1), actual_mcu=10,
                result={"text": "the private completion", "finish_reason": "stop"},
                usage={"completion_tokens": 3})
    delivery = only_delivery(WebhookEvent.objects.get(tenant=api_key.tenant))
    assert attempt_next(delivery).status == Status.FAILED  # the receiver was down
    assert b"the private completion" in receiver.requests[0].body

    if withdrawal == "deleted":
        job_delete(job=job)
    else:
        settings.SLUICE_MEDIA_RETENTION_DAYS = 1
        assert jobs_content_expire(now=timezone.now() + timedelta(days=2)) == 1
    assert attempt_next(delivery).status == Status.SUCCEEDED
    again = webhook_delivery_redeliver(delivery=delivery)
    assert attempt_next(again).status == Status.SUCCEEDED

    endpoint = WebhookEndpoint.objects.get(tenant=api_key.tenant)
    for request in receiver.requests[1:]:
        assert b"the private completion" not in request.body
        sent = Webhook(endpoint.secret).verify(request.body, request.headers)
        assert sent["type"] == "job.completed" and sent["data"]["id"] == job.pk
        assert sent["data"]["status"] == "succeeded" and "result" not in sent["data"]
        assert request.headers["webhook-id"] == delivery.event_id


@pytest.mark.parametrize("withdrawal", ["deleted", "expired"])
def test_a_deleted_jobs_output_leaves_its_recorded_webhook_events(cast, api, client, receiver,
                                                                  sent_tasks, settings, withdrawal):
    """DELETE /v1/jobs/{id}, or the end of SLUICE_MEDIA_RETENTION_DAYS, removes what the job
    produced: its job.completed event, delivered and settled, must not keep the completion in
    the database until SLUICE_WEBHOOK_RETENTION_DAYS purges it. What the event says of how the
    job ended stays, and another job's event keeps its own result."""
    from inference.models import Job
    from inference.retention import jobs_content_expire
    from inference.services import job_claim, job_succeed, text_job_create
    from portal.models import ApiKey

    api_key = ApiKey.objects.get(tenant=cast.tenant)
    endpoint = webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    completions = {}
    for text in ("the private completion", "the kept completion"):
        job = text_job_create(api_key=api_key, payload={"model": "sluice-code-tiny",
                                                        "prompt": "x = 1", "max_tokens": 4}).job
        job_succeed(job=job_claim(job_id=job.pk, attempt=1), actual_mcu=10,
                    result={"text": text, "finish_reason": "stop"}, usage={"completion_tokens": 3})
        completions[text] = job
    job, kept_job = completions.values()
    completed = WebhookEvent.objects.get(tenant=cast.tenant, type="job.completed", job_id=job.pk)
    receiver.replies.append(Reply(body=json.dumps(  # a receiver that echoes what it got
        {"echo": completed.payload}).encode()))
    assert attempt_next(only_delivery(completed)).status == Status.SUCCEEDED
    assert completed.payload["data"]["result"]["text"] == "the private completion"
    assert "the private completion" in only_delivery(completed).last_response_snippet
    assert WebhookEvent.objects.filter(job_id=job.pk).count() == 3  # queued, started, completed
    as_recorded = completed.payload

    if withdrawal == "deleted":
        assert api.bearer(cast.owner_key).delete(f"/v1/jobs/{job.pk}").status_code == 200
    else:
        settings.SLUICE_MEDIA_RETENTION_DAYS = 1
        Job.objects.filter(pk=job.pk).update(finished_at=timezone.now() - timedelta(days=2))
        assert jobs_content_expire() == 1

    completed.refresh_from_db()
    assert "the private completion" not in json.dumps(completed.payload)
    assert completed.payload == {**as_recorded, "data": {
        name: value for name, value in as_recorded["data"].items() if name != "result"}}
    assert completed.payload["data"]["usage"] == {"completion_tokens": 3}
    assert completed.payload["data"]["status"] == "succeeded"
    assert completed.type == "job.completed"
    assert only_delivery(completed).status == Status.SUCCEEDED
    # What the receiver echoed back, kept in the delivery log, goes with it.
    assert "the private completion" not in only_delivery(completed).last_response_snippet
    assert not WebhookAttempt.objects.filter(
        delivery__event=completed, response_snippet__contains="the private completion").exists()
    assert not any("the private completion" in json.dumps(payload) for payload in
                   WebhookEvent.objects.filter(job_id=job.pk).values_list("payload", flat=True))
    kept = WebhookEvent.objects.get(job_id=kept_job.pk, type="job.completed")
    assert kept.payload["data"]["result"]["text"] == "the kept completion"

    # The delivery log, in the API and on the dashboard, lists the event without the content.
    listed = api.bearer(cast.owner_key).get(f"/v1/webhooks/{endpoint.id}/deliveries")
    assert listed.status_code == 200 and completed.id in listed.content.decode()
    assert "the private completion" not in listed.content.decode()
    client.force_login(cast.owner.user)
    page = client.get(f"/t/acme/webhooks/{endpoint.id}/")
    assert page.status_code == 200 and completed.id in page.content.decode()
    assert "the private completion" not in page.content.decode()


def test_the_end_of_a_job_deleted_while_it_ran_loses_its_output_with_the_reapers_purge(
        cast, api, receiver, sent_tasks):
    """A job deleted while running ends afterwards (its worker finished before it saw the cancel
    flag): its job.completed is recorded with the completion after the delete, and the reaper's
    purge of the job's outputs takes it out of the event too."""
    from inference.services import job_claim, job_succeed, jobs_reap, text_job_create
    from portal.models import ApiKey

    webhook_endpoint_create(tenant=cast.tenant, url=receiver.url, event_types=["job.completed"])
    job = text_job_create(api_key=ApiKey.objects.get(tenant=cast.tenant), payload={
        "model": "sluice-code-tiny", "prompt": "x = 1", "max_tokens": 4}).job
    running = job_claim(job_id=job.pk, attempt=1)
    assert api.bearer(cast.owner_key).delete(f"/v1/jobs/{job.pk}").status_code == 200
    assert job_succeed(job=running, actual_mcu=10, usage={"completion_tokens": 3},
                       result={"text": "the private completion", "finish_reason": "stop"})
    completed = WebhookEvent.objects.get(job_id=job.pk)
    assert completed.payload["data"]["result"]["text"] == "the private completion"

    assert jobs_reap() == {"purged": 1}
    completed.refresh_from_db()
    assert "the private completion" not in json.dumps(completed.payload)
    assert completed.payload["data"]["usage"] == {"completion_tokens": 3}


def test_a_jobs_events_are_recorded_with_its_id_and_other_events_without(cast, receiver):
    webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    job_event = publish(cast.tenant, id="job_1", object="job", status="succeeded")
    case_event = publish(cast.tenant, "moderation.case_opened", case_id=7, action="blocked")
    assert (job_event.job_id, case_event.job_id) == ("job_1", None)
    assert WebhookEvent.objects.get(pk=job_event.pk).job_id == "job_1"


def test_the_secret_never_reaches_the_logs(cast, receiver, caplog):
    caplog.set_level(logging.DEBUG)
    endpoint = webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    first_secret = endpoint.secret
    receiver.script(Reply(500))
    delivery = only_delivery(publish(cast.tenant))
    drive(delivery)
    webhook_endpoint_secret_rotate(endpoint=endpoint)
    webhook_endpoint_update(endpoint=endpoint, url=receiver.url + "/v2")
    for secret in (first_secret, endpoint.secret):
        assert secret not in caplog.text
        assert secret.removeprefix("whsec_") not in caplog.text
    assert endpoint.secret not in str(endpoint) and endpoint.secret not in repr(endpoint)
    assert delivery.id in caplog.text  # the log does talk about the delivery


def test_a_budget_alert_is_published_once_per_period(cast, receiver, settings):
    settings.SLUICE_BUDGET_ALERT_PCT = 80
    tenant = tenant_with_limits(budget_cu=100)
    endpoint = webhook_endpoint_create(tenant=tenant, url=receiver.url,
                                       event_types=["budget.threshold_reached"])
    limits = quota_limits_for(tenant=tenant)
    for used_mcu in (79_000, 85_000, 90_000):  # below, passing, already passed
        budget_alert_check(tenant_id=tenant.pk, period="2030-01", limits=limits, used_mcu=used_mcu)

    (event,) = WebhookEvent.objects.filter(tenant=tenant)
    assert event.type == "budget.threshold_reached"
    assert event.payload["data"] == {"period": "2030-01", "threshold_pct": 80,
                                     "used_cu": 85.0, "limit_cu": 100.0}
    assert only_delivery(event).endpoint_id == endpoint.id


def test_receiver_urls_stay_out_of_the_logs(cast, receiver, caplog):
    caplog.set_level(logging.INFO)
    url = receiver.url + "?token=customer-secret"
    webhook_endpoint_create(tenant=cast.tenant, url=url)
    assert attempt_next(only_delivery(publish(cast.tenant))).status == Status.SUCCEEDED
    assert "customer-secret" not in caplog.text


def test_records_of_deliveries_that_are_over_are_purged_after_the_retention(cast, receiver, settings):
    from inference.webhooks import webhook_records_purge

    settings.SLUICE_WEBHOOK_RETENTION_DAYS = 30
    webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    receiver.script(Reply(200, b"ok"), Reply(500, b"down"))
    delivered = only_delivery(publish(cast.tenant))
    drive(delivered)
    retrying = only_delivery(publish(cast.tenant))
    attempt_next(retrying)  # failed, another attempt due: still live
    recent = only_delivery(publish(cast.tenant))
    drive(recent)
    long_ago = timezone.now() - timedelta(days=31)
    WebhookEvent.objects.filter(pk__in=[delivered.event_id, retrying.event_id]).update(created_at=long_ago)

    assert webhook_records_purge() == 1
    assert not WebhookEvent.objects.filter(pk=delivered.event_id).exists()
    assert not WebhookAttempt.objects.filter(delivery_id=delivered.pk).exists()
    assert WebhookDelivery.objects.filter(pk__in=[retrying.pk, recent.pk]).count() == 2
    assert any(entry["task"] == "inference.webhook_records_purge"
               for entry in settings.CELERY_BEAT_SCHEDULE.values())

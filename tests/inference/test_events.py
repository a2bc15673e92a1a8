"""Publishing a job's events (inference/events.py, inference/lua/publish.lua) on the real Redis."""

from __future__ import annotations

import pytest
import redis
from django.utils import timezone

from inference.events import (
    STREAM_TTL_S,
    event_publish,
    events_read,
    job_end_webhook_id,
    stream_key,
)
from inference.models import Job
from inference.services import job_claim, job_delete, job_succeed, jobs_reap, text_job_create
from inference.webhook_models import WebhookDelivery, WebhookEvent
from inference.webhooks import webhook_endpoint_create
from tests.factories import api_key_obj, tenant_with_limits, video_job_submit

pytestmark = pytest.mark.django_db


def test_an_attempts_event_published_again_is_appended_once_and_a_superseded_attempts_not(
        clean_redis):
    """A running attempt numbers its events. Sent again (its reply was lost after Redis appended
    it), an event keeps its seq and is not appended twice; the attempt's next event is. An event
    of an attempt the job was handed away from, after its successor published, is dropped.
    Events published outside a run carry no number: queued is always appended, the job's end
    once (published again, by the reaper say, it keeps the first end's seq)."""
    tenant_id = tenant_with_limits(budget_cu=10).pk

    def publish(event_type: str, data: dict, **numbered) -> int:
        return event_publish(job_id="job_e1", tenant_id=tenant_id, event_type=event_type,
                             data=data, **numbered)

    assert publish("job.queued", {"status": "queued"}) == 1
    assert publish("job.started", {"attempt": 1}, attempt=1, attempt_seq=1) == 2
    assert publish("job.output", {"delta": "def "}, attempt=1, attempt_seq=2) == 3
    assert publish("job.output", {"delta": "def "}, attempt=1, attempt_seq=2) == 3  # again
    assert publish("job.output", {"delta": "f():"}, attempt=1, attempt_seq=3) == 4
    assert publish("job.queued", {"reason": "worker_lost"}) == 5
    assert publish("job.started", {"attempt": 2}, attempt=2, attempt_seq=1) == 6
    assert publish("job.output", {"delta": " pass"}, attempt=1, attempt_seq=4) == 0  # superseded
    assert publish("job.output", {"delta": "def "}, attempt=2, attempt_seq=2) == 7
    assert publish("job.completed", {"status": "succeeded"}) == 8
    assert publish("job.completed", {"status": "succeeded"}) == 8  # (the reaper's, say)

    events = events_read(job_id="job_e1")
    assert [event.seq for event in events] == list(range(1, 9))
    assert [event.data.get("delta") for event in events if event.type == "job.output"] == [
        "def ", "f():", "def "]


def test_a_jobs_end_published_again_after_its_reply_was_lost_is_appended_and_recorded_once(
        clean_redis, receiver, redis_replies_lost):
    """Redis ran the end's script but its reply was lost (a timeout): its publisher got an
    error and the end goes out again (the reaper's, for the flag `_finish` leaves up). The
    stream holds it once, at its first seq; the publish that never saw the first reply records
    its webhook, one event and one delivery under the end's own webhook-id; another copy
    records nothing more."""
    tenant = tenant_with_limits(budget_cu=10)
    webhook_endpoint_create(tenant=tenant, url=receiver.url)

    def publish(event_type: str, data: dict) -> int:
        return event_publish(job_id="job_e2", tenant_id=tenant.pk, event_type=event_type, data=data)

    assert publish("job.queued", {"status": "queued"}) == 1
    lost = redis_replies_lost(1)
    with pytest.raises(redis.TimeoutError):
        publish("job.completed", {"status": "succeeded", "actual_cu": 1.0})
    assert lost[0][0] == 2  # Redis appended it as seq 2
    assert not WebhookEvent.objects.filter(tenant=tenant, type="job.completed").exists()

    assert publish("job.completed", {"status": "succeeded", "actual_cu": 1.0}) == 2
    assert publish("job.completed", {"status": "succeeded", "actual_cu": 1.0}) == 2

    assert [(event.seq, event.type) for event in events_read(job_id="job_e2")] == [
        (1, "job.queued"), (2, "job.completed")]
    (end,) = WebhookEvent.objects.filter(tenant=tenant, type="job.completed")
    assert end.id == job_end_webhook_id("job_e2") and end.payload["data"]["seq"] == 2
    assert WebhookDelivery.objects.filter(event=end).count() == 1


def test_an_end_published_again_after_its_stream_was_removed_does_not_bring_it_back(clean_redis):
    """Deleting a job removes its stream (it carries what the job produced). A late copy of the
    end (the reaper's, for a worker that died before clearing its flag) appends nothing: the
    stream stays gone, and the end's mark expires with the stream's other keys."""
    tenant_id = tenant_with_limits(budget_cu=10).pk

    def publish(event_type: str, data: dict, **numbered) -> int:
        return event_publish(job_id="job_e3", tenant_id=tenant_id, event_type=event_type,
                             data=data, **numbered)

    assert publish("job.started", {"attempt": 1}, attempt=1, attempt_seq=1) == 1
    assert publish("job.output", {"delta": "secret"}, attempt=1, attempt_seq=2) == 2
    assert publish("job.completed", {"status": "succeeded", "result": {"text": "secret"}}) == 3
    clean_redis.delete("ev:job_e3")  # what job_delete does

    assert publish("job.completed", {"status": "succeeded", "result": {"text": "secret"}}) == 3
    assert not clean_redis.exists("ev:job_e3")
    assert events_read(job_id="job_e3") == []
    assert clean_redis.ttl("ev:job_e3:last") == clean_redis.ttl("ev:job_e3:seq") > STREAM_TTL_S - 60


@pytest.mark.parametrize("worker", ["lost_the_reply", "died_after_publishing"])
def test_an_end_the_reaper_announces_again_is_in_the_stream_and_sent_to_webhooks_once(
        sent_tasks, receiver, redis_replies_lost, worker):
    """The worker's end reached Redis, but its flag stayed up: the script's reply was lost (a
    timeout: `_finish` takes it for refused), or the worker died before clearing it. The
    reaper publishes the end again: its stream keeps one end, and the receiver gets one
    job.completed (one event, one delivery), not two under two webhook-ids."""
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    webhook_endpoint_create(tenant=api_key.tenant, url=receiver.url)
    job = job_claim(job_id=video_job_submit(api_key, cu=4).job.pk, attempt=1)
    if worker == "lost_the_reply":
        lost = redis_replies_lost(1)
        assert job_succeed(job=job, actual_mcu=3000, result={"video": "v.mp4"}, usage={})
        assert len(lost) == 1
    else:
        assert job_succeed(job=job, actual_mcu=3000, result={"video": "v.mp4"}, usage={})
        Job.objects.filter(pk=job.pk).update(terminal_event_pending=True)  # never cleared
    assert Job.objects.get(pk=job.pk).terminal_event_pending is True
    Job.objects.filter(pk=job.pk).update(finished_at=timezone.now() - timezone.timedelta(seconds=11))

    assert jobs_reap() == {"announced": 1}
    assert jobs_reap() == {}
    ends = [event for event in events_read(job_id=job.pk) if event.type == "job.completed"]
    assert len(ends) == 1
    (webhook,) = WebhookEvent.objects.filter(tenant=api_key.tenant, type="job.completed")
    assert webhook.payload["data"]["seq"] == ends[0].seq
    assert WebhookDelivery.objects.filter(event=webhook).count() == 1
    assert Job.objects.get(pk=job.pk).terminal_event_pending is False


def test_a_deleted_jobs_end_announced_again_does_not_bring_back_its_stream(
        sent_tasks, receiver, clean_redis):
    """A job deleted while its end was still flagged (its worker published it and died before
    clearing the flag): the delete removed the stream, with the completion in it; the reaper's
    late copy of the end must not write it back, nor record a second webhook."""
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    webhook_endpoint_create(tenant=api_key.tenant, url=receiver.url)
    job = text_job_create(api_key=api_key, payload={"model": "sluice-code-tiny", "prompt": "x = 1",
                                                    "max_tokens": 4}).job
    assert job_succeed(job=job_claim(job_id=job.pk, attempt=1), actual_mcu=10,
                       result={"text": "the private completion", "finish_reason": "stop"},
                       usage={"completion_tokens": 3})
    Job.objects.filter(pk=job.pk).update(
        terminal_event_pending=True, finished_at=timezone.now() - timezone.timedelta(seconds=11))
    job_delete(job=Job.objects.get(pk=job.pk))
    assert not clean_redis.exists(stream_key(job.pk))

    assert jobs_reap() == {"announced": 1}
    assert not clean_redis.exists(stream_key(job.pk))
    assert WebhookEvent.objects.filter(tenant=api_key.tenant, type="job.completed").count() == 1

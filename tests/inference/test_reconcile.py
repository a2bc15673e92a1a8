"""The scheduler's reconciliation (inference/reconcile.py): queued jobs Redis lost, or that a
failed step left out of every queue, are queued again; admitted jobs no worker claimed are sent
again; nothing is done twice."""

from __future__ import annotations

from datetime import timedelta

import pytest
import redis
from django.utils import timezone

from inference.models import Job
from inference.reconcile import jobs_reconcile
from inference.scheduler import scheduler_queued
from inference.services import job_claim, job_succeed, pool_dispatch
from portal.redis import redis_client
from quotas.models import Reservation
from tests.factories import api_key_obj, tenant_with_limits, video_job_submit

pytestmark = pytest.mark.django_db

POOL = "video-hbm"


def later(seconds: float):
    return timezone.now() + timedelta(seconds=seconds)


def redis_loses_its_data():
    client = redis_client()
    doomed = [key for key in client.scan_iter(count=1000) if not key.startswith(b"_kombu.binding.")]
    client.delete(*doomed)


def queued_ids(jobs) -> set[str]:
    return scheduler_queued(pool=POOL, jobs=[(job.pk, job.priority) for job in jobs])


def test_jobs_redis_lost_are_queued_again_in_order_and_start_when_capacity_frees(settings, sent_tasks):
    settings.SLUICE_POOL_SLOTS = {POOL: 1}
    api_key = api_key_obj(tenant_with_limits(budget_cu=100, max_jobs=10))
    running = video_job_submit(api_key).job
    waiting = [video_job_submit(api_key).job for _ in range(2)]
    assert [job_id for job_id, *_ in sent_tasks] == [running.pk]
    redis_loses_its_data()
    assert queued_ids(waiting) == set()

    assert jobs_reconcile() == {}  # too young: job_submit may still be enqueuing them
    assert jobs_reconcile(now=later(31)) == {"enqueued": 2}
    assert queued_ids(waiting) == {job.pk for job in waiting}
    assert jobs_reconcile(now=later(31)) == {}  # idempotent
    assert pool_dispatch(pool=POOL) == 0  # the running job's slot came back with the counters

    job_succeed(job=job_claim(job_id=running.pk, attempt=1), actual_mcu=1000, result={}, usage={})
    assert [job_id for job_id, *_ in sent_tasks] == [running.pk, waiting[0].pk]


def test_a_job_committed_whose_enqueue_failed_is_queued_again(settings, sent_tasks, monkeypatch):
    from inference import services

    settings.SLUICE_POOL_SLOTS = {POOL: 1}
    api_key = api_key_obj(tenant_with_limits(budget_cu=100, max_jobs=10))
    running = video_job_submit(api_key).job

    def refused(**kwargs):
        raise redis.ConnectionError("Redis went away")

    with monkeypatch.context() as patched:
        patched.setattr(services, "scheduler_enqueue", refused)
        answered = video_job_submit(api_key).job  # committed: the client is given its job
    stranded = Job.objects.exclude(pk=running.pk).get()
    assert answered.pk == stranded.pk
    assert stranded.status == "queued" and queued_ids([stranded]) == set()

    assert jobs_reconcile(now=later(31)) == {"enqueued": 1}
    job_succeed(job=job_claim(job_id=running.pk, attempt=1), actual_mcu=1000, result={}, usage={})
    assert sent_tasks[-1] == (stranded.pk, 1, POOL)


def test_a_dispatched_job_whose_admission_was_not_recorded_is_admitted_then_sent(
        settings, sent_tasks, monkeypatch):
    """The process died between a dispatch round and its record of the admissions (a database
    error is the next round's to repair: test_scheduler.py): the reconciliation records it."""
    from inference import scheduler

    settings.SLUICE_POOL_SLOTS = {POOL: 1}
    api_key = api_key_obj(tenant_with_limits(budget_cu=100, max_jobs=10))
    running = video_job_submit(api_key).job
    waiting = video_job_submit(api_key).job

    def died(**kwargs):
        raise SystemExit("the worker process was killed")

    with monkeypatch.context() as patched, pytest.raises(SystemExit):
        patched.setattr(scheduler, "reservations_admitted", died)
        # The round took the job off the queue and onto the pool, then its process died.
        job_succeed(job=job_claim(job_id=running.pk, attempt=1), actual_mcu=1000, result={}, usage={})
    assert [job_id for job_id, *_ in sent_tasks] == [running.pk]
    assert Reservation.objects.get(pk=waiting.reservation_id).state == "queued"

    assert jobs_reconcile(now=later(31)) == {"admitted": 1}  # not queued again: it holds the slot
    assert queued_ids([waiting]) == set()
    assert Reservation.objects.get(pk=waiting.reservation_id).state == "admitted"
    assert jobs_reconcile(now=later(31)) == {}  # the round's own send may still come
    assert jobs_reconcile(now=later(100)) == {"resent": 1}
    assert sent_tasks[-1] == (waiting.pk, 1, POOL)


def test_an_admitted_job_no_worker_claimed_is_sent_again_once_per_interval_and_a_duplicate_is_harmless(
        sent_tasks):
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    job = video_job_submit(api_key).job
    assert sent_tasks == [(job.pk, 1, POOL)]  # ... and lost with the broker's data
    assert jobs_reconcile(now=later(31)) == {}
    assert jobs_reconcile(now=later(61)) == {"resent": 1}
    assert jobs_reconcile(now=later(62)) == {}  # not again before another interval
    assert sent_tasks == [(job.pk, 1, POOL)] * 2

    claimed = job_claim(job_id=job.pk, attempt=1)
    assert claimed is not None and job_claim(job_id=job.pk, attempt=1) is None
    redis_client().delete(f"s:resent:{job.pk}")
    assert jobs_reconcile(now=later(200)) == {}  # running: nothing to send


def test_a_cancelled_or_timed_out_job_is_left_alone(settings, sent_tasks):
    from inference.services import job_cancel

    settings.SLUICE_POOL_SLOTS = {POOL: 1}
    api_key = api_key_obj(tenant_with_limits(budget_cu=100, max_jobs=10))
    video_job_submit(api_key)
    cancelled, expired = video_job_submit(api_key).job, video_job_submit(api_key).job
    job_cancel(job=cancelled)
    Reservation.objects.filter(pk=expired.reservation_id).update(expires_at=later(-1))
    redis_loses_its_data()
    assert jobs_reconcile(now=later(31)) == {}
    assert queued_ids([cancelled, expired]) == set()


def test_the_reconciliation_runs_on_beat(settings):
    assert any(entry["task"] == "inference.scheduler_reconcile"
               for entry in settings.CELERY_BEAT_SCHEDULE.values())


def test_a_suspension_whose_cancel_redis_refused_stands_and_the_reconciliation_cancels_its_jobs(
        settings, sent_tasks, monkeypatch, django_capture_on_commit_callbacks):
    """The suspension's sweep runs after its commit: Redis refusing it failed the moderator's or
    admin's request (500) and left the rest of the jobs running for the suspended tenant. The
    sweep goes on past the refused job, and the reconciliation cancels what it left, refunded."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from inference import scheduler
    from inference.services import job_cancel_requested
    from portal.embedded_redis import free_port
    from portal.services import tenant_suspend
    from quotas.ledger import budget_used_from_ledger
    from quotas.limits import period_of
    from quotas.models import LedgerEntry

    settings.SLUICE_POOL_SLOTS = {POOL: 1}
    api_key = api_key_obj(tenant_with_limits(budget_cu=100, max_jobs=10))
    running = job_claim(job_id=video_job_submit(api_key, cu=2).job.pk, attempt=1)
    waiting = [video_job_submit(api_key, cu=3).job for _ in range(2)]
    other = video_job_submit(api_key_obj(tenant_with_limits(budget_cu=100)), cu=1).job

    # Nothing listens there: taking a queued job out of its queue, the first step of its
    # cancel, is refused (at once, not retried). The sweep reaches them before the running one.
    closed = redis.Redis(port=free_port(), retry=Retry(NoBackoff(), 0))
    with monkeypatch.context() as patched:
        patched.setattr(scheduler, "redis_client", lambda **kwargs: closed)
        with django_capture_on_commit_callbacks(execute=True):
            assert tenant_suspend(tenant=api_key.tenant) is True  # nothing raised after the commit
    api_key.tenant.refresh_from_db()
    assert api_key.tenant.is_suspended
    assert [Job.objects.get(pk=job.pk).status for job in waiting] == ["queued", "queued"]
    assert job_cancel_requested(job_id=running.pk)  # the sweep went on past the refused ones

    assert jobs_reconcile() == {"cancelled": 3}
    for job in waiting:
        job.refresh_from_db()
        assert (job.status, job.actual_mcu) == ("cancelled", 0)
        assert sorted(LedgerEntry.objects.filter(reservation_id=job.reservation_id)
                      .values_list("kind", "mcu")) == [("refund", 3000), ("reserve", 3000), ("settle", 0)]
    assert queued_ids(waiting) == set()
    assert job_cancel_requested(job_id=running.pk)  # it stops at its next step, billed for it
    assert not job_cancel_requested(job_id=other.pk)
    assert Job.objects.get(pk=other.pk).status == "queued"
    period = period_of(timezone.now())
    assert budget_used_from_ledger(tenant_id=api_key.tenant_id, period=period)[0] == 2000
    assert jobs_reconcile() == {"cancelled": 1}  # told again until it has stopped


REDIS_NOBODY_LISTENS = "redis://127.0.0.1:1/0"


def cancel_while_redis_refuses(settings, job) -> None:
    """A cancel (the dashboard's, the API's) while Redis does not answer: its request is
    recorded in the row, and its next step - taking a queued job out of the scheduler's queue,
    raising a running job's flag - is refused."""
    from inference.services import job_cancel

    healthy_url, settings.REDIS_URL = settings.REDIS_URL, REDIS_NOBODY_LISTENS
    try:
        with pytest.raises(redis.RedisError):
            job_cancel(job=job)
    finally:
        settings.REDIS_URL = healthy_url
    assert Job.objects.get(pk=job.pk).cancel_requested_at is not None


def test_queued_and_admitted_jobs_whose_cancel_redis_refused_are_cancelled_and_refunded_once_it_answers(
        settings, sent_tasks):
    """The reconciliation skipped a queued job with a cancel request unless its tenant was
    suspended: the cancel was never finished (a dispatch round could still start the job, an
    admitted one held its pool slot) unless its user clicked again. It is finished once, as the
    cancel itself would have: out of the queue, refunded in full, its slot given on."""
    from inference.services import job_cancel_requested
    from quotas.ledger import budget_used_from_ledger
    from quotas.limits import CounterKeys, period_of
    from quotas.models import LedgerEntry

    settings.SLUICE_POOL_SLOTS = {POOL: 1}
    api_key = api_key_obj(tenant_with_limits(budget_cu=100, max_jobs=10))
    admitted = video_job_submit(api_key, cu=2).job  # sent to its pool, no worker took it yet
    waiting = video_job_submit(api_key, cu=3).job  # in the scheduler's queue
    assert [job_id for job_id, *_ in sent_tasks] == [admitted.pk]
    for job in (admitted, waiting):
        cancel_while_redis_refuses(settings, job)
    assert [Job.objects.get(pk=job.pk).status for job in (admitted, waiting)] == ["queued", "queued"]
    assert queued_ids([waiting]) == {waiting.pk}

    assert jobs_reconcile() == {}  # just requested: its own request may be finishing it
    assert jobs_reconcile(now=later(11)) == {"cancels_finished": 2}
    for job, reserved_mcu in ((admitted, 2000), (waiting, 3000)):
        job.refresh_from_db()
        assert (job.status, job.actual_mcu, job.started_at) == ("cancelled", 0, None)
        assert sorted(LedgerEntry.objects.filter(reservation_id=job.reservation_id)
                      .values_list("kind", "mcu")) == [("refund", reserved_mcu),
                                                       ("reserve", reserved_mcu), ("settle", 0)]
        assert not job_cancel_requested(job_id=job.pk)
    assert queued_ids([waiting]) == set()
    assert jobs_reconcile(now=later(11)) == {}  # once
    period = period_of(timezone.now())
    budget = CounterKeys(tenant_id=api_key.tenant_id, api_key_id=0, period=period, pool="").budget
    assert int(redis_client().get(budget)) == budget_used_from_ledger(
        tenant_id=api_key.tenant_id, period=period)[0] == 0
    # The admitted job's late message runs nothing; its slot went to the next job.
    assert job_claim(job_id=admitted.pk, attempt=1) is None
    following = video_job_submit(api_key).job
    assert sent_tasks[-1] == (following.pk, 1, POOL)


def test_a_running_job_whose_cancel_flag_redis_refused_gets_it_once_redis_answers(settings, sent_tasks):
    """The cancel of a running job is its flag in Redis, which its worker reads: refused, the
    job ran to its end for a user who had cancelled it. The reconciliation raises it again,
    once: while it is up, stopping is the worker's, billed for what it ran."""
    from inference.services import job_cancel_requested, job_cancelled

    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    running = job_claim(job_id=video_job_submit(api_key, cu=2).job.pk, attempt=1)
    cancel_while_redis_refuses(settings, running)
    assert not job_cancel_requested(job_id=running.pk)

    assert jobs_reconcile() == {}
    assert jobs_reconcile(now=later(11)) == {"cancel_flags_raised": 1}
    assert job_cancel_requested(job_id=running.pk)  # what its worker reads every 50 ms
    assert Job.objects.get(pk=running.pk).status == "running"
    assert jobs_reconcile(now=later(11)) == {}  # up: the worker's to read
    redis_client().delete(f"s:cancel:{running.pk}")  # lost again (Redis restarted empty)
    assert jobs_reconcile(now=later(11)) == {"cancel_flags_raised": 1}

    assert job_cancelled(job=running, actual_mcu=700, usage={}, result={}) is True
    running.refresh_from_db()
    assert (running.status, running.actual_mcu) == ("cancelled", 700)
    assert jobs_reconcile(now=later(11)) == {}

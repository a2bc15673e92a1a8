"""The scheduler's dispatch round with the job services around it: what a round that cannot
send one of its jobs leaves behind (real Redis and database; only Celery's send is replaced,
by one that refuses a job as a broker would)."""

from __future__ import annotations

import pytest
from django.utils import timezone
from kombu.exceptions import OperationalError

from inference.models import Job
from inference.scheduler import scheduler_queued
from inference.services import job_claim, job_succeed, pool_dispatch
from portal.redis import redis_client
from quotas.ledger import budget_used_from_ledger
from quotas.limits import CounterKeys, period_of
from quotas.models import LedgerEntry, Reservation
from tests.factories import api_key_obj, tenant_with_limits, video_job_submit

pytestmark = pytest.mark.django_db

POOL = "video-hbm"


@pytest.fixture
def broker(monkeypatch):
    """Celery's send of run_job: records (job id, attempt, queue); refuses the jobs in
    `refusing` (each once) as a broker that is down does."""
    from inference import tasks

    class Broker:
        def __init__(self) -> None:
            self.sent: list[tuple[str, int, str]] = []
            self.refusing: set[str] = set()

        def apply_async(self, args, queue, **options):
            if args[0] in self.refusing:
                self.refusing.discard(args[0])
                raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
            self.sent.append((args[0], args[1], queue))

    fake = Broker()
    monkeypatch.setattr(tasks.run_job, "apply_async", fake.apply_async)
    return fake


def pool_in_flight_mcu() -> tuple[int, int]:
    """(reservations holding the pool, their mCU)."""
    keys = CounterKeys(tenant_id=0, api_key_id=0, period="", pool=POOL)
    client = redis_client()
    return client.zcard(keys.pool_zset), int(client.get(keys.pool_sum) or 0)


def test_a_send_that_fails_does_not_cost_the_rest_of_the_round_and_goes_out_next_round(
        settings, broker):
    """The broker refuses the first job of a round: the others are sent all the same (they were
    left out of the queue, holding pool capacity, until the reconciliation a minute later); the
    refused one keeps its slot and admission and the next round sends it; it runs once and is
    charged once."""
    settings.SLUICE_POOL_SLOTS = {POOL: 1}
    api_key = api_key_obj(tenant_with_limits(budget_cu=1000, max_jobs=10))
    running = video_job_submit(api_key, cu=1).job  # holds the only slot
    waiting = [video_job_submit(api_key, cu=cu).job for cu in (2, 3, 4)]
    assert [job_id for job_id, *_ in broker.sent] == [running.pk]

    settings.SLUICE_POOL_SLOTS = {POOL: 4}  # room for all three in one round
    first = waiting[0]  # the round takes them in submission order (one tenant, one priority)
    broker.refusing = {first.pk}
    assert pool_dispatch(pool=POOL) == 2
    assert broker.sent[1:] == [(job.pk, 1, POOL) for job in waiting[1:]]
    # The refused one is out of the queue, with its slot and its admission (DB and Redis).
    assert not scheduler_queued(pool=POOL, jobs=[(job.pk, job.priority) for job in waiting])
    assert pool_in_flight_mcu() == (4, 10_000)
    assert {job.reservation.state for job in Job.objects.filter(pk__in=[j.pk for j in waiting])
            .select_related("reservation")} == {Reservation.State.ADMITTED}
    assert Job.objects.get(pk=first.pk).status == Job.Status.QUEUED

    # The next round (a job's end, a submission, the tick) sends it, taking no second slot.
    assert pool_dispatch(pool=POOL) == 1
    assert broker.sent[-1] == (first.pk, 1, POOL)
    assert pool_in_flight_mcu() == (4, 10_000)
    assert pool_dispatch(pool=POOL) == 0  # and only once

    claimed = job_claim(job_id=first.pk, attempt=1)
    assert claimed.status == Job.Status.RUNNING
    assert job_claim(job_id=first.pk, attempt=1) is None  # another copy of its message runs nothing
    assert job_succeed(job=claimed, actual_mcu=2000, result={}, usage={}) is True
    assert pool_in_flight_mcu() == (3, 8_000)
    assert LedgerEntry.objects.filter(reservation_id=first.reservation_id, kind="reserve").count() == 1
    assert LedgerEntry.objects.filter(reservation_id=first.reservation_id, kind="settle").count() == 1
    used = budget_used_from_ledger(tenant_id=api_key.tenant_id, period=period_of(timezone.now()))[0]
    assert used == 1000 + 2000 + 3000 + 4000


def test_a_job_refused_again_is_kept_for_the_round_after(settings, broker):
    settings.SLUICE_POOL_SLOTS = {POOL: 1}
    api_key = api_key_obj(tenant_with_limits(budget_cu=1000, max_jobs=10))
    video_job_submit(api_key)
    job = video_job_submit(api_key).job  # waits for the slot
    settings.SLUICE_POOL_SLOTS = {POOL: 2}
    broker.refusing = {job.pk}
    assert pool_dispatch(pool=POOL) == 0
    broker.refusing = {job.pk}
    assert pool_dispatch(pool=POOL) == 0  # refused again: kept again
    assert pool_dispatch(pool=POOL) == 1
    assert broker.sent[-1] == (job.pk, 1, POOL) and pool_in_flight_mcu() == (2, 2000)


@pytest.mark.django_db(transaction=True)  # the round's database connection is ended under it
def test_a_round_whose_admissions_the_database_refused_sends_them_next_round(settings, broker):
    """The database went away as a round recorded the admissions it made (its backend ended):
    the error reached the caller, whose own work had committed (here a job's end: its worker's
    task retried; a cancel was answered 500), and the round's job held its pool slot unsent
    until the reconciliation recorded it and sent it again, a minute and more later. The round
    now keeps it, unsent and unrecorded, and the next round records it and sends it; nothing
    is left for the reconciliation, and it runs and is charged once."""
    from django.db import connection

    from inference.reconcile import jobs_reconcile
    from tests.inference.test_job_settlement import backend_terminate
    from tests.inference.test_reconcile import later

    settings.SLUICE_POOL_SLOTS = {POOL: 1}
    api_key = api_key_obj(tenant_with_limits(budget_cu=100, max_jobs=10))
    running = video_job_submit(api_key).job
    waiting = video_job_submit(api_key, cu=2).job
    claimed = job_claim(job_id=running.pk, attempt=1)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()

    def database_lost_at_the_admissions(execute, sql, params, many, context):
        if sql.startswith('UPDATE "quotas_reservation" SET "state" = %s, "expires_at"'):
            backend_terminate(pid)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(database_lost_at_the_admissions):
        assert job_succeed(job=claimed, actual_mcu=1000, result={}, usage={}) is True
    connection.close()  # the next query opens a new one, as Django does per request or task
    assert Job.objects.get(pk=running.pk).status == "succeeded"
    assert Reservation.objects.get(pk=waiting.reservation_id).state == "queued"
    assert broker.sent == [(running.pk, 1, POOL)]  # not sent unrecorded
    assert pool_in_flight_mcu() == (1, 2000)  # its slot, kept for it

    assert pool_dispatch(pool=POOL) == 1  # the next round: the 2 s tick, an end, a submission
    assert broker.sent[-1] == (waiting.pk, 1, POOL)
    assert Reservation.objects.get(pk=waiting.reservation_id).state == "admitted"
    assert jobs_reconcile(now=later(31)) == {}
    assert job_succeed(job=job_claim(job_id=waiting.pk, attempt=1), actual_mcu=1500, result={},
                       usage={})
    assert pool_dispatch(pool=POOL) == 0 and len(broker.sent) == 2
    used = budget_used_from_ledger(tenant_id=api_key.tenant_id, period=period_of(timezone.now()))[0]
    keys = CounterKeys(tenant_id=api_key.tenant_id, api_key_id=0, period=period_of(timezone.now()),
                       pool=POOL)
    assert used == 2500 == int(redis_client().get(keys.budget))


# --- queue ETAs ---------------------------------------------------------------------------------


def job_run_for(job: Job, *, seconds: float) -> None:
    """The worker claims `job`, runs it for `seconds` (and the few ms the test takes: ETAs are
    compared within 2 %) and it succeeds: the pool's pace for ETAs is learnt from such ends."""
    from datetime import timedelta

    claimed = job_claim(job_id=job.pk, attempt=1)
    claimed.started_at -= timedelta(seconds=seconds)
    Job.objects.filter(pk=claimed.pk).update(started_at=claimed.started_at)
    assert job_succeed(job=claimed, actual_mcu=claimed.estimated_mcu, result={}, usage={})


def eta_s(job: Job) -> float:
    from inference.apis import job_queue_info

    return job_queue_info(job)["eta_seconds"]


def test_a_small_job_queued_behind_a_big_running_one_waits_for_what_the_big_one_has_left(
        settings, sent_tasks):
    """Found live: a queued 64x64 video said `eta_seconds: 9.2` (the pool's average run time,
    small jobs mostly) behind a running 720x1280 video whose own progress said 279 s left."""
    from inference.services import job_progress

    settings.SLUICE_POOL_SLOTS = {POOL: 1}
    api_key = api_key_obj(tenant_with_limits(budget_cu=1000, max_jobs=10))
    job_run_for(video_job_submit(api_key, cu=1).job, seconds=10)  # the pool's pace: 1 CU / 10 s
    big = job_claim(job_id=video_job_submit(api_key, cu=60).job.pk, attempt=1)
    assert big.status == Job.Status.RUNNING
    job_progress(job=big, progress=50.0, data={})  # 30 CU left: 300 s at the pool's pace
    small = video_job_submit(api_key, cu=0.1).job
    assert small.status == Job.Status.QUEUED

    assert eta_s(small) >= 300
    assert eta_s(small) == pytest.approx(300 + 1, rel=0.02)  # and its own run: 0.1 CU


def test_the_eta_counts_the_size_of_the_jobs_queued_ahead_higher_priorities_included(
        settings, sent_tasks):
    from inference.apis import job_queue_info
    from inference.services import job_cancel

    settings.SLUICE_POOL_SLOTS = {POOL: 1}
    api_key = api_key_obj(tenant_with_limits(budget_cu=1000, max_jobs=10))
    job_run_for(video_job_submit(api_key, cu=1).job, seconds=10)  # the pool's pace: 1 CU / 10 s
    job_claim(job_id=video_job_submit(api_key, cu=1).job.pk, attempt=1)  # runs: 10 s left

    small_ahead = [video_job_submit(api_key, cu=1).job for _ in range(2)]
    behind_small = video_job_submit(api_key, cu=1).job
    assert job_queue_info(behind_small)["position"] == 2
    behind_small_eta_s = eta_s(behind_small)
    assert behind_small_eta_s == pytest.approx(10 + 2 * 10 + 10, rel=0.02)
    for job in [*small_ahead, behind_small]:
        job_cancel(job=job)

    big_ahead = [video_job_submit(api_key, cu=cu).job for cu in (20, 1)]
    behind_big = video_job_submit(api_key, cu=1).job
    assert [job_queue_info(job)["position"] for job in big_ahead] == [0, 1]
    assert job_queue_info(behind_big)["position"] == 2
    assert eta_s(behind_big) > behind_small_eta_s  # as many jobs ahead, more work
    assert eta_s(behind_big) == pytest.approx(10 + 21 * 10 + 10, rel=0.02)

    # An enterprise job submitted later goes ahead of all three: its size counts too.
    enterprise_key = api_key_obj(tenant_with_limits(tier_slug="enterprise", budget_cu=1000))
    video_job_submit(enterprise_key, cu=5)
    assert job_queue_info(behind_big)["position"] == 3
    assert eta_s(behind_big) == pytest.approx(10 + 26 * 10 + 10, rel=0.02)

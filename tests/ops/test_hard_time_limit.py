"""A GPU pool's worker whose engine hangs past the pool's limit: its process is killed and
replaced (Celery's hard time limit, prefork), and the job is ended as overdue, refunded and
announced once."""

from __future__ import annotations

import pytest

from inference.events import TERMINAL_EVENTS
from inference.models import Job
from inference.registry import text_variants
from inference.services import jobs_reap, text_job_create
from portal.launcher import job_hard_time_limit_s, worker_pool_args
from portal.redis import redis_client
from quotas.limits import CounterKeys
from quotas.models import LedgerEntry
from tests.factories import api_key_obj, tenant_with_limits
from tests.inference.test_worker import event_types, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

POOL = "text-batch"


def test_a_job_whose_engine_hangs_past_the_limit_is_killed_ended_once_and_frees_its_worker(
        start_worker, settings, hung_engine):
    """The engine never sees the stop (it is blocked in a read with no data coming): before,
    the job's process waited for ever - SLUICE_VLLM_READ_TIMEOUT_S is long - and the pool's
    worker (prefork, one job at a time) took no other job. Now the reaper fails the job as
    overdue and the process is killed at the hard limit, and the next job runs on a fresh one."""
    settings.SLUICE_WORKER_POOLS = {POOL: "prefork"}  # as a GPU pool runs its jobs
    settings.SLUICE_JOB_MAX_RUN_S = {POOL: 1}
    settings.SLUICE_JOB_HEARTBEAT_TTL_S = 2  # as the workers' (tests/conftest.py)
    hard_limit_s = job_hard_time_limit_s(POOL)
    assert hard_limit_s == 1 + 4 * 2
    assert worker_pool_args(POOL)[-2:] == ["--time-limit", str(hard_limit_s)]
    worker = start_worker(POOL, SLUICE_JOB_MAX_RUN_S=f"{POOL}=1", SLUICE_VLLM_READ_TIMEOUT_S="600",
                          SLUICE_VLLM_URLS=",".join(f"{variant.served_name}={hung_engine}"
                                                    for _spec, variant in text_variants()))

    api_key = api_key_obj(tenant_with_limits(budget_cu=100, max_jobs=10))

    def submit() -> Job:
        return text_job_create(api_key=api_key,
                               payload={"model": "sluice-code-tiny", "prompt": "x = 1",
                                        "max_tokens": 4}).job

    hung = submit()
    wait_for(lambda: Job.objects.get(pk=hung.pk).status == "running", 120, worker, "the first job")
    after = submit()  # waits: the worker runs one job at a time

    def overdue_failed() -> bool:
        jobs_reap()  # what beat runs every 5 s
        return Job.objects.get(pk=hung.pk).status == "failed"

    wait_for(overdue_failed, 30, worker, "the reaper to fail the overdue job")
    wait_for(lambda: Job.objects.get(pk=after.pk).status == "running", hard_limit_s + 60, worker,
             "the next job on a fresh process")
    assert "Hard time limit" in worker.output()

    job = Job.objects.get(pk=hung.pk)
    assert (job.error_code, job.actual_mcu, job.terminal_event_pending) == ("job_timeout", 0, False)
    assert [kind for kind in event_types(hung.pk) if kind in TERMINAL_EVENTS] == ["job.failed"]
    entries = {entry.kind: entry.mcu for entry in LedgerEntry.objects.filter(reservation__job=job)}
    assert entries == {"reserve": job.estimated_mcu, "settle": 0, "refund": job.estimated_mcu}
    # Its pool slot was given back: only the next job holds the pool.
    pool_zset = CounterKeys(tenant_id=0, api_key_id=0, period="", pool=POOL).pool_zset
    assert [member.decode() for member in redis_client().zrange(pool_zset, 0, -1)] == [
        after.reservation_id]

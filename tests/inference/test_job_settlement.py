"""A job's end and its settlement against the real database and Redis: Redis follows what the
ledger committed, never what a transaction that then failed wrote."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import Error, connection
from django.utils import timezone

from inference.models import Job
from inference.services import job_claim, job_succeed
from portal.redis import redis_client
from quotas.ledger import budget_used_from_ledger, reservations_expire
from quotas.limits import CounterKeys, period_of
from quotas.models import Reservation
from tests.factories import api_key_obj, tenant_with_limits, video_job_submit


def counters(api_key) -> tuple[int, int]:
    """(the tenant's budget counter, the key's counter) in Redis."""
    keys = CounterKeys(tenant_id=api_key.tenant_id, api_key_id=api_key.pk,
                       period=period_of(timezone.now()), pool="video-hbm")
    return int(redis_client().get(keys.budget)), int(redis_client().get(keys.key_used))


def ledger_used(tenant_id: int) -> int:
    return budget_used_from_ledger(tenant_id=tenant_id, period=period_of(timezone.now()))[0]


def backend_terminate(pid: int) -> None:
    """End the database backend `pid` from another connection, and wait until it is gone."""
    def terminate() -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
                for _ in range(250):
                    cursor.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid])
                    if cursor.fetchone() is None:
                        return
                    time.sleep(0.02)
        finally:
            connection.close()

    terminating = threading.Thread(target=terminate)
    terminating.start()
    terminating.join(timeout=10)


@pytest.mark.django_db(transaction=True)
def test_a_jobs_end_whose_commit_fails_leaves_redis_as_the_ledger_is(sent_tasks):
    """The job's end and its settlement commit together. The settlement used to be mirrored
    into Redis inside that transaction: when the commit then failed (the database went away),
    Redis had refunded the unused part and freed the slot of a reservation the ledger still
    held, and the job's later end (here its lease running out: a full refund) refunded nothing
    there, so Redis charged the tenant what the failed end would have, for the rest of the
    period."""
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    job = job_claim(job_id=video_job_submit(api_key, cu=3).job.pk, attempt=1)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()

    def database_lost_after_the_settlements_rows(execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        if sql.startswith('INSERT INTO "quotas_ledgerentry"'):
            backend_terminate(pid)  # the transaction's commit fails
        return result

    with pytest.raises(Error), connection.execute_wrapper(database_lost_after_the_settlements_rows):
        job_succeed(job=job, actual_mcu=1000, result={"video": "x"}, usage={})
    connection.close()

    assert Job.objects.get(pk=job.pk).status == "running"
    assert Reservation.objects.get(pk=job.reservation_id).state == "admitted"
    assert counters(api_key) == (ledger_used(api_key.tenant_id),) * 2 == (3000, 3000)

    # Its worker gone for good, the lease runs out: refunded in full, in both.
    assert reservations_expire(now=timezone.now() + timezone.timedelta(hours=2)) == 1
    assert counters(api_key) == (ledger_used(api_key.tenant_id),) * 2 == (0, 0)

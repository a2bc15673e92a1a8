"""Sluice's scheduler: queued jobs wait here (Redis), not in Celery, and are handed to a
pool's Celery queue only when the pool has capacity (quotas' semaphore says so).

Order: tier priority first; within a priority, weighted fair queuing on CU across tenants
(inference/lua/enqueue.lua). A dispatch round is one script (inference/lua/dispatch.lua)
that takes jobs off the queue and onto the pool's semaphore together, so two dispatchers
never start the same job, and needs no database read to decide.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis
from django.conf import settings
from django.db import Error as DatabaseFailure  # DatabaseError, or InterfaceError (closed)

from inference.models import Job
from portal.redis import lua_script, redis_client
from quotas.ledger import reservations_admitted
from quotas.limits import (
    IN_FLIGHT_PREFIX,
    RESERVATION_MARKER_PREFIX,
    CounterKeys,
    pool_capacity_mcu,
    pool_lease_s,
    pool_slots,
    reservation_marker,
)

logger = logging.getLogger(__name__)

CANDIDATES_PER_ROUND = 50
# The pool's pace: averages of its jobs' run time and estimated cost (inference/lua/run_time.lua).
PACE_KEY = "s:pace:{pool}"
# Queued jobs ahead whose cost an ETA reads; those beyond count at their mean.
ETA_COSTS_READ = 1000


def _queue_key(pool: str, priority: int) -> str:
    return f"s:q:{pool}:{priority}"


def _priorities_key(pool: str) -> str:
    return f"s:prios:{pool}"


def _jobs_key(pool: str) -> str:
    return f"s:jobs:{pool}"


def _unsent_key(pool: str) -> str:
    """Jobs a round took onto the pool whose send failed (job id -> reservation id)."""
    return f"s:unsent:{pool}"


def scheduler_enqueue(*, job_id: str, pool: str, priority: int, tenant_id: int, cost_mcu: int,
                      reservation_id: str, job_cap: int, weight: float = 1.0) -> float | None:
    """Queue a job whose reservation waits for the pool. `job_cap`: its tenant's concurrent-job
    cap as admission saw it (the dispatch round applies it without reading the tenant).
    Idempotent: a job already queued keeps its place. Returns its finish tag, or None when a
    dispatch round has already taken its reservation onto the pool (it is being started)."""
    tag = lua_script(redis_client(), "enqueue", package="inference")(
        keys=[_queue_key(pool, priority), f"s:tf:{pool}:{tenant_id}", f"s:vt:{pool}",
              _priorities_key(pool), _jobs_key(pool), reservation_marker(reservation_id)],
        args=[job_id, max(cost_mcu, 1), weight, priority, f"{reservation_id} {tenant_id} {job_cap}"],
    )
    return None if tag is None else float(tag)


def scheduler_remove(*, job_id: str, pool: str, priority: int) -> bool:
    """Take a queued job out (cancelled). False when it was not there: a dispatch round took
    it first."""
    pipe = redis_client().pipeline()
    pipe.zrem(_queue_key(pool, priority), job_id)
    pipe.hdel(_jobs_key(pool), job_id)
    removed, _ = pipe.execute()
    return bool(removed)


def scheduler_queued(*, pool: str, jobs: list[tuple[str, int]]) -> set[str]:
    """Which of these (job id, priority) are waiting in the pool's queue, in one round trip: in
    its priority's queue and in the job hash the dispatch round reads (without that entry a
    queued id is never started)."""
    pipe = redis_client().pipeline(transaction=False)
    for job_id, priority in jobs:
        pipe.zscore(_queue_key(pool, priority), job_id)
        pipe.hexists(_jobs_key(pool), job_id)
    answers = pipe.execute()
    return {job_id for (job_id, _), tag, entry in zip(jobs, answers[::2], answers[1::2], strict=True)
            if tag is not None and entry}


def _priorities(pool: str) -> list[int]:
    return sorted((int(p) for p in redis_client().smembers(_priorities_key(pool))), reverse=True)


def scheduler_dispatch(*, pool: str, start_job) -> int:
    """Hand queued jobs to the pool while it has room. `start_job(job_id)` sends one to Celery
    (the job service owns that). Returns how many were sent.

    A send that fails (the broker refused it, a connection error) costs neither the rest of the
    round, which are sent all the same, nor its own job: the job keeps the pool slot and the
    admission the round gave it, and the pool's next round (a job's end, a submission, the
    2 s tick) sends it again, before any queued job. Sent twice, it still runs once: the
    worker's claim takes a job for one attempt, once. A round whose admissions the database
    refused to record keeps all its jobs so, unsent, and raises nothing."""
    pool_keys = CounterKeys(tenant_id=0, api_key_id=0, period="", pool=pool)
    started = lua_script(redis_client(), "dispatch", package="inference")(
        keys=[_priorities_key(pool), _jobs_key(pool), f"s:vt:{pool}", pool_keys.pool_hash,
              pool_keys.pool_zset, pool_keys.pool_sum, _unsent_key(pool)],
        args=[_queue_key(pool, ""), IN_FLIGHT_PREFIX, RESERVATION_MARKER_PREFIX,
              pool_capacity_mcu(pool), pool_lease_s(pool) * 1000, pool_slots(pool),
              CANDIDATES_PER_ROUND],
    )
    if not started:
        return 0
    reservation_by_job = {job_id.decode(): reservation_id.decode()
                          for job_id, reservation_id in zip(started[::2], started[1::2], strict=True)}
    # Those sent again were recorded before; only a still-queued reservation is updated.
    try:
        reservations_admitted(reservation_ids=list(reservation_by_job.values()), pool=pool)
    except DatabaseFailure:
        # None is sent unrecorded: its reservation would keep a queued one's day-long lease
        # (a lost worker's slot held that long) and a rebuild would count it queued, not on
        # the pool. The round's jobs keep their slots, as unsent ones do, and the pool's next
        # round (a job's end, a submission, the 2 s tick) records and sends them first; not
        # raised to the caller, whose own work (a job's end, a submission) has committed.
        logger.warning("the database did not record the admission of jobs %s to pool %s; the "
                       "next dispatch round records and sends them", sorted(reservation_by_job),
                       pool, exc_info=True)
        _unsent_keep(pool=pool, unsent=reservation_by_job)
        return 0
    unsent: dict[str, str] = {}
    for job_id, reservation_id in reservation_by_job.items():
        try:
            start_job(job_id)
        except Exception:  # whatever the broker's client raised: this job's send alone failed
            logger.warning("job %s could not be sent to pool %s; the next dispatch round sends "
                           "it again", job_id, pool, exc_info=True)
            unsent[job_id] = reservation_id
    if unsent:
        _unsent_keep(pool=pool, unsent=unsent)
    return len(reservation_by_job) - len(unsent)


def _unsent_keep(*, pool: str, unsent: dict[str, str]) -> None:
    try:
        redis_client().hset(_unsent_key(pool), mapping=unsent)
    except redis.RedisError:
        # The reconciliation records the admissions the database missed, and sends the jobs
        # again (SLUICE_JOB_RESEND_AFTER_S after their admission).
        logger.warning("jobs %s could not be kept for the next dispatch round of pool %s",
                       sorted(unsent), pool, exc_info=True)


@dataclass(frozen=True)
class QueuePosition:
    position: int  # jobs ahead of this one
    eta_s: float | None  # until it has run (None while the pool has no pace recorded yet)


def scheduler_position(*, job_id: str, pool: str, priority: int) -> QueuePosition | None:
    """Where a queued job stands and when it should be done, priced by size: the work still
    ahead of it (what the pool's running jobs have left, by their reservations less their
    progress, and the estimated mCU of the jobs queued ahead, higher priorities included),
    shared by the jobs the pool runs at once, then its own run, all at the pool's pace
    (scheduler_record_run_time). One script and, while jobs run, one indexed query (their
    progress). None: not queued (a dispatch round took it; it is about to start)."""
    pool_keys = CounterKeys(tenant_id=0, api_key_id=0, period="", pool=pool)
    stand = lua_script(redis_client(), "queue_position", package="inference")(
        keys=[_priorities_key(pool), _jobs_key(pool), pool_keys.pool_hash, pool_keys.pool_zset,
              PACE_KEY.format(pool=pool)],
        args=[_queue_key(pool, ""), RESERVATION_MARKER_PREFIX, job_id, priority,
              ETA_COSTS_READ],
    )
    if not stand:
        return None
    ahead, ahead_mcu, own_mcu, pace_seconds, pace_mcu, *running = stand
    if not pace_seconds or float(pace_seconds) <= 0 or float(pace_mcu) <= 0:
        return QueuePosition(position=ahead, eta_s=None)
    mcu_per_s = float(pace_mcu) / float(pace_seconds)
    running_mcu = {reservation_id.decode(): int(mcu)
                   for reservation_id, mcu in zip(running[::2], running[1::2], strict=True)}
    # While its queue is not empty the pool runs as many jobs at once as it holds (its slots,
    # or fewer when its CU capacity is the limit): they share the work ahead.
    at_once = max(1, min(len(running_mcu), pool_slots(pool)))
    work_ahead_mcu = _running_left_mcu(running_mcu) + ahead_mcu
    eta = work_ahead_mcu / (mcu_per_s * at_once) + own_mcu / mcu_per_s
    return QueuePosition(position=ahead, eta_s=round(eta, 1))


def _running_left_mcu(running_mcu: dict[str, int]) -> float:
    """What the pool's running reservations have left: each one's mCU less its job's progress
    (the row's, written about once a second; a job not started yet has all of it left)."""
    if not running_mcu:
        return 0.0
    progress = dict(Job.objects.filter(reservation_id__in=running_mcu, status=Job.Status.RUNNING)
                    .values_list("reservation_id", "progress"))
    return sum(mcu * (1 - min(progress.get(reservation_id, 0.0), 100.0) / 100)
               for reservation_id, mcu in running_mcu.items())


def scheduler_record_run_time(*, pool: str, seconds: float, estimated_mcu: int) -> float | None:
    """A job that ran to completion in `seconds`: the pool's pace for ETAs moves towards it.
    Returns the new throughput (estimated mCU per second per job slot); None for a run that
    says nothing of it (no cost, or no time)."""
    if estimated_mcu <= 0 or seconds <= 0:
        return None
    rate = lua_script(redis_client(), "run_time", package="inference")(
        keys=[PACE_KEY.format(pool=pool)], args=[seconds, estimated_mcu, 7 * 86400])
    return float(rate)


def scheduler_depths(*, pool: str) -> dict[int, int]:
    """Queued jobs per priority (operators' view and metrics)."""
    client = redis_client()
    return {p: client.zcard(_queue_key(pool, p)) for p in _priorities(pool)}


def scheduler_pools() -> list[str]:
    return list(settings.SLUICE_POOL_SLOTS)

"""Sluice's scheduler: queued jobs wait here (Redis), not in Celery, and are handed to a
pool's Celery queue only when the pool has capacity (quotas' semaphore says so).

Order: tier priority first; within a priority, weighted fair queuing on CU across tenants
(inference/lua/enqueue.lua). Dispatch claims a job by removing it from the queue (ZREM == 1)
before acquiring capacity, so two dispatchers never start the same job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.conf import settings

from portal.redis import lua_script, redis_client
from quotas.admission import ADMITTED
from quotas.ledger import reservation_acquire
from quotas.limits import pool_slots

logger = logging.getLogger(__name__)

CANDIDATES_PER_ROUND = 50
AVG_RUN_KEY = "s:avg:{pool}"


def _queue_key(pool: str, priority: int) -> str:
    return f"s:q:{pool}:{priority}"


def _priorities_key(pool: str) -> str:
    return f"s:prios:{pool}"


def scheduler_enqueue(*, job_id: str, pool: str, priority: int, tenant_id: int, cost_mcu: int,
                      weight: float = 1.0) -> float:
    tag = lua_script(redis_client(), "enqueue", package="inference")(
        keys=[_queue_key(pool, priority), f"s:tf:{pool}:{tenant_id}", f"s:vt:{pool}",
              _priorities_key(pool)],
        args=[job_id, max(cost_mcu, 1), weight, priority],
    )
    return float(tag)


def scheduler_remove(*, job_id: str, pool: str, priority: int) -> bool:
    return bool(redis_client().zrem(_queue_key(pool, priority), job_id))


def _priorities(pool: str) -> list[int]:
    return sorted((int(p) for p in redis_client().smembers(_priorities_key(pool))), reverse=True)


def scheduler_dispatch(*, pool: str, start_job) -> int:
    """Hand queued jobs to the pool while it has room. `start_job(job_id, job=)` sends one to Celery
    (the job service owns that). Returns how many were started."""
    from inference.models import Job

    client = redis_client()
    lock = client.lock(f"s:lock:{pool}", timeout=10, blocking_timeout=0)
    if not lock.acquire():
        return 0  # another process is dispatching this pool right now
    started = 0
    try:
        for priority in _priorities(pool):
            queue = _queue_key(pool, priority)
            for raw_id, tag in client.zrange(queue, 0, CANDIDATES_PER_ROUND - 1, withscores=True):
                job_id = raw_id.decode()
                if not client.zrem(queue, job_id):
                    continue
                # The job, its reservation and what admission needs of them, in one query.
                job = Job.objects.filter(pk=job_id, status=Job.Status.QUEUED).select_related(
                    "reservation__tenant__tier", "reservation__api_key").first()
                if job is None or job.reservation is None:
                    continue  # cancelled or finished meanwhile
                outcome = reservation_acquire(reservation_id=job.reservation_id,
                                              reservation=job.reservation)
                if outcome == ADMITTED:
                    vtime = float(client.get(f"s:vt:{pool}") or 0)
                    client.set(f"s:vt:{pool}", max(vtime, tag))
                    start_job(job_id, job=job)
                    started += 1
                    continue
                client.zadd(queue, {job_id: tag})  # back in its place
                if outcome == "wait_pool":
                    return started  # full: lower tags and priorities wait too
        return started
    finally:
        try:
            lock.release()
        except Exception:  # expired lock: the next dispatch round proceeds anyway
            logger.debug("dispatch lock of %s expired", pool)


@dataclass(frozen=True)
class QueuePosition:
    position: int  # jobs ahead of this one
    eta_s: float | None


def scheduler_position(*, job_id: str, pool: str, priority: int) -> QueuePosition | None:
    client = redis_client()
    rank = client.zrank(_queue_key(pool, priority), job_id)
    if rank is None:
        return None
    ahead = rank + sum(client.zcard(_queue_key(pool, p)) for p in _priorities(pool) if p > priority)
    average = client.get(AVG_RUN_KEY.format(pool=pool))
    eta = None
    if average is not None:
        eta = round((ahead + 1) * float(average) / max(1, min(pool_slots(pool), 64)), 1)
    return QueuePosition(position=ahead, eta_s=eta)


def scheduler_record_run_time(*, pool: str, seconds: float) -> None:
    """Exponentially weighted average of run times, for ETAs."""
    key = AVG_RUN_KEY.format(pool=pool)
    client = redis_client()
    previous = client.get(key)
    value = seconds if previous is None else 0.8 * float(previous) + 0.2 * seconds
    client.set(key, value, ex=7 * 86400)


def scheduler_depths(*, pool: str) -> dict[int, int]:
    """Queued jobs per priority (operators' view and metrics)."""
    client = redis_client()
    return {p: client.zcard(_queue_key(pool, p)) for p in _priorities(pool)}


def scheduler_pools() -> list[str]:
    return list(settings.SLUICE_POOL_SLOTS)

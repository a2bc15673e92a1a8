"""make bench-jobs: the job spine (admission -> scheduler -> Celery -> worker -> settle).

(a) enqueue -> start latency on an idle pool (queued_at -> started_at, one job at a time);
(b) sustained jobs/s for short jobs, submitted by 4 threads, 4 worker processes, and the CPU
    milliseconds per job of each party (submitting process, worker, PostgreSQL, Redis);
(c) fairness: one tenant queues 1,000 jobs, nine others 10 each, one worker: the light
    tenants' p99 queue wait under Sluice's fair dispatch vs plain FIFO (every job sent
    straight to the Celery queue), in the same run.
Workers run the product code with a sleep in place of the GPU (bench/noop_worker.py).
Uses the configured database (PostgreSQL recommended: BENCH_DATABASE_URL) and Redis DB 13.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
if os.environ.get("BENCH_DATABASE_URL"):
    from bench.common import postgres_database_ensure

    os.environ["DATABASE_URL"] = os.environ["BENCH_DATABASE_URL"]
    postgres_database_ensure(os.environ["DATABASE_URL"])
REPO = Path(__file__).resolve().parent.parent
QUEUE = "video-hbm"


def _redis_url() -> str:
    from bench.common import bench_redis_url

    url, _embedded = bench_redis_url()
    return url.rsplit("/", 1)[0] + "/13"


os.environ["REDIS_URL"] = _redis_url()
os.environ["SLUICE_POOL_CAPACITY_CU"] = f"{QUEUE}=100000000"

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402

from bench.common import percentile, print_table  # noqa: E402


def _worker(job_s: float, concurrency: int = 1) -> subprocess.Popen:
    env = dict(os.environ, BENCH_JOB_S=str(job_s), BENCH_WORKER_CONCURRENCY=str(concurrency),
               SLUICE_DB_CONN_MAX_AGE="60",
               SLUICE_POOL_SLOTS=os.environ.get("SLUICE_POOL_SLOTS", ""))
    process = subprocess.Popen([sys.executable, "-m", "bench.noop_worker", QUEUE], cwd=REPO, env=env,
                               start_new_session=True)
    time.sleep(6)  # Django + Celery start-up
    return process


def _stop(process: subprocess.Popen) -> None:
    import signal

    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


def _fresh_world(tenants: int, tier: str = "pro"):
    from inference.models import Job
    from portal.models import Tenant
    from portal.redis import redis_client
    from portal.services import api_key_issue
    from quotas.models import LedgerEntry, Reservation
    from tests.factories import tier as tier_of

    redis_client().flushdb()
    bench_tenants = Tenant.objects.filter(slug__startswith="bench-")
    Job.objects.filter(tenant__in=bench_tenants).delete()
    LedgerEntry.objects.filter(tenant__in=bench_tenants).delete()
    Reservation.objects.filter(tenant__in=bench_tenants).delete()
    bench_tenants.delete()
    keys = []
    for index in range(tenants):
        tenant = Tenant.objects.create(
            name=f"bench {index}", slug=f"bench-{index}", tier=tier_of(tier),
            unlimited_budget=True, cu_per_minute_override=100_000_000,
            burst_cu_override=100_000_000, max_concurrent_jobs_override=100_000,
        )
        api_key = api_key_issue(tenant=tenant, name="bench").api_key
        keys.append(type(api_key).objects.select_related("tenant__tier").get(pk=api_key.pk))
    return keys


def _submit(api_key, *, mode="async"):
    from inference.registry import model_get
    from inference.services import job_submit
    from quotas.cost import CostEstimate

    spec = model_get("sluice-video-tiny")
    return job_submit(api_key=api_key, spec=spec, variant=spec.variant("full"), params={},
                      estimate=CostEstimate(mcu=1000), mode=mode).job


def _wait_all_done(job_ids: list[str], timeout_s: float) -> None:
    """Until every job in `job_ids` succeeded. The poll asks about the bench tenants' jobs as a
    whole (only these jobs exist for them): a poll naming thousands of ids cost ~7 ms of this
    process's CPU, 20 times a second, out of the two cores the benchmark measures."""
    from inference.models import Job

    unfinished = Job.objects.filter(tenant__slug__startswith="bench-").exclude(status="succeeded")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not unfinished.exists():
            if Job.objects.filter(pk__in=job_ids, status="succeeded").count() != len(job_ids):
                raise RuntimeError("some jobs did not succeed")
            return
        time.sleep(0.05)
    raise RuntimeError("jobs did not finish in time")


def start_latency(samples: int = 100) -> dict:
    from inference.models import Job

    settings.SLUICE_POOL_SLOTS[QUEUE] = 1
    (api_key,) = _fresh_world(1)
    worker = _worker(0.0)
    try:
        latencies = []
        for _ in range(samples):
            job = _submit(api_key)
            _wait_all_done([job.pk], 30)
            job = Job.objects.get(pk=job.pk)
            latencies.append((job.started_at - job.queued_at).total_seconds() * 1000)
    finally:
        _stop(worker)
    return {"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99)}


def _cpu_by_role(worker_pids: list[int]) -> dict[str, float]:
    """CPU seconds so far of: this (submitting) process, the workers with their children,
    PostgreSQL's and Redis's server processes."""
    import psutil

    def seconds(process: psutil.Process) -> float:
        try:
            times = process.cpu_times()
            return times.user + times.system
        except psutil.Error:
            return 0.0

    totals = {"submitter": seconds(psutil.Process()), "worker": 0.0, "postgres": 0.0, "redis": 0.0}
    for pid in worker_pids:
        parent = psutil.Process(pid)
        totals["worker"] += sum(seconds(p) for p in [parent, *parent.children(recursive=True)])
    for process in psutil.process_iter(["name"]):
        name = process.info["name"] or ""
        if name.startswith("postgres"):
            totals["postgres"] += seconds(process)
        elif name.startswith("redis-server"):
            totals["redis"] += seconds(process)
    return totals


def throughput(jobs: int = 2000, submitters: int = 4, worker_processes: int = 4) -> dict:
    """Short jobs through a pool of 64 slots: past the first 64, each waits in the scheduler and
    is dispatched when one finishes. One worker with `worker_processes` children: a child spends
    most of a short job's time waiting on PostgreSQL's commits and Redis, so two cores stay
    busy only with more children than cores (2 children: about 175 jobs/s, idle CPU left)."""
    settings.SLUICE_POOL_SLOTS[QUEUE] = 64
    os.environ["SLUICE_POOL_SLOTS"] = f"{QUEUE}=64"
    keys = _fresh_world(8)
    workers = [_worker(0.0, concurrency=worker_processes)]
    try:
        cpu_before = _cpu_by_role([worker.pid for worker in workers])
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=submitters) as pool:
            ids = list(pool.map(lambda i: _submit(keys[i % len(keys)]).pk, range(jobs)))
        _wait_all_done(ids, 600)
        elapsed = time.monotonic() - started
        cpu_after = _cpu_by_role([worker.pid for worker in workers])
    finally:
        for worker in workers:
            _stop(worker)
        os.environ.pop("SLUICE_POOL_SLOTS", None)
    # Where a job's CPU goes (the submitting process also polls for completion, a small share).
    cpu_ms_per_job = {role: (cpu_after[role] - cpu_before[role]) * 1000 / jobs for role in cpu_after}
    return {"jobs_per_s": jobs / elapsed, "jobs": jobs, "seconds": elapsed,
            "cpu_ms_per_job": cpu_ms_per_job}


def fairness(mode: str, heavy_jobs: int = 1000, light_tenants: int = 9, light_jobs: int = 10,
             job_s: float = 0.05) -> dict:
    """One worker, one job at a time. The heavy tenant floods first; the light tenants submit
    right after it. mode "fair": one slot, jobs wait in Sluice's scheduler. mode "fifo": the
    slot limit is lifted so every job goes straight onto the Celery queue (first in, first out)."""
    from inference.models import Job

    slots = 1 if mode == "fair" else 1_000_000
    settings.SLUICE_POOL_SLOTS[QUEUE] = slots
    os.environ["SLUICE_POOL_SLOTS"] = f"{QUEUE}={slots}"
    keys = _fresh_world(1 + light_tenants)
    heavy, light = keys[0], keys[1:]
    worker = _worker(job_s)
    try:
        # The flood arrives as a flood: several submitters at once.
        with ThreadPoolExecutor(max_workers=4) as pool:
            ids = list(pool.map(lambda _: _submit(heavy).pk, range(heavy_jobs)))
        light_ids = [_submit(key).pk for _ in range(light_jobs) for key in light]
        _wait_all_done(ids + light_ids, 900)
    finally:
        _stop(worker)
        os.environ.pop("SLUICE_POOL_SLOTS", None)
    waits = [(job.started_at - job.queued_at).total_seconds() * 1000
             for job in Job.objects.filter(pk__in=light_ids)]
    heavy_waits = [(job.started_at - job.queued_at).total_seconds() * 1000
                   for job in Job.objects.filter(pk__in=ids)]
    return {"light_p99_wait_ms": percentile(waits, 99), "light_p50_wait_ms": percentile(waits, 50),
            "heavy_p50_wait_ms": percentile(heavy_waits, 50)}


def main() -> None:
    call_command("migrate", verbosity=0)
    latency = start_latency()
    rate = throughput()
    fair = fairness("fair")
    fifo = fairness("fifo")
    print(f"Job spine, {os.cpu_count()} CPUs, database {settings.DATABASES['default']['ENGINE']}")
    print_table(["measure", "value"], [
        ["enqueue->start p50 ms (idle pool)", latency["p50_ms"]],
        ["enqueue->start p99 ms (idle pool)", latency["p99_ms"]],
        ["sustained jobs/s", rate["jobs_per_s"]],
        *[[f"CPU ms per job, {role}", value] for role, value in rate["cpu_ms_per_job"].items()],
        ["light tenants p50 wait ms, fair", fair["light_p50_wait_ms"]],
        ["light tenants p99 wait ms, fair", fair["light_p99_wait_ms"]],
        ["light tenants p50 wait ms, FIFO", fifo["light_p50_wait_ms"]],
        ["light tenants p99 wait ms, FIFO", fifo["light_p99_wait_ms"]],
        ["heavy tenant p50 wait ms, fair", fair["heavy_p50_wait_ms"]],
        ["heavy tenant p50 wait ms, FIFO", fifo["heavy_p50_wait_ms"]],
    ])
    print(json.dumps({
        "start_latency_p50_ms": round(latency["p50_ms"], 2),
        "start_latency_p99_ms": round(latency["p99_ms"], 2),
        "jobs_per_s": round(rate["jobs_per_s"], 1),
        "cpu_ms_per_job": round(sum(rate["cpu_ms_per_job"].values()), 2),
        "fair_light_p99_wait_ms": round(fair["light_p99_wait_ms"], 1),
        "fifo_light_p99_wait_ms": round(fifo["light_p99_wait_ms"], 1),
        "fifo_over_fair_p99_wait": round(fifo["light_p99_wait_ms"] / max(fair["light_p99_wait_ms"], 1e-6), 1),
    }))


if __name__ == "__main__":
    main()

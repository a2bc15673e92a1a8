"""A Celery worker for bench/jobs.py whose engine does nothing but wait `BENCH_JOB_S`.

The benchmark measures Sluice's machinery (admission, scheduler, Celery, Redis, ledger,
events), so the GPU's share of a job is replaced by a fixed sleep. Everything else is the
product code unchanged.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

import django  # noqa: E402

django.setup()

from inference import runner  # noqa: E402
from inference.engines.base import RunContext, RunResult  # noqa: E402

JOB_S = float(os.environ.get("BENCH_JOB_S", "0"))


class SleepEngine:
    def run(self, context: RunContext) -> RunResult:
        if JOB_S:
            time.sleep(JOB_S)
        return RunResult(actual_mcu=1, result={}, usage={})


runner.engine_for = lambda spec: SleepEngine()

if __name__ == "__main__":
    from portal.celery import app

    queue = sys.argv[1]
    app.worker_main(["worker", "-Q", queue, "-n", f"bench-{queue}-{os.getpid()}@%h", "--concurrency",
                     os.environ.get("BENCH_WORKER_CONCURRENCY", "1"), "--loglevel", "WARNING",
                     "--without-gossip", "--without-mingle", "--without-heartbeat"])

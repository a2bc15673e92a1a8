"""Liveness checks that Kubernetes execs in the worker and beat pods (deploy/k8s/workers.yaml).

    python -m portal.probes worker default@%h           # exit 0: the worker's consumer answered
    python -m portal.probes beat /tmp/celerybeat-schedule 600   # exit 0: beat saved its schedule

A worker: its metrics thread answers TCP while its consumer is stuck, so the check is a remote
control ping to the node the pod runs, the name expanded as `celery worker -n` expands it. The
consumer answers it between tasks and during them (prefork runs tasks in child processes, the
threads pool in other threads). A beat: it saves its schedule file (celery's `sync_every`, three
minutes) while it keeps sending due tasks, so a file older than that plus a margin means a beat
that stopped ticking.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

WORKER_PING_TIMEOUT_S = 10.0


def worker_node_name(pattern: str) -> str:
    from celery.utils.nodenames import default_nodename, host_format

    return host_format(default_nodename(pattern))


def worker_answers(*, node_pattern: str, timeout_s: float = WORKER_PING_TIMEOUT_S) -> bool:
    from portal.celery import app

    node_name = worker_node_name(node_pattern)
    replies = app.control.ping(destination=[node_name], timeout=timeout_s)
    return any(node_name in reply for reply in replies)


def beat_schedule_age_s(*, schedule: Path) -> float | None:
    """Seconds since beat last wrote its schedule, whichever files the dbm backend keeps it in
    (`schedule`, or `schedule.dat`/`.dir`...); None when there is none yet."""
    from celery.beat import PersistentScheduler

    mtimes = [path.stat().st_mtime for suffix in PersistentScheduler.known_suffixes
              if (path := schedule.with_name(schedule.name + suffix)).exists()]
    return time.time() - max(mtimes) if mtimes else None


def main(argv: list[str]) -> int:
    match argv:
        case ["worker", node_pattern]:
            if worker_answers(node_pattern=node_pattern):
                return 0
            print(f"{worker_node_name(node_pattern)} did not answer a ping", file=sys.stderr)
            return 1
        case ["beat", schedule, max_age_s]:
            age_s = beat_schedule_age_s(schedule=Path(schedule))
            if age_s is not None and age_s <= float(max_age_s):
                return 0
            print(f"beat's schedule {schedule} was last saved {age_s} s ago", file=sys.stderr)
            return 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

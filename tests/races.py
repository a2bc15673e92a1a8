"""Two (or more) requests at once on PostgreSQL, made to meet where a race would happen: a third
transaction holds a lock they need until every request waits on it, then lets go, so they
proceed together instead of one after the other as threads usually do."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from django.db import connection, transaction


def backends_waiting_on_locks() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                       "AND wait_event_type = 'Lock'")
        return cursor.fetchone()[0]


def released_together(hold: Callable[[], object], *requests: Callable[[], object]) -> list:
    """Run the requests concurrently, each on its own thread and connection, while `hold` runs
    in a transaction of its own (taking the lock they will wait for; rolled back at the end);
    released once all of them wait on a lock. What each returned, or the exception it raised."""
    if connection.vendor != "postgresql":
        pytest.skip("lock waits and concurrent transactions need PostgreSQL")
    held, release = threading.Event(), threading.Event()
    results: list = [None] * len(requests)

    def holder() -> None:
        try:
            with transaction.atomic():
                hold()
                held.set()
                release.wait(90)
                transaction.set_rollback(True)
        finally:
            connection.close()

    def run(index: int, request: Callable[[], object]) -> None:
        try:
            results[index] = request()
        except Exception as exc:  # noqa: BLE001 (reported by the test's assertions)
            results[index] = exc
        finally:
            connection.close()

    holding = threading.Thread(target=holder)
    holding.start()
    assert held.wait(10)
    threads = [threading.Thread(target=run, args=pair) for pair in enumerate(requests)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 60  # the first request of a session imports the views
        while backends_waiting_on_locks() < len(requests):
            assert time.monotonic() < deadline, "the requests never all waited on the lock"
            time.sleep(0.02)
    finally:  # a failed wait lets go too, so the test fails instead of hanging on the locks
        release.set()
        holding.join()
        for thread in threads:
            thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a request did not finish in 60 s"
    return results

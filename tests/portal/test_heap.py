"""Long-lived objects are frozen out of the garbage collector's full passes (portal/heap.py)."""

import gc
import time

import pytest

from portal.heap import long_lived_freeze


def test_freezing_takes_the_objects_held_now_out_of_the_collectors_passes():
    kept = [{"row": index} for index in range(50_000)]
    try:
        frozen = long_lived_freeze(after="a test")
        # (Frozen objects still go when their last reference does: the count may have dropped.)
        assert frozen >= len(kept) and gc.get_freeze_count() >= len(kept)
        # A full collection now walks only what is not frozen: far fewer objects than are held.
        assert sum(gc.get_count()) < 1_000 and len(gc.get_objects(generation=2)) < frozen / 10
    finally:
        gc.unfreeze()


def test_the_asgi_entry_point_freezes_what_it_loaded(fresh_asgi_process):
    assert fresh_asgi_process.returncode == 0, fresh_asgi_process.stderr[-2000:]
    assert int(fresh_asgi_process.stdout.strip().splitlines()[-1]) > 100_000


@pytest.mark.django_db(transaction=True)
def test_a_worker_and_its_prefork_child_freeze_what_they_loaded(start_worker):
    worker = start_worker("video-hbm")  # prefork with one child, as make run starts it
    deadline = time.monotonic() + 90
    while worker.output().count("long-lived objects after worker start-up") < 2:
        assert time.monotonic() < deadline, worker.output()[-3000:]
        time.sleep(0.2)


def test_a_process_that_froze_its_heap_exits_without_leak_reports(fresh_asgi_process):
    """Left frozen at exit, objects of extension types count as leaked (nanobind printed a page
    of warnings for triton's at every worker shutdown): the heap is unfrozen at exit."""
    finished = fresh_asgi_process
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "froze" in finished.stdout + finished.stderr
    assert "leaked" not in finished.stderr, finished.stderr[-2000:]

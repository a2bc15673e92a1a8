"""Publishing a job's events (inference/events.py, inference/lua/publish.lua) on the real Redis."""

from __future__ import annotations

import pytest

from inference.events import event_publish, events_read
from tests.factories import tenant_with_limits

pytestmark = pytest.mark.django_db


def test_an_attempts_event_published_again_is_appended_once_and_a_superseded_attempts_not(
        clean_redis):
    """A running attempt numbers its events. Sent again (its reply was lost after Redis appended
    it), an event keeps its seq and is not appended twice; the attempt's next event is. An event
    of an attempt the job was handed away from, after its successor published, is dropped.
    Events published outside a run (queued, an end) carry no number and are always appended."""
    tenant_id = tenant_with_limits(budget_cu=10).pk

    def publish(event_type: str, data: dict, **numbered) -> int:
        return event_publish(job_id="job_e1", tenant_id=tenant_id, event_type=event_type,
                             data=data, **numbered)

    assert publish("job.queued", {"status": "queued"}) == 1
    assert publish("job.started", {"attempt": 1}, attempt=1, attempt_seq=1) == 2
    assert publish("job.output", {"delta": "def "}, attempt=1, attempt_seq=2) == 3
    assert publish("job.output", {"delta": "def "}, attempt=1, attempt_seq=2) == 3  # again
    assert publish("job.output", {"delta": "f():"}, attempt=1, attempt_seq=3) == 4
    assert publish("job.queued", {"reason": "worker_lost"}) == 5
    assert publish("job.started", {"attempt": 2}, attempt=2, attempt_seq=1) == 6
    assert publish("job.output", {"delta": " pass"}, attempt=1, attempt_seq=4) == 0  # superseded
    assert publish("job.output", {"delta": "def "}, attempt=2, attempt_seq=2) == 7
    assert publish("job.completed", {"status": "succeeded"}) == 8
    assert publish("job.completed", {"status": "succeeded"}) == 9  # (the reaper's, say)

    events = events_read(job_id="job_e1")
    assert [event.seq for event in events] == list(range(1, 10))
    assert [event.data.get("delta") for event in events if event.type == "job.output"] == [
        "def ", "f():", "def "]

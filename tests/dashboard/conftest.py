"""Dashboard fixtures: a queued video job of acme (the scheduler's message captured) and a
staff user who belongs to no tenant."""

from __future__ import annotations

import pytest

from portal import ops_selectors
from portal.services import playground_submit
from tests.factories import UserFactory

VIDEO = {"model": "sluice-video-tiny", "prompt": "a red square", "size": "64x64",
         "seconds": "0.5", "num_inference_steps": "4"}


@pytest.fixture
def video_job(cast, sent_tasks):
    return playground_submit(actor=cast.member, payload=dict(VIDEO)).job


@pytest.fixture
def staff(db):
    return UserFactory(username="operator", is_staff=True)


@pytest.fixture(autouse=True)
def no_worker_ping(monkeypatch):
    """Celery's remote control leaves broker connections and threads in this process, and a
    later test that forks would inherit them mid-use (test_ledger's forked reservations hang).
    The real ping against a real worker is in test_browser.py, from the server's process."""
    monkeypatch.setattr(ops_selectors, "workers_alive", lambda: [])

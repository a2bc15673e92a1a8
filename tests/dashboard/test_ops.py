"""The operator console's content: tenants and usage, pools, workers, rejections, moderation."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from django.test import Client

from portal import ops_selectors
from portal.redis import redis_client
from quotas.admission import rejection_record

pytestmark = pytest.mark.django_db

REAL_WORKERS_ALIVE = ops_selectors.workers_alive  # before the autouse fixture replaces it


def test_console_shows_tenants_pools_rejections_and_the_moderation_queue(cast, staff, video_job,
                                                                             monkeypatch):
    rejection_record(client=redis_client(), code="insufficient_quota")
    client = Client()
    client.force_login(staff)
    response = client.get("/ops/")
    context = response.context
    usage = {row.tenant.slug: row for row in context["tenants"]}
    assert usage["acme"].used_cu == video_job.estimated_mcu / 1000 and usage["globex"].used_cu == 0
    assert usage["acme"].budget_cu == 100_000
    pools = {state.load.pool: state for state in context["pools"]}
    assert set(pools) == {"text-batch", "video-hbm"}
    # The fixture job was admitted straight onto the video pool (its Celery message captured).
    assert pools["video-hbm"].load.jobs_in_flight == 1
    assert context["rejections"] == {"insufficient_quota": 1}
    assert context["workers"] == []
    html = response.content.decode()
    assert "insufficient_quota" in html and "Acme" in html
    assert 'href="/moderation/"' in html  # the moderation app's review queue

    # A deployment without the moderation app shows an empty state instead of a broken link.
    monkeypatch.setattr(ops_selectors, "moderation_queue_url", lambda: None)
    assert "not installed yet" in client.get("/ops/").content.decode()


def test_queued_jobs_show_as_queue_depth_per_priority(cast, staff, sent_tasks, monkeypatch):
    from portal.services import playground_submit
    from tests.dashboard.conftest import VIDEO

    first = playground_submit(actor=cast.member, payload=dict(VIDEO)).job
    second = playground_submit(actor=cast.member, payload=dict(VIDEO)).job  # one slot: waits
    client = Client()
    client.force_login(staff)
    pools = {state.load.pool: state for state in client.get("/ops/").context["pools"]}
    assert pools["video-hbm"].depths == {second.priority: 1} and pools["video-hbm"].queued == 1
    assert first.pk != second.pk


def _real_ping_timed(monkeypatch, broker_url: str) -> tuple[list[str] | None, float]:
    """The console's real ping (the autouse fixture replaces it in this module's other tests)
    against `broker_url`, and how long it took."""
    from portal.celery import app

    monkeypatch.setattr(ops_selectors, "_worker_ping_answer", None)
    monkeypatch.setitem(app.conf, "broker_url", broker_url)
    started = time.monotonic()
    answer = REAL_WORKERS_ALIVE()
    return answer, time.monotonic() - started


def test_a_broker_that_refuses_the_connection_is_reported_at_once_and_logged(monkeypatch, caplog):
    # A port where no broker listens. The connection never opens, so nothing of Celery's remote
    # control is left in this process. Kombu retried the connect for 4 s, 2 s apart: 6 s.
    with caplog.at_level("WARNING", logger="portal.ops_selectors"):
        answer, took_s = _real_ping_timed(monkeypatch, "redis://127.0.0.1:1/0")
    assert answer is None and took_s < 2
    (record,) = [r for r in caplog.records if r.getMessage() == "could not ping workers"]
    assert record.exc_info and "Connection" in type(record.exc_info[1]).__name__ + str(record.exc_info[1])


def test_a_broker_that_takes_the_connection_and_says_nothing_is_reported_as_down(monkeypatch):
    """A stopped or hung broker: the kernel completes the connection, nothing answers. The ping
    waited for its first answer forever (here: until the listener closes, 5 s later)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # never accepted: connects complete, nothing is read or answered
        port = listener.getsockname()[1]
        closing = threading.Timer(5, listener.close)
        closing.start()
        try:
            answer, took_s = _real_ping_timed(monkeypatch, f"redis://127.0.0.1:{port}/0")
        finally:
            closing.cancel()
    assert answer is None and took_s < 3  # 1 s read timeout; the old wait was 5 s


def test_the_console_renders_while_redis_is_down(cast, staff, settings, tmp_path):
    """An operator opens the console during an outage: it answered 500 on its first Redis read.
    What Redis holds (pools, rejections) says it is unknown; the tenants, from the database,
    are still listed."""
    from portal.embedded_redis import embedded_redis_start

    redis_server = embedded_redis_start(data_dir=tmp_path)
    settings.REDIS_URL = redis_server.url
    client = Client()
    client.force_login(staff)
    assert client.get("/ops/").status_code == 200
    redis_server.stop()

    response = client.get("/ops/")
    assert response.status_code == 200
    assert response.context["pools"] is None and response.context["rejections"] is None
    html = response.content.decode()
    assert "Redis did not answer: the pools" in html and "Redis did not answer: the rejection" in html
    assert "Acme" in html

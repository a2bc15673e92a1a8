"""Video jobs through a real Celery worker subprocess running the tiny diffusers pipeline
(and, for the SDK and websocket tests, the ASGI app under uvicorn).

Most tests share one worker for the module (`video_worker`): a worker's start-up is about 15 s
of the 2-core machine's CPU, most of this module's time when each test started its own. The tests that need a worker of their own (one they stop or kill, one whose
database connections are counted from its first job) come first: once the shared worker runs,
it would take their jobs too.
"""

from __future__ import annotations

import itertools
import json
import time

import httpx
import imageio_ffmpeg
import openai
import pytest

from inference.events import TERMINAL_EVENTS, events_read
from inference.models import Job
from inference.services import job_recover_lost, jobs_reap
from quotas.models import LedgerEntry
from tests.conftest import WorkerProcess

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def video_worker(django_db_setup, django_db_blocker):
    """A video-hbm worker for the module's tests, started by the first that asks. Its previews
    every 2 steps are the SDK test's; progress webhooks at most every 0.5 s the throttle test's
    (only that test's tenant has an endpoint)."""
    with django_db_blocker.unblock():
        worker = WorkerProcess("video-hbm", {"SLUICE_VIDEO_PREVIEW_EVERY": "2",
                                             "SLUICE_WEBHOOK_PROGRESS_INTERVAL_S": "0.5"})
    yield worker
    worker.stop()


def output_since_now(worker):
    """A function that returns what the worker logged after this call (the shared worker's
    log holds earlier tests' lines too)."""
    start = len(worker.output())
    return lambda: worker.output()[start:]


def create_video(api, key, **fields):
    body = {"model": "sluice-video-tiny", "prompt": "a red square moving left", "size": "64x64",
            "seconds": 0.5, "num_inference_steps": 4, "seed": 7, **fields}
    response = api.bearer(key).post("/v1/videos", body, format="json")
    assert response.status_code == 201, response.json()
    return response.json()


def wait_for(predicate, timeout_s: float, worker=None, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{worker.output()[-3000:]}" if worker else ""))


def event_types(job_id: str) -> list[str]:
    return [event.type for event in events_read(job_id=job_id)]


def follow_websocket(server, job_id: str, key: str, timeout_s: float = 120) -> list[dict]:
    """Every event of the job over a real websocket, until the terminal one."""
    from websockets.sync.client import connect

    events: list[dict] = []
    deadline = time.monotonic() + timeout_s
    with connect(f"ws://127.0.0.1:{server.port}/ws/jobs/{job_id}/",
                 additional_headers={"Authorization": f"Bearer {key}"}) as socket:
        while not events or events[-1]["type"] not in TERMINAL_EVENTS:
            events.append(json.loads(socket.recv(timeout=max(0.1, deadline - time.monotonic()))))
    return events


def test_a_worker_keeps_its_database_connection_from_job_to_job(cast, api, start_worker):
    """Celery's Django fixup closes the connection around every task unless told otherwise: a
    new PostgreSQL backend (fork, authentication) per job. Sluice's workers reuse theirs."""
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("observes PostgreSQL backends (CI runs the suite on PostgreSQL)")
    worker = start_worker("video-hbm", PGAPPNAME="sluice-test-worker")

    def worker_backends() -> set[int]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                           ["sluice-test-worker"])
            return {pid for (pid,) in cursor.fetchall()}

    seen = []
    for _ in range(2):
        job_id = create_video(api, cast.owner_key)["id"]
        wait_for(lambda job_id=job_id: "job.completed" in event_types(job_id), 120, worker,
                 "completion")
        time.sleep(0.5)  # past the task's end, where the fixup would have closed it
        seen.append(worker_backends())
    assert seen[0] and seen[0] == seen[1]


def test_sigkilled_worker_job_is_redelivered_and_completes_once(cast, api, start_worker, settings,
                                                                request):
    # The reaper's grace is the workers' heartbeat TTL, as in production where both read one
    # setting (with the default 15 s here, the reaper waited 12 s more than the heartbeat).
    settings.SLUICE_JOB_HEARTBEAT_TTL_S = 2
    first = start_worker("video-hbm")
    video = create_video(api, cast.owner_key, num_inference_steps=12)
    job_id = video["id"]
    wait_for(lambda: "job.progress" in event_types(job_id), 120, first, "the first step")
    first.kill()
    assert Job.objects.get(pk=job_id).status == "running"
    # The heartbeat (2 s in these workers) expires; the reaper hands the job out again.
    outcome = wait_for(lambda: jobs_reap(), 30, what="the reaper to notice")
    assert outcome == {"requeued": 1}
    second = request.getfixturevalue("video_worker")  # a fresh worker: the module's from now on
    wait_for(lambda: "job.completed" in event_types(job_id), 180, second, "completion")
    job = Job.objects.get(pk=job_id)
    assert job.attempts == 2
    assert event_types(job_id).count("job.completed") == 1
    assert LedgerEntry.objects.filter(reservation__job=job, kind="settle").count() == 1
    assert job.actual_mcu == job.estimated_mcu


def test_openai_sdk_and_a_websocket_follow_a_video_to_a_playable_mp4(cast, video_worker,
                                                                       start_live_server, tmp_path):
    """The official SDK against a live server and a real worker: create -> every step in order
    (plus previews) over a websocket -> completed -> the mp4 decodes; ranges like a browser's;
    outsiders get 404."""
    worker_log = output_since_now(video_worker)
    server = start_live_server().wait_ready()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=cast.owner_key, max_retries=0, timeout=120)
    # Off the SDK's typed literals (those are sora sizes, accepted too, see test_apis): the SDK
    # sends any string, and extra_body carries Sluice's own fields in the same multipart form.
    video = client.videos.create(model="sluice-video-tiny", prompt="a red square moving left",
                                 seconds="0.5", size="64x64",
                                 extra_body={"num_inference_steps": 4, "seed": 7})
    assert video.status == "queued" and video.size == "64x64" and video.seconds == "0.5"

    events = follow_websocket(server, video.id, cast.owner_key)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["type"] for e in events] == [
        "job.queued", "job.started", "job.progress", "job.progress", "job.preview", "job.progress",
        "job.progress", "job.preview", "job.completed"]
    assert [e["data"]["step"] for e in events if e["type"] == "job.progress"] == [1, 2, 3, 4]
    previews = [e["data"] for e in events if e["type"] == "job.preview"]
    assert [p["step"] for p in previews] == [2, 4] and all(len(p["image_base64"]) < 8000 for p in previews)
    assert events[-1]["data"]["content_url"] == f"/v1/videos/{video.id}/content"

    done = client.videos.retrieve(video.id)
    assert done.status == "completed" and done.progress == 100
    mp4 = client.videos.download_content(video.id).content
    (tmp_path / "out.mp4").write_bytes(mp4)
    reader = imageio_ffmpeg.read_frames(str(tmp_path / "out.mp4"))
    assert next(reader)["size"] == (64, 64) and sum(1 for _ in reader) == 5
    thumbnail = client.videos.download_content(video.id, variant="thumbnail").content
    assert thumbnail[:3] == b"\xff\xd8\xff"  # JPEG

    # A <video> element: first "bytes=0-", then seeks with open-ended ranges.
    owner = {"Authorization": f"Bearer {cast.owner_key}"}
    url = f"{server.url}/v1/videos/{video.id}/content"
    first = httpx.get(url, headers={**owner, "Range": "bytes=0-"})
    assert first.status_code == 206 and first.content == mp4
    assert first.headers["content-range"] == f"bytes 0-{len(mp4) - 1}/{len(mp4)}"
    seek = httpx.get(url, headers={**owner, "Range": f"bytes={len(mp4) // 2}-"})
    assert seek.status_code == 206 and seek.content == mp4[len(mp4) // 2:]

    outsider = {"Authorization": f"Bearer {cast.outsider_key}"}
    for path in (f"/v1/videos/{video.id}", f"/v1/videos/{video.id}/content"):
        response = httpx.get(f"{server.url}{path}", headers=outsider)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key=cast.outsider_key,
                      max_retries=0, timeout=120).videos.download_content(video.id)

    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (video.id, "video.deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(video.id)

    job = Job.objects.get(pk=video.id)  # deleted, and still billed
    assert job.actual_mcu == job.estimated_mcu > 0
    settles = LedgerEntry.objects.filter(reservation__job=job, kind="settle")
    assert [entry.mcu for entry in settles] == [job.actual_mcu]
    assert "Traceback" not in worker_log()


def test_progress_webhooks_are_throttled_per_job(cast, api, video_worker, start_worker, receiver):
    from inference.webhook_models import WebhookEvent
    from inference.webhooks import webhook_endpoint_create

    webhook_endpoint_create(tenant=cast.tenant, url=receiver.url,
                            event_types=["job.progress", "job.completed"])
    interval_s = 0.5  # the video worker's
    worker = video_worker
    # Delivers to the local receiver.
    start_worker("webhooks", SLUICE_WEBHOOK_PROGRESS_INTERVAL_S=str(interval_s),
                 SLUICE_WEBHOOK_ALLOW_PRIVATE="true")
    steps = 40
    job_id = create_video(api, cast.owner_key, num_inference_steps=steps)["id"]
    wait_for(lambda: "job.completed" in event_types(job_id), 120, worker, "completion")

    job = Job.objects.get(pk=job_id)
    progress = list(WebhookEvent.objects.filter(tenant=cast.tenant, type="job.progress").order_by("created_at"))
    run_s = (job.finished_at - job.started_at).total_seconds()
    assert 1 <= len(progress) <= run_s / interval_s + 1 and len(progress) < steps
    # Spacing by the engine's clock at each step (rows are written a variable while later).
    gaps = [b.payload["data"]["elapsed_s"] - a.payload["data"]["elapsed_s"]
            for a, b in itertools.pairwise(progress)]
    assert all(gap >= interval_s * 0.9 for gap in gaps), gaps
    assert progress[0].payload["data"]["step"] == 1  # the first step always goes out
    wait_for(lambda: len(receiver.requests) == len(progress) + 1, 30, what="the deliveries")
    delivered = [json.loads(request.body)["type"] for request in receiver.requests]
    assert delivered.count("job.progress") == len(progress) and delivered.count("job.completed") == 1


def test_cancel_running_video_stops_within_one_step_and_refunds(cast, api, video_worker):
    worker = video_worker
    # 256x256: a step long enough that the test's own cancel request (polling, an HTTP round
    # trip) lands well before the last step, also on a loaded machine (128x128 once did not).
    video = create_video(api, cast.owner_key, num_inference_steps=50, size="256x256")
    job_id = video["id"]
    wait_for(lambda: "job.progress" in event_types(job_id), 120, worker, "the first step")
    response = api.delete(f"/v1/videos/{job_id}")  # cancels it, then deletes it
    assert response.status_code == 200 and response.json()["deleted"] is True
    steps_at_cancel = max(e.data["step"] for e in events_read(job_id=job_id) if e.type == "job.progress")
    # The terminal event is the last thing the worker does (after the row and the ledger).
    wait_for(lambda: "job.cancelled" in event_types(job_id), 60, worker, "the cancel")
    job = Job.objects.get(pk=job_id)
    steps_run = job.usage["steps"]
    assert steps_at_cancel <= steps_run <= steps_at_cancel + 1 < 50
    assert 0 < job.actual_mcu < job.estimated_mcu
    assert job.actual_mcu == pytest.approx(job.estimated_mcu * steps_run / 50, abs=2)
    refund = LedgerEntry.objects.get(reservation__job=job, kind="refund").mcu
    assert refund == job.estimated_mcu - job.actual_mcu
    assert event_types(job_id)[-1] == "job.cancelled"


def test_an_attempt_handed_to_another_stops_publishes_nothing_more_and_the_job_ends_once(
        cast, api, video_worker):
    """A worker cut off from Redis longer than the heartbeat TTL is taken for lost and its job
    queued again while it runs on. It must stop at its next step, publish nothing more and end
    nothing: the new attempt (here on the same worker, once the old one stopped) runs the job
    to its end, announced and charged once."""
    worker = video_worker
    worker_log = output_since_now(worker)
    # 1280x720: a step (~0.1 s here) long enough that the run outlasts the watcher's check.
    job_id = create_video(api, cast.owner_key, num_inference_steps=50, size="1280x720")["id"]
    wait_for(lambda: "job.progress" in event_types(job_id), 120, worker, "the first step")
    # What the reaper does once the heartbeat has been missing for a TTL.
    assert job_recover_lost(job=Job.objects.get(pk=job_id)) == "requeued"
    wait_for(lambda: any(e.type == "job.started" and e.data["attempt"] == 2
                         for e in events_read(job_id=job_id)), 120, worker, "the second attempt")
    api.bearer(cast.owner_key).post(f"/v1/jobs/{job_id}/cancel")  # spares the test its run
    wait_for(lambda: Job.objects.get(pk=job_id).is_terminal, 60, worker, "the cancel")

    events = events_read(job_id=job_id)
    requeued = next(i for i, e in enumerate(events) if e.data.get("reason") == "worker_lost")
    restarted = next(i for i, e in enumerate(events)
                     if e.type == "job.started" and e.data["attempt"] == 2)
    # The first attempt's steps after the requeue: those before its watcher's next check (1 s);
    # it would otherwise have run all of them.
    late_steps = [e for e in events[requeued:restarted] if e.type == "job.progress"]
    assert len(late_steps) <= 20, [(e.type, e.data.get("step")) for e in events]
    assert max((e.data["step"] for e in late_steps), default=0) < 45
    time.sleep(1)  # anything the first attempt would still publish
    events = events_read(job_id=job_id)
    assert [e.type for e in events if e.type in TERMINAL_EVENTS] == ["job.cancelled"]
    assert [e.type for e in events[restarted:]].count("job.started") == 1
    job = Job.objects.get(pk=job_id)
    assert job.status == "cancelled" and job.attempts == 2
    assert LedgerEntry.objects.filter(reservation__job=job, kind="settle").count() == 1
    assert "attempt 1 stopped, the job was handed to another attempt" in worker_log()

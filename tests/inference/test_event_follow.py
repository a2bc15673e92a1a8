"""Following a job's event stream through Redis trouble: a dropped connection loses nothing,
and an outage ends a completion's stream with an error and cancels its job, instead of a
`[DONE]` after half a completion and the job billed in full (inference/events.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from asgiref.sync import sync_to_async

from inference import events
from inference.events import event_publish, events_follow
from inference.models import Job
from inference.text_apis import _Shape, _stream
from portal.embedded_redis import embedded_redis_start
from portal.redis import redis_client
from tests.factories import api_key_obj, tenant_with_limits, video_job_submit


def _publish(job: Job, event_type: str, data: dict) -> None:
    event_publish(job_id=job.pk, tenant_id=job.tenant_id, event_type=event_type, data=data)


async def _queued_job() -> Job:
    api_key = await sync_to_async(api_key_obj)(await sync_to_async(tenant_with_limits)(budget_cu=100))
    return (await sync_to_async(video_job_submit)(api_key, cu=1)).job


@pytest.mark.django_db(transaction=True)
async def test_a_dropped_connection_loses_no_event(sent_tasks):
    job = await _queued_job()
    await sync_to_async(_publish)(job, "job.started", {"status": "running"})
    follower = events_follow(job_id=job.pk, block_ms=200)
    seen = []
    async for event in follower:
        if event is not None:
            seen.append(event.type)
        if seen == ["job.queued", "job.started"]:
            break
    # Redis drops every other connection (a failover, a restart of a proxy in between).
    dropped = await sync_to_async(redis_client().client_kill_filter)(_type="normal", skipme=True)
    assert dropped >= 1
    await sync_to_async(_publish)(job, "job.progress", {"progress": 50})
    await sync_to_async(_publish)(job, "job.completed", {"status": "succeeded"})
    async for event in follower:
        if event is not None:
            seen.append(event.type)
    assert seen == ["job.queued", "job.started", "job.progress", "job.completed"]


@pytest.mark.django_db(transaction=True)
async def test_an_outage_ends_a_completion_stream_with_an_error_and_cancels_its_job(
        sent_tasks, settings, monkeypatch, tmp_path: Path):
    monkeypatch.setattr(events, "FOLLOW_RETRY_S", 0.5)
    redis_of_its_own = embedded_redis_start(data_dir=tmp_path / "redis")
    try:
        settings.REDIS_URL = redis_of_its_own.url
        job = await _queued_job()
        await sync_to_async(_publish)(job, "job.output", {"delta": "def f"})
        shape = _Shape(chat=False, job=job, served_name="sluice-code-tiny")
        chunks = []
        async for piece in _stream(job, shape, SimpleNamespace(include_usage=False)):
            chunks += [line.removeprefix("data: ") for line in piece.splitlines() if line.startswith("data: ")]
            if len(chunks) == 1:
                redis_of_its_own.stop()  # gone for longer than the follower retries
    finally:
        redis_of_its_own.stop()
    assert json.loads(chunks[0])["choices"][0]["text"] == "def f"
    assert json.loads(chunks[1])["error"]["code"] == "stream_interrupted"
    assert chunks[2:] == ["[DONE]"]
    # The relay asked for the job to be cancelled (its Redis part waits for Redis to return).
    for _ in range(100):
        if (await Job.objects.aget(pk=job.pk)).cancel_requested_at is not None:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the job was not cancelled")


@pytest.mark.django_db(transaction=True)
async def test_a_failed_job_ends_its_stream_with_its_own_code(sent_tasks):
    job = await _queued_job()
    message = "The job was not started before its reservation ran out; nothing was charged."
    await sync_to_async(_publish)(job, "job.failed", {"status": "failed",
                                                      "error": {"code": "queue_timeout", "message": message}})
    chunks = await _relayed(job)
    assert json.loads(chunks[0])["error"] == {"type": "server_error", "code": "queue_timeout",
                                              "message": message, "param": None}
    assert chunks[1:] == ["[DONE]"]


@pytest.mark.django_db(transaction=True)
async def test_an_engine_error_names_no_internal_host(sent_tasks):
    job = await _queued_job()
    await sync_to_async(_publish)(job, "job.failed", {"status": "failed", "error": {
        "code": "engine_error", "message": "MaxRetryError: HTTPConnectionPool(host='10.0.3.7', port=8101)"}})
    error = json.loads((await _relayed(job))[0])["error"]
    assert error["code"] == "engine_error" and "10.0.3.7" not in error["message"]


@pytest.mark.django_db(transaction=True)
async def test_a_job_whose_last_event_never_reached_redis_ends_its_stream_from_its_row(
        sent_tasks, monkeypatch):
    """Its end was committed, then Redis failed before the terminal event was written: the
    relay looks at the row after a quiet spell and ends the stream as the event would have."""
    from inference import text_apis

    monkeypatch.setattr(text_apis, "RELAY_IDLE_MS", 200)
    job = await _queued_job()
    await sync_to_async(_publish)(job, "job.output", {"delta": "x = 1"})
    await Job.objects.filter(pk=job.pk).aupdate(
        status=Job.Status.SUCCEEDED, result={"text": "x = 1", "finish_reason": "length"},
        usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
    chunks = await _relayed(job, include_usage=True)
    assert json.loads(chunks[0])["choices"][0]["text"] == "x = 1"
    assert json.loads(chunks[1])["choices"][0]["finish_reason"] == "length"
    # As OpenAI's: with include_usage every chunk has `usage`, null until the last.
    assert [json.loads(chunk)["usage"] for chunk in chunks[:2]] == [None, None]
    assert json.loads(chunks[2])["usage"]["total_tokens"] == 7
    assert chunks[3:] == ["[DONE]"]
    assert all("usage" not in json.loads(chunk) for chunk in (await _relayed(job))[:-1])


async def _relayed(job: Job, *, include_usage: bool = False) -> list[str]:
    shape = _Shape(chat=False, job=job, served_name="sluice-code-tiny", include_usage=include_usage)
    chunks = []
    async for piece in _stream(job, shape, SimpleNamespace(include_usage=include_usage)):
        chunks += [line.removeprefix("data: ") for line in piece.splitlines() if line.startswith("data: ")]
    return chunks


# --- following a job whose stream cannot tell its end ------------------------------------------


def _ended_without_its_event(job: Job) -> None:
    """The row ends as job_succeed ends it, and the stream never hears of it (Redis refused
    the event, or the stream expired a day later)."""
    from django.utils import timezone

    Job.objects.filter(pk=job.pk).update(status=Job.Status.SUCCEEDED, finished_at=timezone.now(),
                                         actual_mcu=700, progress=100.0,
                                         result={"video": f"videos/{job.pk}.mp4"})


async def _sse_events(job: Job, key: str, *, last_event_id: int | None = None):
    from django.test import AsyncClient

    headers = {"Authorization": f"Bearer {key}"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    response = await AsyncClient().get(f"/v1/jobs/{job.pk}/events", headers=headers)
    if response.status_code != 200:
        return response.status_code, []

    async def body() -> str:
        return b"".join([chunk async for chunk in response.streaming_content]).decode()

    events = []
    for block in (await asyncio.wait_for(body(), timeout=5)).split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if fields:
            events.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
    return 200, events


@pytest.mark.django_db(transaction=True)
async def test_sse_of_an_ended_job_whose_stream_expired_ends_from_its_row_then_answers_204(cast, sent_tasks):
    from inference.events import stream_key

    job = (await sync_to_async(video_job_submit)(await sync_to_async(api_key_obj)(cast.tenant))).job
    await sync_to_async(_ended_without_its_event)(job)
    await sync_to_async(redis_client().delete)(stream_key(job.pk), f"{stream_key(job.pk)}:seq")

    status, events = await _sse_events(job, cast.owner_key)  # at once, not after a keep-alive
    assert status == 200 and [(seq, kind) for seq, kind, _ in events] == [(1, "job.completed")]
    end = events[0][2]
    assert end["status"] == "succeeded" and end["actual_cu"] == 0.7 and end["job_id"] == job.pk
    assert end["content_url"] == f"/v1/videos/{job.pk}/content"
    # EventSource reconnects after every response that ends; a 204 is what stops it.
    assert (await _sse_events(job, cast.owner_key, last_event_id=1))[0] == 204
    assert (await _sse_events(job, cast.owner_key, last_event_id=0))[1][0][:2] == (1, "job.completed")
    assert (await _sse_events(job, cast.outsider_key))[0] == 404


@pytest.mark.django_db(transaction=True)
async def test_sse_resuming_at_or_after_the_terminal_event_is_a_204(cast, sent_tasks):
    job = (await sync_to_async(video_job_submit)(await sync_to_async(api_key_obj)(cast.tenant))).job
    await sync_to_async(_publish)(job, "job.started", {"status": "running"})
    await sync_to_async(_ended_without_its_event)(job)
    await sync_to_async(_publish)(job, "job.completed", {"status": "succeeded"})
    status, events = await _sse_events(job, cast.owner_key, last_event_id=2)
    assert status == 200 and [(seq, kind) for seq, kind, _ in events] == [(3, "job.completed")]
    for resumed in (3, 4):
        assert (await _sse_events(job, cast.owner_key, last_event_id=resumed))[0] == 204


@pytest.mark.django_db(transaction=True)
async def test_sse_of_a_job_whose_terminal_event_is_missing_sends_one_from_the_row(cast, sent_tasks):
    job = (await sync_to_async(video_job_submit)(await sync_to_async(api_key_obj)(cast.tenant))).job
    await sync_to_async(_publish)(job, "job.started", {"status": "running"})
    await sync_to_async(_ended_without_its_event)(job)  # terminal_event_pending: not published yet
    status, events = await _sse_events(job, cast.owner_key, last_event_id=1)
    assert [(seq, kind) for seq, kind, _ in events] == [(2, "job.started"), (3, "job.completed")]
    assert (await _sse_events(job, cast.owner_key, last_event_id=3))[0] == 204


@pytest.mark.django_db(transaction=True)
async def test_sse_of_a_job_that_ends_while_followed_without_its_event_ends_from_its_row(
        cast, sent_tasks, monkeypatch):
    from inference import apis

    monkeypatch.setattr(apis, "SSE_KEEPALIVE_S", 0.2)
    job = (await sync_to_async(video_job_submit)(await sync_to_async(api_key_obj)(cast.tenant))).job
    following = asyncio.ensure_future(_sse_events(job, cast.owner_key))
    await asyncio.sleep(0.3)
    await sync_to_async(_ended_without_its_event)(job)
    status, events = await following
    assert [(seq, kind) for seq, kind, _ in events] == [(1, "job.queued"), (2, "job.completed")]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("stream", ["expired", "kept"])
async def test_websocket_of_an_ended_job_gets_its_end_and_is_closed(cast, sent_tasks, stream):
    from channels.testing import WebsocketCommunicator

    from inference.events import stream_key
    from portal.asgi import application

    job = (await sync_to_async(video_job_submit)(await sync_to_async(api_key_obj)(cast.tenant))).job
    await sync_to_async(_ended_without_its_event)(job)
    if stream == "expired":
        await sync_to_async(redis_client().delete)(stream_key(job.pk), f"{stream_key(job.pk)}:seq")
    socket = WebsocketCommunicator(application, f"/ws/jobs/{job.pk}/",
                                   headers=[(b"authorization", f"Bearer {cast.owner_key}".encode())])
    assert (await socket.connect())[0]
    received = []
    while (message := await socket.receive_output(timeout=5))["type"] == "websocket.send":
        received.append(json.loads(message["text"]))
    assert message["type"] == "websocket.close" and message.get("code", 1000) == 1000
    expected = [(1, "job.completed")] if stream == "expired" else [(1, "job.queued"), (2, "job.completed")]
    assert [(event["seq"], event["type"]) for event in received] == expected
    assert received[-1]["data"]["status"] == "succeeded"

    resumed = WebsocketCommunicator(application, f"/ws/jobs/{job.pk}/?after={expected[-1][0]}",
                                    headers=[(b"authorization", f"Bearer {cast.owner_key}".encode())])
    assert (await resumed.connect())[0]
    message = await resumed.receive_output(timeout=5)  # nothing after the end it had
    assert message["type"] == "websocket.close" and message.get("code", 1000) == 1000

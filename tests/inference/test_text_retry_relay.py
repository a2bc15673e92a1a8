"""A text stream whose worker was lost mid-stream: the redelivered attempt generates from the
start again, and the client, who already holds the lost attempt's text, is sent only what
follows it (inference/text_apis.py, _RetryRelay)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from asgiref.sync import sync_to_async

from inference.events import event_publish
from inference.models import Job
from inference.text_apis import _RetryRelay, _Shape, _stream
from tests.factories import api_key_obj, tenant_with_limits, video_job_submit


@pytest.mark.parametrize(("deltas", "client_text", "diverged"), [
    # No retry: everything as it comes.
    (["def f", "():", "\n    return 1"], "def f():\n    return 1", False),
    # The retry repeats the lost attempt's text in other pieces, then goes on.
    (["def f", "():", None, "de", "f f()", ":\n    return 1"], "def f():\n    return 1", False),
    # A retry before anything was sent is an ordinary stream.
    ([None, "def f", "():"], "def f():", False),
    # Sampling took another path: nothing of it goes out.
    (["def f", "():", None, "class"], "def f():", True),
    (["def foo", None, "def f", "a"], "def foo", True),  # wrong while still behind
    (["def f", None, "def f", "oo", "()"], "def foo()", False),  # a longer name is still a continuation
    # Lost twice.
    (["a", "b", None, "a", None, "ab", "c"], "abc", False),
])
def test_the_relay_sends_only_what_the_client_has_not_seen(deltas, client_text, diverged):
    relay, sent = _RetryRelay(), ""
    for delta in deltas:
        if delta is None:
            relay.restart()
            continue
        out = relay.delta(delta)
        if relay.diverged:
            break
        sent += out
    assert (sent, relay.diverged) == (client_text, diverged)


def _publish(job: Job, events: list[tuple[str, dict]]) -> None:
    for event_type, data in events:
        event_publish(job_id=job.pk, tenant_id=job.tenant_id, event_type=event_type, data=data)


async def _client_sees(job: Job) -> tuple[str, list[dict]]:
    """The completion stream's text as a client concatenates it, and its error objects."""
    shape = _Shape(chat=False, job=job, served_name="sluice-code-tiny")
    text, errors = "", []
    async for piece in _stream(job, shape, SimpleNamespace(include_usage=False)):
        for line in piece.splitlines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                errors.append(chunk["error"])
            else:
                text += chunk["choices"][0]["text"]
    return text, errors


LOST = ("job.queued", {"status": "queued", "reason": "worker_lost", "attempt": 1})
STARTED = ("job.started", {"status": "running"})


@pytest.mark.django_db(transaction=True)
async def test_a_stream_whose_worker_was_lost_reads_as_one_completion(sent_tasks):
    api_key = await sync_to_async(api_key_obj)(await sync_to_async(tenant_with_limits)(budget_cu=100))
    job = (await sync_to_async(video_job_submit)(api_key, cu=1)).job
    result = {"text": "def f():\n    return 1", "finish_reason": "stop"}
    await sync_to_async(_publish)(job, [
        STARTED, ("job.output", {"delta": "def f"}), ("job.output", {"delta": "():"}),
        LOST, STARTED, ("job.output", {"delta": "def f():"}), ("job.output", {"delta": "\n    return 1"}),
        ("job.completed", {"status": "succeeded", "result": result, "usage": {}}),
    ])
    assert await _client_sees(job) == (result["text"], [])


@pytest.mark.django_db(transaction=True)
async def test_a_retry_that_says_something_else_ends_the_stream_and_is_cancelled(sent_tasks):
    api_key = await sync_to_async(api_key_obj)(await sync_to_async(tenant_with_limits)(budget_cu=100))
    job = (await sync_to_async(video_job_submit)(api_key, cu=1)).job
    await sync_to_async(_publish)(job, [
        STARTED, ("job.output", {"delta": "def f():"}),
        LOST, STARTED, ("job.output", {"delta": "class A:"}),
    ])
    text, errors = await _client_sees(job)
    assert text == "def f():"
    assert [error["code"] for error in errors] == ["worker_lost"]
    # The retry nobody reads any more is stopped (this one had not started: a full refund).
    deadline = asyncio.get_running_loop().time() + 10
    while (await Job.objects.aget(pk=job.pk)).status != Job.Status.CANCELLED:
        assert asyncio.get_running_loop().time() < deadline, "the job was not cancelled"
        await asyncio.sleep(0.1)

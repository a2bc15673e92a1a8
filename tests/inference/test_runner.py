"""The worker's job runner (inference/runner.py) running text jobs in-process, on threads as a
`--pool threads` worker does, against a stand-in for the vLLM server that streams when told."""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from inference.events import TERMINAL_EVENTS, events_read
from inference.models import Job
from inference.runner import ATTEMPT_CHECK_S, job_run
from inference.services import HEARTBEAT_KEY, job_cancel, job_recover_lost, text_job_create
from quotas.models import LedgerEntry
from tests.factories import api_key_obj, tenant_with_limits
from tests.inference.test_jobs import within


class StreamingEngine:
    """Answers the n-th completion request with lines of code naming it (`total += a<n>_<i>`):
    one at once, then - once `release(n)` was called - one every `chunk_every_s` until the
    client hangs up (or `chunks` more went out, then the stream finishes)."""

    def __init__(self) -> None:
        self.chunk_every_s = 0.05
        self.chunks = 200
        self.requests = 0
        self._gates: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        engine = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # a chunked stream, read chunk by chunk, as vLLM's

            def do_GET(self):  # noqa: N802 - the stdlib's name; /health
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with engine._lock:
                    engine.requests += 1
                    number = engine.requests
                gate = engine._gate(number)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    self._chunk(self._line(number, 0))
                    gate.wait(120)
                    for line in range(1, engine.chunks + 1):
                        time.sleep(engine.chunk_every_s)
                        self._chunk(self._line(number, line))
                    self._chunk({"choices": [{"text": "", "finish_reason": "length"}],
                                 "usage": {"prompt_tokens": 3, "completion_tokens": engine.chunks + 1}})
                    self._write(b"data: [DONE]\n\n")
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the worker stopped the stream

            @staticmethod
            def _line(number: int, line: int) -> dict:
                return {"choices": [{"text": f"total += a{number}_{line}\n", "token_ids": [1]}]}

            def _chunk(self, body: dict) -> None:
                self._write(f"data: {json.dumps(body)}\n\n".encode())

            def _write(self, data: bytes) -> None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def _gate(self, number: int) -> threading.Event:
        with self._lock:
            return self._gates.setdefault(number, threading.Event())

    def release(self, number: int) -> None:
        self._gate(number).set()

    def __enter__(self) -> StreamingEngine:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for gate in list(self._gates.values()):
            gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def streaming_engine(settings):
    from inference.registry import model_get

    with StreamingEngine() as engine:
        served = model_get("sluice-code-tiny").variant("full").served_name
        settings.SLUICE_VLLM_URLS = {served: engine.url}
        yield engine


def attempts_streamed(events) -> set[str]:
    """Whose text the job.output events carry: {"a1", "a2"} for both attempts'."""
    return {name for event in events if event.type == "job.output"
            for name in re.findall(r"\b(a\d+)_", event.data["delta"])}


@pytest.mark.django_db(transaction=True)  # the runs and the watcher read on their own connections
def test_two_attempts_of_one_job_in_one_worker_process_are_watched_apart(
        settings, sent_tasks, clean_redis, streaming_engine):
    """A text worker (`--pool threads`) can run two attempts of one job at once: the reaper took
    the first for lost while it still streamed, and the second landed on the same process. The
    first is stopped as superseded and publishes nothing more; the second, which owns the job,
    keeps its heartbeat when the first ends, and its cancel flag. (Watched by job id alone, the
    second attempt's entry hid the first from the attempt check, so the first streamed on into
    the job's stream; the first's end then took the second's heartbeat and cancel flag away.)"""
    from django.db import connection

    from moderation.classifier import classifier_preload

    classifier_preload()  # as a worker does before its first job: the streams' checks need it
    settings.SLUICE_JOB_HEARTBEAT_TTL_S = 2  # a beat every second
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    job = text_job_create(api_key=api_key, payload={"model": "sluice-code-tiny", "prompt": "x = 1",
                                                    "max_tokens": 400}).job
    heartbeat = HEARTBEAT_KEY.format(job_id=job.pk)

    def beating_attempt() -> int | None:
        beat = clean_redis.get(heartbeat)
        return None if beat is None else int(beat)

    def run(attempt: int) -> str:
        try:
            return job_run(job_id=job.pk, attempt=attempt)
        finally:
            connection.close()  # this thread's

    with ThreadPoolExecutor(max_workers=2) as worker:
        first: Future = worker.submit(run, 1)
        assert within(20, lambda: "a1" in attempts_streamed(events_read(job_id=job.pk)))
        # What the reaper does once the first attempt's heartbeat has been missing for a TTL.
        assert job_recover_lost(job=Job.objects.get(pk=job.pk)) == "requeued"
        requeued_at = events_read(job_id=job.pk)[-1].seq
        streaming_engine.release(2)  # the second attempt streams on until it is stopped
        second: Future = worker.submit(run, 2)
        assert within(10, lambda: "a2" in attempts_streamed(events_read(job_id=job.pk)))
        assert beating_attempt() == 2

        time.sleep(2.5 * ATTEMPT_CHECK_S)  # the watcher's attempt check has run since
        streaming_engine.release(1)  # the first attempt reads its next chunk
        first.result(timeout=20)
        after_requeue = events_read(job_id=job.pk, after_seq=requeued_at)
        assert attempts_streamed(after_requeue) == {"a2"}  # nothing of the first after it lost the job
        assert first.result() == "superseded"
        assert not second.done(), f"the second attempt ended: {second.result()}"

        clean_redis.delete(heartbeat)
        assert within(3, lambda: beating_attempt() == 2)  # the second beats on

        job_cancel(job=Job.objects.get(pk=job.pk))
        assert second.result(timeout=20) == "cancelled"

    events = events_read(job_id=job.pk)
    after_requeue = [event for event in events if event.seq > requeued_at]
    assert attempts_streamed(after_requeue) == {"a2"}
    assert [event.data["attempt"] for event in after_requeue if event.type == "job.started"] == [2]
    assert [event.type for event in events if event.type in TERMINAL_EVENTS] == ["job.cancelled"]
    job.refresh_from_db()
    assert (job.status, job.attempts) == ("cancelled", 2)
    assert LedgerEntry.objects.filter(reservation__job=job, kind="settle").count() == 1


@pytest.mark.django_db
def test_a_publish_sent_again_after_its_reply_was_lost_reaches_the_stream_once(
        sent_tasks, clean_redis, streaming_engine, monkeypatch):
    """Redis appended a chunk of the text, and the worker never heard back (a timeout reading
    the reply): the runner publishes it again. A follower (SSE, websocket, a completion's relay)
    relays what the stream holds: the chunk appended twice was relayed twice, and the client's
    text came out corrupted. The same event (its attempt and its number within the attempt)
    is appended once, and the job goes on."""
    import redis

    from portal.redis import redis_client

    streaming_engine.chunks, streaming_engine.chunk_every_s = 30, 0.01
    streaming_engine.release(1)
    client = redis_client()
    evalsha = client.evalsha
    lost_replies: list[int] = []

    def reply_lost_once(sha, numkeys, *keys_and_args):  # what the server ran, the client missed
        reply = evalsha(sha, numkeys, *keys_and_args)
        if "job.output" in keys_and_args and not lost_replies:
            lost_replies.append(reply[0])
            raise redis.TimeoutError("Timeout reading from 127.0.0.1:6379")
        return reply

    monkeypatch.setattr(client, "evalsha", reply_lost_once)
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    job = text_job_create(api_key=api_key, payload={"model": "sluice-code-tiny", "prompt": "x = 1",
                                                    "max_tokens": 400}).job
    assert job_run(job_id=job.pk, attempt=1) == "succeeded"

    assert lost_replies  # the reply of a job.output, lost after the server appended it
    events = events_read(job_id=job.pk)
    assert [event.seq for event in events] == list(range(1, len(events) + 1))
    job.refresh_from_db()
    streamed = "".join(event.data["delta"] for event in events if event.type == "job.output")
    assert streamed == job.result["text"]
    assert streamed == "".join(f"total += a1_{line}\n" for line in range(31))

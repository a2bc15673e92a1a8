"""What a GPU worker does with one job: claim it, keep its heartbeat, run the engine with
progress/output/stop hooks, then finish, cancel or fail it through the job services."""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass

import redis
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from inference.engines import engine_for
from inference.engines.base import RunContext
from inference.registry import model_get
from inference.services import (
    job_attempt_outputs_discard,
    job_cancel_requested,
    job_cancelled,
    job_claim,
    job_fail,
    job_max_run_s,
    job_output,
    job_preview,
    job_progress,
    job_started,
    job_succeed,
    job_timeout_message,
    jobs_cancel_requested,
    jobs_heartbeat,
    jobs_superseded,
)
from portal.logs import log_context

logger = logging.getLogger(__name__)

# The job row's `progress` (for pollers) is written at most this often; followers get every
# step from the stream, and the finish sets 100.
PROGRESS_ROW_INTERVAL_S = 1.0


# How often the process reads its jobs' cancel flags: the most a cancel waits to be seen.
CANCEL_POLL_S = 0.05
# How often the process asks the database whether its jobs are still its own (see
# _RunningJobs): the most a superseded attempt goes on publishing. One query for all its jobs.
ATTEMPT_CHECK_S = 1.0

# Why the watcher stopped a job (the engine sees it as a cancel; the runner ends it otherwise).
SUPERSEDED = "superseded"
TIMED_OUT = "timed_out"  # it ran past its pool's SLUICE_JOB_MAX_RUN_S


@dataclass
class _Run:
    """One attempt of a job running in this process. A worker with a thread pool (the text
    pools) can run two attempts of one job at once: the reaper took the first for lost and the
    next landed here. Each has its own deadline, cancel flag and stop reason."""

    deadline: float  # when (monotonic) it has run too long
    watch_cancel: bool  # its cancel flag is read here (a text stream's should_stop)
    cancel_requested: bool = False
    stopped: str | None = None  # why the watcher stopped it


class _RunningJobs:
    """The jobs this process is running, watched by one thread: their cancel flags read in one
    round trip every CANCEL_POLL_S (a text stream's `should_stop()` is then a dict read, where
    it was a Redis call per stream per poll), their heartbeats refreshed in one round trip every
    third of the heartbeat TTL (where each job had a thread of its own). The thread dies with
    the process, and so do the heartbeats: a lost worker's jobs still expire to the reaper.

    A worker cut off from Redis for longer than the TTL is taken for lost by the reaper, which
    queues its jobs again, while the worker itself runs on. Every ATTEMPT_CHECK_S the thread
    asks the database whether each job is still at the attempt it runs here, and stops (as a
    cancel stops it) the ones that are not: that attempt ends nothing, publishes nothing more,
    and no longer beats, so the attempt now running owns the job alone - even when that
    attempt runs in this process too: runs are told apart by (job id, attempt)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[tuple[str, int], _Run] = {}  # (job id, attempt) -> its run here
        self._busy = threading.Event()
        self._pid: int | None = None

    def add(self, job_id: str, *, attempt: int, watch_cancel: bool,
            max_run_s: float = float("inf")) -> None:
        with self._lock:
            if self._pid != os.getpid():  # first job here, or a forked child: start its threads
                self._pid = os.getpid()
                threading.Thread(target=self._watch, daemon=True, name="job-watch").start()
                # Apart: a database that hangs (a half-open connection after a failover) must
                # not hold up the heartbeats, or every job here would be taken for lost.
                threading.Thread(target=self._check_attempts, daemon=True,
                                 name="job-attempts").start()
            self._runs[job_id, attempt] = _Run(deadline=time.monotonic() + max_run_s,
                                               watch_cancel=watch_cancel)
            self._busy.set()

    def remove(self, job_id: str, *, attempt: int) -> str | None:
        """The attempt is no longer watched; returns why the watcher stopped it, if it did."""
        with self._lock:
            run = self._runs.pop((job_id, attempt), None)
            if not self._runs:
                self._busy.clear()
            return run.stopped if run is not None else None

    def cancel_requested(self, job_id: str, *, attempt: int) -> bool:
        run = self._runs.get((job_id, attempt))
        return run is not None and (run.cancel_requested or run.stopped is not None)

    def stop_reason(self, job_id: str, *, attempt: int) -> str | None:
        run = self._runs.get((job_id, attempt))
        return run.stopped if run is not None else None

    def _stop(self, runs: set[tuple[str, int]], reason: str) -> None:
        with self._lock:
            for key in runs:
                run = self._runs.get(key)  # not one that ended meanwhile
                if run is not None and run.stopped is None:
                    run.stopped = reason

    def _running(self) -> dict[tuple[str, int], _Run]:
        """The runs here not stopped by the watcher."""
        with self._lock:
            return {key: run for key, run in self._runs.items() if run.stopped is None}

    def _check_attempts(self) -> None:
        """Every ATTEMPT_CHECK_S, stop the runs whose job the row says another attempt now
        runs. The first round checks at once: the thread's database connection opens with the
        process's first job and is kept, not opened by some later job."""
        while True:
            self._busy.wait()
            runs = set(self._running())
            if runs:
                try:
                    superseded = jobs_superseded(runs=runs)
                except Exception:  # the database unreachable: keep running, ask again
                    logger.warning("checking %d running jobs' attempts failed", len(runs),
                                   exc_info=True)
                    close_old_connections()  # a broken connection is replaced next round
                else:
                    if superseded:
                        logger.warning("jobs %s were handed to another attempt: stopping them",
                                       sorted(superseded))
                        self._stop(superseded, SUPERSEDED)
            time.sleep(ATTEMPT_CHECK_S)

    def _watch(self) -> None:
        beat_every = max(1.0, settings.SLUICE_JOB_HEARTBEAT_TTL_S / 3)
        next_beat = time.monotonic() + beat_every
        while True:
            self._busy.wait()
            time.sleep(CANCEL_POLL_S)
            running = self._running()
            if not running:
                continue
            watched = sorted({job_id for (job_id, _), run in running.items() if run.watch_cancel})
            now = time.monotonic()
            overdue = {key for key, run in running.items() if run.deadline < now}
            if overdue:
                # Stopped as a cancel stops it, and no longer beating: should its engine not
                # stop, the reaper takes it for lost and fails it as overdue.
                logger.warning("jobs %s ran past their pool's limit: stopping them", sorted(overdue))
                self._stop(overdue, TIMED_OUT)
            try:
                if watched:
                    cancelled = jobs_cancel_requested(job_ids=watched)
                    with self._lock:
                        for (job_id, _), run in self._runs.items():
                            if job_id in cancelled and run.watch_cancel:
                                run.cancel_requested = True
            except Exception:  # Redis hiccup: the next round retries
                logger.warning("reading %d cancel flags failed", len(watched), exc_info=True)
            # Not those stopped meanwhile (here or there). The job's heartbeat names the newest
            # attempt running here: an older one still here is one the row has left behind.
            beating: dict[str, int] = {}
            for job_id, attempt in self._running():
                beating[job_id] = max(attempt, beating.get(job_id, attempt))
            if time.monotonic() >= next_beat and beating:
                try:
                    jobs_heartbeat(attempts=beating)
                    next_beat = time.monotonic() + beat_every
                except Exception:  # Redis hiccup: the next round (CANCEL_POLL_S) retries
                    logger.warning("heartbeats of %d running jobs failed", len(beating),
                                   exc_info=True)


_running = _RunningJobs()


def output_moderator_for(job):
    from moderation.cascade import OutputModerator
    from moderation.models import SafetyPolicy
    from moderation.selectors import safety_policy_for_tenant

    snapshot = job.params.get("safety_policy")
    # Jobs queued before jobs carried their policy look it up.
    policy = (SafetyPolicy.from_snapshot(snapshot) if snapshot
              else safety_policy_for_tenant(tenant=job.tenant))
    return OutputModerator(policy=policy)


def output_case_open(*, job, verdict, text: str) -> None:
    """A stream stopped by output moderation opens a case, like a blocked prompt does."""
    from moderation.models import ModerationCase
    from moderation.services import case_open

    case_open(tenant=job.tenant, api_key=job.api_key, verdict=verdict, text=text,
              source=ModerationCase.Source.OUTPUT, endpoint=f"jobs:{job.kind}", request_id=job.pk,
              job_id=job.pk)  # a redelivered job's second run opens no second case


def job_run(*, job_id: str, attempt: int) -> str:
    # Every line logged while the job runs names it (portal/logs.py).
    with log_context(job_id=job_id):
        job = job_claim(job_id=job_id, attempt=attempt, announce=False)
        if job is None:
            return "skipped"  # cancelled, finished, or a stale redelivery
        with log_context(tenant_id=job.tenant_id, pool=job.pool):
            return _job_run_claimed(job)


# A Redis call made while the engine runs (an event, a cancel check) is retried after these
# pauses, then given up; after giving up, the job's hooks skip Redis for REDIS_QUIET_S, so a
# Redis that is down costs a stream the retries once in a while, not on every token.
REDIS_RETRY_DELAYS_S = (0.05, 0.25)
REDIS_QUIET_S = 2.0


class _BestEffortRedis:
    """The Redis calls of a running job's hooks, best effort: a brief Redis error must not fail
    a job whose engine is fine. Its state is the row's (PostgreSQL); what is lost is a few
    stream events, and its end is still announced (`terminal_event_pending`, the reaper).
    Only RedisError is absorbed: anything else is the engine's or the database's, and fails
    the job as before."""

    def __init__(self, job_id: str):
        self._job_id = job_id
        self._quiet_until = 0.0
        self._event_seqs = itertools.count(1)

    def publish(self, what: str, publish) -> None:
        """Publish one event of the job's stream, `publish(attempt_seq)`, retried as any call.
        A retry after an error whose reply was lost (a timeout after Redis appended it) is
        the same event, numbered once: it is appended once (events.event_publish), where a
        follower relayed its tokens twice."""
        attempt_seq = next(self._event_seqs)
        self(what, lambda: publish(attempt_seq))

    def __call__(self, what: str, call, default=None):
        if time.monotonic() < self._quiet_until:
            return default
        for delay in (*REDIS_RETRY_DELAYS_S, None):
            try:
                return call()
            except redis.RedisError:
                if delay is None:
                    logger.warning("job %s: Redis failed on %s; the job goes on without it",
                                   self._job_id, what, exc_info=True)
                    self._quiet_until = time.monotonic() + REDIS_QUIET_S
                    return default
                time.sleep(delay)
        return default


class _Announcement:
    """`job.started` (job_started), at most once: when the engine has the work, and in any
    case before the job's first output, progress or end, so its stream stays in order."""

    def __init__(self, job, redis_calls: _BestEffortRedis):
        self._job = job
        self._redis_calls = redis_calls
        self.done = False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self._redis_calls.publish(
                "job.started", lambda attempt_seq: job_started(job=self._job, attempt_seq=attempt_seq))


def _job_run_claimed(job) -> str:
    spec = model_get(job.model)
    redis_calls = _BestEffortRedis(job.pk)
    announce = _Announcement(job, redis_calls)
    first_output_at = [None]

    def superseded() -> bool:
        # Another attempt owns the job now: nothing more of this one reaches its stream.
        return _running.stop_reason(job.pk, attempt=job.attempts) == SUPERSEDED

    def emit_output(data: dict) -> None:
        if superseded():
            return
        announce()
        if first_output_at[0] is None:
            first_output_at[0] = timezone.now()
        redis_calls.publish("job.output",
                            lambda attempt_seq: job_output(job=job, data=data, attempt_seq=attempt_seq))

    progress_saved_at = [float("-inf")]

    def emit_progress(progress: float, data: dict) -> None:
        if superseded():
            return
        announce()
        now = time.monotonic()
        persist = now - progress_saved_at[0] >= PROGRESS_ROW_INTERVAL_S
        if persist:
            progress_saved_at[0] = now
        redis_calls.publish("job.progress", lambda attempt_seq: job_progress(
            job=job, progress=progress, data=data, persist=persist, attempt_seq=attempt_seq))

    def emit_preview(data: dict) -> None:
        if superseded():
            return
        announce()
        redis_calls.publish("job.preview",
                            lambda attempt_seq: job_preview(job=job, data=data, attempt_seq=attempt_seq))

    def started() -> None:
        if not superseded():
            announce()

    context = RunContext(
        job_id=job.pk,
        params=job.params,
        variant=job.variant,
        emit_progress=emit_progress,
        emit_output=emit_output,
        # A text stream checks on every chunk: the watcher's flag (at most CANCEL_POLL_S late).
        # A video checks once per denoising step, a step is long, and its cancel is promised
        # within one step: it reads Redis (and the watcher's flag).
        should_stop=(lambda: _running.cancel_requested(job.pk, attempt=job.attempts))
        if spec.kind == "text"
        else (lambda: _running.cancel_requested(job.pk, attempt=job.attempts) or redis_calls(
            "the cancel check", lambda: job_cancel_requested(job_id=job.pk), default=False)),
        output_moderator=output_moderator_for(job) if spec.kind == "text" else None,
        emit_preview=emit_preview,
        started=started,
        attempt=job.attempts,
    )
    _running.add(job.pk, attempt=job.attempts, watch_cancel=spec.kind == "text",
                 max_run_s=job_max_run_s(job.pool))
    error: Exception | None = None
    try:
        outcome = engine_for(spec).run(context)
    except Exception as exc:
        error = exc
    stopped_by = _running.remove(job.pk, attempt=job.attempts)
    if stopped_by == SUPERSEDED:
        # Not ended here: `_finish` would refuse it anyway (the row is at another attempt),
        # and the attempt now running settles and announces the job.
        logger.warning("job %s: attempt %s stopped, the job was handed to another attempt",
                       job.pk, job.attempts)
        if error is None:  # it may have stored its video before it was stopped
            job_attempt_outputs_discard(job=job, result=outcome.result)
        return "superseded"
    if stopped_by == TIMED_OUT and (error is not None or outcome.stopped):
        # Stopped for running too long (a job that finished as the limit passed succeeds).
        logger.warning("job %s ran past its pool's limit and was stopped", job.pk)
        announce()
        job_fail(job=job, code="job_timeout", message=job_timeout_message(job.pool),
                 actual_mcu=outcome.actual_mcu if error is None else 0,
                 usage=outcome.usage if error is None else None,
                 first_output_at=first_output_at[0])
        return "failed"
    if error is not None:
        logger.error("engine failed on %s", job.pk, exc_info=error)
        announce()
        job_fail(job=job, code="engine_error", message=f"{error.__class__.__name__}: {error}",
                 first_output_at=first_output_at[0])
        return "failed"
    announce()
    moderator = context.output_moderator
    if moderator is not None and moderator.stopped:
        output_case_open(job=job, verdict=moderator.verdict, text=moderator.text)
    if outcome.stopped:
        job_cancelled(job=job, actual_mcu=outcome.actual_mcu, usage=outcome.usage, result=outcome.result,
                      first_output_at=first_output_at[0])
        return "cancelled"
    if not job_succeed(job=job, actual_mcu=outcome.actual_mcu, result=outcome.result,
                       usage=outcome.usage, first_output_at=first_output_at[0]):
        return "superseded"  # ended by another attempt (or for it): its files went (job_succeed)
    return "succeeded"

"""The job spine without a worker: submit, idempotency, state machine, scheduling order,
cancellation, recovery. (Real workers run in test_worker.py.)"""

from __future__ import annotations

import pytest
import redis
from django.utils import timezone

from inference.models import Job
from inference.runner import job_run
from inference.scheduler import scheduler_dispatch, scheduler_enqueue
from inference.services import (
    job_cancel,
    job_cancelled,
    job_claim,
    job_fail,
    job_recover_lost,
    job_succeed,
    jobs_reap,
    pool_dispatch,
)
from portal.redis import redis_client
from quotas.ledger import budget_used_from_ledger
from quotas.limits import period_of
from quotas.models import LedgerEntry
from tests.factories import VIDEO_JOB_PARAMS, api_key_obj, tenant_with_limits, video_job_submit

pytestmark = pytest.mark.django_db


def used(tenant_id):
    return budget_used_from_ledger(tenant_id=tenant_id, period=period_of(timezone.now()))[0]


def heartbeat_lost(job, seconds_ago: float = 60) -> None:
    """The job's worker stopped beating `seconds_ago`, and the reaper has seen it missing since."""
    import time

    from inference.services import HEARTBEAT_MISSING_KEY

    redis_client().delete(f"s:hb:{job.pk}")
    redis_client().set(HEARTBEAT_MISSING_KEY.format(job_id=job.pk), time.time() - seconds_ago)
    Job.objects.filter(pk=job.pk).update(
        started_at=timezone.now() - timezone.timedelta(seconds=seconds_ago))


def within(seconds: float, predicate) -> bool:
    """Whether `predicate()` turns true within `seconds` (polled every 20 ms)."""
    import time as clock

    deadline = clock.monotonic() + seconds
    while clock.monotonic() < deadline:
        if predicate():
            return True
        clock.sleep(0.02)
    return False


def test_submit_reserves_and_sends_the_job_to_its_pool(sent_tasks):
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    job = video_job_submit(api_key, cu=3).job
    assert job.status == "queued" and job.pool == "video-hbm" and job.estimated_mcu == 3000
    assert job.reservation.reserved_mcu == 3000 and used(api_key.tenant_id) == 3000
    assert sent_tasks == [(job.pk, 1, "video-hbm")]
    assert job.pk.startswith("job_") and len(job.pk) == 30


def test_a_job_that_cannot_be_stored_leaves_no_reservation_behind(sent_tasks, clean_redis):
    """The reservation, its ledger row and the job commit together; when the job's row fails,
    Redis gives back what admission reserved, so counters and ledger agree."""
    from quotas.limits import CounterKeys
    from quotas.models import Reservation

    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    video_job_submit(api_key, cu=2)  # counters exist: 2 CU used
    keys = CounterKeys(tenant_id=api_key.tenant_id, api_key_id=api_key.pk,
                       period=period_of(timezone.now()), pool="video-hbm")
    with pytest.raises(TypeError):
        video_job_submit(api_key, cu=5, params={"unstorable": object()}, request_body={"p": 1})
    assert int(clean_redis.get(keys.budget)) == 2000 == used(api_key.tenant_id)
    assert clean_redis.zcard(keys.in_flight) == 1 and int(clean_redis.get(keys.pool_sum)) == 2000
    assert Reservation.objects.filter(tenant_id=api_key.tenant_id).count() == 1
    assert Job.objects.filter(tenant_id=api_key.tenant_id).count() == 1


def test_idempotency_key_returns_the_same_job_or_409(sent_tasks):
    from inference.errors import IdempotencyConflict

    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    first = video_job_submit(api_key, idempotency_key="k-1", request_body={"prompt": "a"})
    again = video_job_submit(api_key, idempotency_key="k-1", request_body={"prompt": "a"})
    assert again.replayed and again.job.pk == first.job.pk
    assert Job.objects.count() == 1 and used(api_key.tenant_id) == 1000  # charged once
    with pytest.raises(IdempotencyConflict) as exc:
        video_job_submit(api_key, idempotency_key="k-1", request_body={"prompt": "b"})
    assert exc.value.http_status == 409
    # Keys are per tenant: another tenant may use the same key.
    other = api_key_obj(tenant_with_limits(budget_cu=100))
    assert video_job_submit(other, idempotency_key="k-1", request_body={"prompt": "a"}).job.pk != first.job.pk


def test_state_machine_refuses_illegal_moves(sent_tasks):
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    job = video_job_submit(api_key).job
    assert job_claim(job_id=job.pk, attempt=2) is None  # not the attempt that was sent
    claimed = job_claim(job_id=job.pk, attempt=1)
    assert claimed.status == "running" and claimed.attempts == 1
    assert job_claim(job_id=job.pk, attempt=1) is None  # a duplicate delivery
    assert job_succeed(job=claimed, actual_mcu=500, result={"video": "x"}, usage={}) is True
    assert job_succeed(job=claimed, actual_mcu=900, result={}, usage={}) is False
    assert job_fail(job=claimed, code="late", message="no") is False
    claimed.refresh_from_db()
    assert claimed.status == "succeeded" and claimed.actual_mcu == 500
    from inference.errors import JobNotCancellable

    with pytest.raises(JobNotCancellable):
        job_cancel(job=claimed)
    assert used(api_key.tenant_id) == 500
    assert LedgerEntry.objects.filter(reservation=claimed.reservation, kind="settle").count() == 1


def test_cancel_queued_job_never_starts_and_is_refunded(settings, sent_tasks):
    settings.SLUICE_POOL_SLOTS = {"video-hbm": 1}
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    running = video_job_submit(api_key).job
    waiting = video_job_submit(api_key, cu=5).job
    assert [job_id for job_id, *_ in sent_tasks] == [running.pk]  # the pool has one slot
    job_cancel(job=waiting)
    waiting.refresh_from_db()
    assert waiting.status == "cancelled" and waiting.actual_mcu == 0
    assert not redis_client().hexists("s:jobs:video-hbm", waiting.pk)  # out of the scheduler
    assert used(api_key.tenant_id) == 1000
    # When the running job ends, the cancelled one is not dispatched.
    job_succeed(job=job_claim(job_id=running.pk, attempt=1), actual_mcu=1000, result={}, usage={})
    assert [job_id for job_id, *_ in sent_tasks] == [running.pk]
    # A late delivery of the cancelled job does nothing.
    assert job_run(job_id=waiting.pk, attempt=1) == "skipped"


def test_cancel_running_job_raises_the_stop_flag(sent_tasks):
    from inference.services import job_cancel_requested

    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    job = job_claim(job_id=video_job_submit(api_key).job.pk, attempt=1)
    assert not job_cancel_requested(job_id=job.pk)
    job_cancel(job=job)
    assert job_cancel_requested(job_id=job.pk)
    job.refresh_from_db()
    assert job.status == "running" and job.cancel_requested_at is not None


def test_a_cancel_that_read_the_job_queued_stops_it_when_a_worker_claimed_it_meanwhile(sent_tasks):
    """The canceller read the job while it was queued; a worker claims it before the cancel
    lands. The job must be stopped as a running job (its flag raised), not closed as a queued
    one: that left the worker generating to the end for nobody, its tokens never billed (its
    own finish found the job already closed)."""
    from inference.services import job_cancel_requested

    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    read_while_queued = video_job_submit(api_key).job
    assert read_while_queued.status == "queued"
    claimed = job_claim(job_id=read_while_queued.pk, attempt=1)
    job_cancel(job=read_while_queued)
    assert job_cancel_requested(job_id=claimed.pk)
    claimed.refresh_from_db()
    assert claimed.status == "running" and claimed.cancel_requested_at is not None
    # The worker sees the flag and settles what it used.
    assert job_cancelled(job=claimed, actual_mcu=300, usage={}, result={}) is True
    claimed.refresh_from_db()
    assert claimed.status == "cancelled" and claimed.actual_mcu == 300
    assert used(api_key.tenant_id) == 300


def test_a_job_whose_cancel_redis_refused_is_cancelled_not_started_when_a_worker_gets_it(
        settings, sent_tasks):
    """A cancel whose request was recorded while Redis refused to take the job out of the
    scheduler's queue: once Redis answers, a dispatch round hands the job to a worker. Its claim
    started it (billed for what it ran before its worker saw a flag that was never raised); the
    claim ends it cancelled instead, refunded in full, nothing run, and frees its slot."""
    from inference.events import events_read

    settings.SLUICE_POOL_SLOTS = {"video-hbm": 1}
    api_key = api_key_obj(tenant_with_limits(budget_cu=100, max_jobs=10))
    running = video_job_submit(api_key, cu=2).job
    waiting = video_job_submit(api_key, cu=3).job
    healthy_url, settings.REDIS_URL = settings.REDIS_URL, "redis://127.0.0.1:1/0"
    try:
        with pytest.raises(redis.RedisError):
            job_cancel(job=waiting)
    finally:
        settings.REDIS_URL = healthy_url
    job_succeed(job=job_claim(job_id=running.pk, attempt=1), actual_mcu=2000, result={}, usage={})
    assert [job_id for job_id, *_ in sent_tasks] == [running.pk, waiting.pk]  # still queued there

    assert job_claim(job_id=waiting.pk, attempt=1) is None
    waiting.refresh_from_db()
    assert (waiting.status, waiting.actual_mcu, waiting.attempts, waiting.started_at) == (
        "cancelled", 0, 0, None)
    assert sorted(LedgerEntry.objects.filter(reservation_id=waiting.reservation_id)
                  .values_list("kind", "mcu")) == [("refund", 3000), ("reserve", 3000), ("settle", 0)]
    assert used(api_key.tenant_id) == 2000
    assert [event.type for event in events_read(job_id=waiting.pk)] == ["job.queued", "job.cancelled"]
    assert job_claim(job_id=waiting.pk, attempt=1) is None  # a duplicate delivery: nothing more
    assert LedgerEntry.objects.filter(reservation_id=waiting.reservation_id, kind="settle").count() == 1
    following = video_job_submit(api_key).job
    assert sent_tasks[-1] == (following.pk, 1, "video-hbm")  # its slot was given back


def test_priority_first_then_fair_share_across_tenants(settings, sent_tasks):
    """One slot; a free-tier flood, a pro flood and a light pro tenant: pro before free, and
    the light tenant is not starved behind the pro flood."""
    settings.SLUICE_POOL_SLOTS = {"video-hbm": 1}
    blocker_key = api_key_obj(tenant_with_limits(budget_cu=10_000, max_jobs=100))
    blocker = video_job_submit(blocker_key).job  # holds the only slot
    free_key = api_key_obj(tenant_with_limits(tier_slug="free", budget_cu=10_000, max_jobs=100))
    heavy_key = api_key_obj(tenant_with_limits(budget_cu=10_000, max_jobs=100, rate_cu=100_000))
    light_key = api_key_obj(tenant_with_limits(budget_cu=10_000, max_jobs=100))
    free_jobs = [video_job_submit(free_key).job.pk for _ in range(3)]
    heavy_jobs = [video_job_submit(heavy_key).job.pk for _ in range(6)]
    light_jobs = [video_job_submit(light_key).job.pk for _ in range(2)]

    order = []
    current = blocker
    for _ in range(11):
        job_succeed(job=job_claim(job_id=current.pk, attempt=1), actual_mcu=1000, result={}, usage={})
        current = Job.objects.get(pk=sent_tasks[-1][0])
        order.append(current.pk)
    # Pro (priority 5) before free (priority 1); within pro, the light tenant's two jobs
    # are interleaved near the front rather than after all six heavy ones.
    assert order[-3:] == free_jobs
    pro_order = order[:8]
    assert pro_order.index(light_jobs[0]) <= 1 and pro_order.index(light_jobs[1]) <= 3
    assert [j for j in pro_order if j in heavy_jobs] == heavy_jobs


def test_tenant_at_its_job_cap_does_not_block_others(settings, sent_tasks):
    settings.SLUICE_POOL_SLOTS = {"video-hbm": 3}
    capped_key = api_key_obj(tenant_with_limits(budget_cu=1000, max_jobs=1))
    other_key = api_key_obj(tenant_with_limits(budget_cu=1000, max_jobs=5))
    first = video_job_submit(capped_key).job
    second = video_job_submit(capped_key).job  # waits: its tenant runs one already
    third = video_job_submit(other_key).job
    assert [job_id for job_id, *_ in sent_tasks] == [first.pk, third.pk]
    second.refresh_from_db()
    assert second.status == "queued" and second.reservation.state == "queued"
    job_succeed(job=job_claim(job_id=first.pk, attempt=1), actual_mcu=1000, result={}, usage={})
    assert sent_tasks[-1] == (second.pk, 1, "video-hbm")  # its tenant's slot came free
    second.reservation.refresh_from_db()
    assert second.reservation.state == "admitted"


def test_queue_position_and_eta(settings, sent_tasks):
    from inference.apis import job_queue_info
    from inference.scheduler import scheduler_record_run_time

    settings.SLUICE_POOL_SLOTS = {"video-hbm": 1}
    api_key = api_key_obj(tenant_with_limits(budget_cu=1000, max_jobs=10))
    video_job_submit(api_key)  # holds the slot: 1 CU, none of it done yet
    scheduler_record_run_time(pool="video-hbm", seconds=10, estimated_mcu=1000)
    waiting = [video_job_submit(api_key).job for _ in range(3)]
    assert [job_queue_info(job)["position"] for job in waiting] == [0, 1, 2]
    # The running job's 1 CU, the two ahead's 2 CU, then its own 1 CU, at 1 CU per 10 s.
    assert job_queue_info(waiting[2])["eta_seconds"] == 40.0


def test_reaper_redelivers_lost_jobs_then_fails_them_with_a_refund(settings, sent_tasks):

    settings.SLUICE_JOB_MAX_ATTEMPTS = 2
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    job = video_job_submit(api_key, cu=4).job
    job = job_claim(job_id=job.pk, attempt=1)
    assert jobs_reap() == {}  # heartbeat alive
    heartbeat_lost(job)
    assert jobs_reap() == {"requeued": 1}
    assert sent_tasks[-1] == (job.pk, 2, "video-hbm")
    job = job_claim(job_id=job.pk, attempt=2)
    assert job_claim(job_id=job.pk, attempt=1) is None  # the old message stays dead
    job.refresh_from_db()
    assert job_recover_lost(job=job) == "failed"
    job.refresh_from_db()
    assert (job.status, job.error_code) == ("failed", "worker_lost")
    assert used(api_key.tenant_id) == 0


def test_a_worker_taken_for_lost_cannot_end_the_attempt_that_replaced_it(sent_tasks):
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    first = job_claim(job_id=video_job_submit(api_key, cu=4).job.pk, attempt=1)
    heartbeat_lost(first)  # e.g. its heartbeats could not reach Redis
    assert jobs_reap() == {"requeued": 1}
    assert job_succeed(job=first, actual_mcu=4000, result={"attempt": 1}, usage={}) is False
    second = job_claim(job_id=first.pk, attempt=2)
    assert job_fail(job=first, code="engine_error", message="late") is False
    assert job_succeed(job=second, actual_mcu=1000, result={"attempt": 2}, usage={}) is True
    second.refresh_from_db()
    assert (second.status, second.result, second.actual_mcu) == ("succeeded", {"attempt": 2}, 1000)
    assert used(api_key.tenant_id) == 1000


def counters_match_the_ledger(api_key) -> int:
    """The tenant's and the key's budget counters in Redis, which must be what the ledger says
    they are; returns that figure."""
    from quotas.limits import CounterKeys

    keys = CounterKeys(tenant_id=api_key.tenant_id, api_key_id=api_key.pk,
                       period=period_of(timezone.now()), pool="")
    figures = {int(redis_client().get(keys.budget)), int(redis_client().get(keys.key_used)),
               used(api_key.tenant_id)}
    assert len(figures) == 1, figures
    return figures.pop()


# How the reaper ends a running job whose worker was lost, billing what its attempt produced
# (job_recover_lost): its cancel was requested, or it ran past its pool's SLUICE_JOB_MAX_RUN_S
# (job_timeout, whose message says that what it produced is charged). The status it ends in.
LOST_ATTEMPT_ENDS = {"cancel": "cancelled", "timeout": "failed"}


def lost_attempt_end_arrange(ended_by: str, *, job, pool: str, settings) -> None:
    """What ends `job`'s attempt once its worker is taken for lost (heartbeat_lost: 60 s ago)."""
    if ended_by == "cancel":
        job_cancel(job=job)
    else:
        settings.SLUICE_JOB_MAX_RUN_S = {pool: 30}


def lost_attempt_end_assert(ended_by: str, ended: Job) -> None:
    from inference.services import job_timeout_message

    assert ended.status == LOST_ATTEMPT_ENDS[ended_by]
    if ended_by == "timeout":
        assert (ended.error_code, ended.error_message) == ("job_timeout",
                                                           job_timeout_message(ended.pool))


@pytest.mark.parametrize("ended_by", LOST_ATTEMPT_ENDS)
def test_a_video_whose_worker_was_lost_after_its_cancel_or_limit_is_billed_for_its_steps(
        ended_by, settings, sent_tasks):
    """Cancelled while it ran, and its worker died before it saw the flag: the reaper queued it
    again, its next claim was refused and it was refunded in full, its steps run for free. Past
    its pool's limit as its worker died: failed with job_timeout, charged nothing although its
    message says what it produced is. It is ended as its worker would have ended it: billed
    for the steps its job.progress reported done (the cost model is linear in steps), the rest
    refunded, Redis as the ledger, its pool slot freed; and a worker alive after all cannot
    settle it a second time, nor the reaper again on a read from before the end."""
    from inference.events import events_read
    from inference.registry import model_get
    from inference.services import job_progress, job_started
    from quotas.cost import video_cost
    from quotas.limits import CounterKeys

    spec = model_get("sluice-video-tiny")
    params = {**VIDEO_JOB_PARAMS, "width": 1280, "height": 720, "frames": 80, "steps": 8}
    full = video_cost(spec=spec, width=1280, height=720, frames=80, steps=8).mcu
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    job = job_claim(job_id=video_job_submit(api_key, cu=full / 1000, params=params).job.pk, attempt=1)
    job_started(job=job, attempt_seq=1)  # as the runner publishes its run
    for step in (1, 2, 3):
        job_progress(job=job, progress=step * 12.5, data={"step": step, "steps": 8},
                     attempt_seq=step + 1)
    lost_attempt_end_arrange(ended_by, job=job, pool="video-hbm", settings=settings)
    heartbeat_lost(job)
    read_running = Job.objects.get(pk=job.pk)

    assert jobs_reap() == {LOST_ATTEMPT_ENDS[ended_by]: 1}
    three_steps = video_cost(spec=spec, width=1280, height=720, frames=80, steps=3).mcu
    assert 0 < three_steps < full
    ended = Job.objects.get(pk=job.pk)
    lost_attempt_end_assert(ended_by, ended)
    assert (ended.actual_mcu, ended.usage) == (three_steps, {"steps": 3, "frames": 0})
    assert sorted(LedgerEntry.objects.filter(reservation_id=job.reservation_id)
                  .values_list("kind", "mcu")) == [
        ("refund", full - three_steps), ("reserve", full), ("settle", three_steps)]
    assert counters_match_the_ledger(api_key) == three_steps
    slots = CounterKeys(tenant_id=api_key.tenant_id, api_key_id=api_key.pk, period="", pool="video-hbm")
    assert redis_client().zcard(slots.in_flight) == 0 == int(redis_client().get(slots.pool_sum))
    assert len(sent_tasks) == 1  # not sent again
    assert events_read(job_id=job.pk)[-1].type == f"job.{ended.status}"
    # Its worker, late, ends it as its cancel or its timeout would have: refused.
    assert job_cancelled(job=job, actual_mcu=full, usage={}) is False
    assert job_fail(job=job, code="job_timeout", message="late", actual_mcu=full) is False
    assert job_recover_lost(job=read_running) == "moved"
    assert counters_match_the_ledger(api_key) == three_steps


@pytest.mark.parametrize("ended_by", LOST_ATTEMPT_ENDS)
def test_a_completion_whose_worker_was_lost_after_its_cancel_or_limit_is_billed_for_its_tokens(
        ended_by, settings, sent_tasks):
    """The same for text, on its second attempt (the first was lost without a cancel, within
    the limit, and is not billed, as a redelivered job never is): the prompt and the tokens the
    second attempt's last job.output counted. A cancel here is recorded after the reaper read
    the job running, so its redelivery is refused for it."""
    from inference.registry import model_get
    from inference.services import job_output, job_started, job_submit
    from quotas.cost import text_cost

    spec = model_get("sluice-code-tiny")
    variant = spec.variant("full")
    estimate = text_cost(spec=spec, variant=variant, prompt_tokens=40, completion_tokens=2000)
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    submitted = job_submit(api_key=api_key, spec=spec, variant=variant, mode="async",
                           params={"prompt_token_ids": list(range(40)), "max_tokens": 2000},
                           estimate=estimate).job

    def streamed(job, *, tokens: tuple[int, ...]) -> None:
        job_started(job=job, attempt_seq=1)
        for seq, count in enumerate(tokens, start=2):
            job_output(job=job, data={"delta": "x = 1\n", "tokens": count}, attempt_seq=seq)

    first = job_claim(job_id=submitted.pk, attempt=1)
    streamed(first, tokens=(10, 30, 60))
    heartbeat_lost(first)
    assert jobs_reap() == {"requeued": 1}
    second = job_claim(job_id=submitted.pk, attempt=2)
    streamed(second, tokens=(4, 9))
    heartbeat_lost(second)
    read_running = Job.objects.get(pk=submitted.pk)  # the reaper's read, before a cancel
    lost_attempt_end_arrange(ended_by, job=second, pool="text-batch", settings=settings)

    assert job_recover_lost(job=read_running) == LOST_ATTEMPT_ENDS[ended_by]
    charged = text_cost(spec=spec, variant=variant, prompt_tokens=40, completion_tokens=9).mcu
    ended = Job.objects.get(pk=submitted.pk)
    lost_attempt_end_assert(ended_by, ended)
    assert (ended.attempts, ended.actual_mcu) == (2, charged)
    assert ended.usage == {"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49,
                           "prompt_tokens_details": {"cached_tokens": 0}}
    assert counters_match_the_ledger(api_key) == charged
    assert sent_tasks[-1] == (submitted.pk, 2, "text-batch")  # no third attempt
    assert LedgerEntry.objects.filter(reservation_id=submitted.reservation_id, kind="settle").count() == 1


def test_a_job_that_outlives_its_lease_while_heartbeating_keeps_it_and_is_charged(settings, sent_tasks):
    """A long (or redelivered) job: the reaper pushes its lease out while its worker heartbeats,
    so the orphan sweep does not refund it and its pool slot, and it is charged when it ends."""
    from datetime import timedelta

    from quotas.ledger import reservations_expire
    from quotas.models import Reservation

    settings.SLUICE_POOL_LEASE_S = {"video-hbm": 300}
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    job = job_claim(job_id=video_job_submit(api_key, cu=4).job.pk, attempt=1)
    lease = Reservation.objects.get(pk=job.reservation_id).expires_at
    assert jobs_reap() == {}  # the lease is far from its end: nothing to do
    # 250 s later (the margin is 60 s): the clock is the lease's, moved back instead.
    ending = lease - timedelta(seconds=250)
    Reservation.objects.filter(pk=job.reservation_id).update(expires_at=ending)
    assert jobs_reap() == {"renewed": 1}
    renewed = Reservation.objects.get(pk=job.reservation_id).expires_at
    assert renewed >= timezone.now() + timedelta(seconds=290)
    pool_zset = "q:pz:video-hbm"
    assert redis_client().zscore(pool_zset, job.reservation_id) == int(renewed.timestamp() * 1000)

    assert reservations_expire(now=ending + timedelta(seconds=1)) == 0  # when it would have ended
    assert job_succeed(job=job, actual_mcu=3000, result={}, usage={})
    assert list(LedgerEntry.objects.filter(reservation_id=job.reservation_id)
                .values_list("kind", "mcu").order_by("kind")) == [
        ("refund", 1000), ("reserve", 4000), ("settle", 3000)]
    assert used(api_key.tenant_id) == 3000


def test_a_lost_job_redelivered_gets_a_whole_lease_and_a_silent_one_is_not_renewed(settings, sent_tasks):
    from datetime import timedelta

    from quotas.models import Reservation

    settings.SLUICE_POOL_LEASE_S = {"video-hbm": 300}
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    job = job_claim(job_id=video_job_submit(api_key, cu=4).job.pk, attempt=1)
    almost_over = timezone.now() + timedelta(seconds=5)
    Reservation.objects.filter(pk=job.reservation_id).update(expires_at=almost_over)
    heartbeat_lost(job)  # its worker died
    assert jobs_reap() == {"requeued": 1}  # recovered, not renewed as if it still ran
    assert Reservation.objects.get(pk=job.reservation_id).expires_at >= almost_over + timedelta(seconds=280)


def test_a_queued_job_whose_reservation_ran_out_fails_refunded_and_leaves_the_queue(settings, sent_tasks):
    """It waited its whole allowance for capacity (or was admitted and no worker took it): it
    ends as failed/queue_timeout with a full refund, a job.failed event, and out of the
    scheduler, whether the reaper or the orphan sweep gets to its reservation first."""
    from datetime import timedelta

    from inference.events import events_read
    from quotas.ledger import reservations_expire
    from quotas.models import Reservation

    settings.SLUICE_POOL_SLOTS = {"video-hbm": 1}
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    running = video_job_submit(api_key).job
    waiting = [video_job_submit(api_key, cu=2).job for _ in range(3)]
    assert [job_id for job_id, *_ in sent_tasks] == [running.pk]
    past = timezone.now() - timedelta(seconds=1)
    Reservation.objects.filter(pk=waiting[0].reservation_id).update(expires_at=past)
    Reservation.objects.filter(pk=waiting[1].reservation_id).update(expires_at=past)
    assert reservations_expire() == 2  # the sweep refunds waiting[1]'s first...
    Reservation.objects.filter(pk=waiting[1].reservation_id).update(expires_at=timezone.now() + timedelta(days=1))
    assert jobs_reap() == {"timed_out": 2}
    for job in waiting[:2]:
        job.refresh_from_db()
        assert (job.status, job.error_code, job.actual_mcu) == ("failed", "queue_timeout", 0)
        assert not redis_client().hexists("s:jobs:video-hbm", job.pk)
        assert [event.type for event in events_read(job_id=job.pk)][-1] == "job.failed"
        kinds = sorted(LedgerEntry.objects.filter(reservation_id=job.reservation_id).values_list("kind", "mcu"))
        assert kinds == [("refund", 2000), ("reserve", 2000), ("settle", 0)]  # refunded once
    assert used(api_key.tenant_id) == 1000 + 2000  # the running job and the one still waiting
    # When the running job ends, the one still waiting is the next to start.
    job_succeed(job=job_claim(job_id=running.pk, attempt=1), actual_mcu=1000, result={}, usage={})
    assert [job_id for job_id, *_ in sent_tasks] == [running.pk, waiting[2].pk]


def test_suspending_a_tenant_stops_its_work(settings, sent_tasks, django_capture_on_commit_callbacks):
    """Queued jobs are cancelled and refunded; running ones get their stop flag (the worker
    stops at the next token or step and bills what it produced); other tenants' run on."""
    from inference.services import job_cancel_requested
    from portal.services import tenant_suspend

    settings.SLUICE_POOL_SLOTS = {"video-hbm": 1}
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    other = video_job_submit(api_key_obj(tenant_with_limits(budget_cu=100)), cu=1).job
    running = job_claim(job_id=video_job_submit(api_key, cu=2).job.pk, attempt=1)
    waiting = video_job_submit(api_key, cu=3).job
    with django_capture_on_commit_callbacks(execute=True):
        tenant_suspend(tenant=api_key.tenant)
    waiting.refresh_from_db()
    assert waiting.status == "cancelled" and waiting.actual_mcu == 0
    assert job_cancel_requested(job_id=running.pk)
    assert not job_cancel_requested(job_id=other.pk)
    assert Job.objects.get(pk=other.pk).status == "queued"
    assert used(api_key.tenant_id) == 2000  # the running one, until it settles what it used


def test_a_job_submitted_by_a_request_that_authenticated_before_a_suspension_is_refused(
        settings, sent_tasks, django_capture_on_commit_callbacks):
    """Its key was checked while the tenant was active, then the suspension committed and
    stopped the tenant's jobs while the request was screened and priced: its job, created
    after that sweep, was queued and run. It is refused now (403), never sent, refunded."""
    from portal.errors import TenantSuspended
    from portal.services import tenant_suspend

    api_key = api_key_obj(tenant_with_limits(budget_cu=100))  # authenticated: active
    with django_capture_on_commit_callbacks(execute=True):
        tenant_suspend(tenant=api_key.tenant)  # its sweep finds no job yet
    with pytest.raises(TenantSuspended):
        video_job_submit(api_key, cu=2)
    job = Job.objects.get(tenant=api_key.tenant)
    assert (job.status, job.actual_mcu) == ("cancelled", 0)
    assert sent_tasks == [] and not redis_client().hexists("s:jobs:video-hbm", job.pk)
    assert used(api_key.tenant_id) == 0


def test_dispatch_is_a_noop_when_nothing_waits(sent_tasks):
    assert pool_dispatch(pool="video-hbm") == 0
    assert scheduler_dispatch(pool="nowhere", start_job=lambda job_id: None) == 0
    assert scheduler_enqueue(job_id="job_x", pool="p", priority=1, tenant_id=1, cost_mcu=10,
                             reservation_id="res_x", job_cap=1) == 10.0


def test_a_text_job_whose_engine_is_down_reads_started_then_failed_and_is_refunded(settings, sent_tasks):
    """The runner announces `job.started` once the engine has the work; when the engine never
    answers (nothing listens on its port), the stream still reads queued, started, failed."""
    from inference.events import events_read
    from inference.registry import model_get
    from inference.services import text_job_create

    served = model_get("sluice-code-tiny").variant("full").served_name
    settings.SLUICE_VLLM_URLS = {served: "http://127.0.0.1:9"}  # discard port: refused
    settings.SLUICE_VLLM_READY_TIMEOUT_S = 0.2
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    job = text_job_create(api_key=api_key, payload={"model": "sluice-code-tiny", "prompt": "x = 1",
                                                    "max_tokens": 4}).job
    assert sent_tasks == [(job.pk, 1, "text-batch")]
    assert job_run(job_id=job.pk, attempt=1) == "failed"
    assert [event.type for event in events_read(job_id=job.pk)] == ["job.queued", "job.started",
                                                                      "job.failed"]
    job.refresh_from_db()
    assert job.status == "failed" and job.error_code == "engine_error" and job.first_output_at is None
    assert used(api_key.tenant_id) == 0  # refunded in full


def test_a_text_job_whose_engine_goes_silent_fails_refunded_instead_of_holding_its_slot(
        settings, sent_tasks, hung_engine):
    """An engine that took the request and then says nothing (hung): after
    SLUICE_VLLM_READ_TIMEOUT_S the job fails with engine_error and is refunded. Without it the
    worker would wait for ever, heartbeating, and the reaper would keep renewing its lease."""
    from inference.registry import model_get
    from inference.services import text_job_create

    served = model_get("sluice-code-tiny").variant("full").served_name
    settings.SLUICE_VLLM_URLS = {served: hung_engine}
    settings.SLUICE_VLLM_READ_TIMEOUT_S = 0.5
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    job = text_job_create(api_key=api_key, payload={"model": "sluice-code-tiny", "prompt": "x = 1",
                                                    "max_tokens": 4}).job
    assert job_run(job_id=job.pk, attempt=1) == "failed"
    job.refresh_from_db()
    assert (job.status, job.error_code) == ("failed", "engine_error")
    assert "timed out" in job.error_message.lower()
    assert used(api_key.tenant_id) == 0


def test_one_thread_reads_the_running_jobs_cancel_flags_and_keeps_their_heartbeats(settings, clean_redis):
    """A worker process's jobs are watched by one thread (inference.runner._RunningJobs): a
    cancel raised in Redis becomes the job's should_stop() flag, only for that job, and the
    heartbeats of the jobs still running are refreshed; a finished job's are not."""

    from inference.runner import _RunningJobs
    from inference.services import CANCEL_KEY, HEARTBEAT_KEY

    settings.SLUICE_JOB_HEARTBEAT_TTL_S = 2  # a beat every second
    watch = _RunningJobs()
    watch.add("job_a", attempt=1, watch_cancel=True)
    watch.add("job_b", attempt=1, watch_cancel=True)

    try:
        clean_redis.set(CANCEL_KEY.format(job_id="job_a"), 1)
        assert within(2, lambda: watch.cancel_requested("job_a", attempt=1))
        assert not watch.cancel_requested("job_b", attempt=1)
        assert within(3, lambda: clean_redis.exists(HEARTBEAT_KEY.format(job_id="job_b")))
        watch.remove("job_b", attempt=1)
        clean_redis.delete(HEARTBEAT_KEY.format(job_id="job_b"))
        assert within(3, lambda: clean_redis.ttl(HEARTBEAT_KEY.format(job_id="job_a")) > 0)
        clean_redis.delete(HEARTBEAT_KEY.format(job_id="job_a"))
        assert within(3, lambda: clean_redis.exists(HEARTBEAT_KEY.format(job_id="job_a")))
        assert not clean_redis.exists(HEARTBEAT_KEY.format(job_id="job_b"))
        assert not watch.cancel_requested("job_b", attempt=1)
    finally:
        watch.remove("job_a", attempt=1)
        watch.remove("job_b", attempt=1)


def test_a_job_that_ends_while_redis_refuses_its_event_is_announced_by_the_reaper(
        settings, sent_tasks, receiver):
    """The end commits in PostgreSQL; followers and webhooks hear of it through Redis. Redis
    failing in between must delay the announcement, not lose it (a webhook receiver would
    otherwise never learn that the job it paid for finished)."""
    from django.urls import get_resolver

    from inference.events import events_read
    from inference.webhook_models import WebhookEvent
    from inference.webhooks import webhook_endpoint_create

    # The event's content_url is reversed: the URLconf's first import (it loads transformers,
    # 10-14 s on a loaded 2-core box) must not run inside the reaper's 10 s grace below.
    get_resolver().url_patterns  # noqa: B018 - imported for its side effect
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    webhook_endpoint_create(tenant=api_key.tenant, url=receiver.url)
    job = job_claim(job_id=video_job_submit(api_key, cu=4).job.pk, attempt=1)
    redis_url = settings.REDIS_URL
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there

    assert job_succeed(job=job, actual_mcu=3000, result={"video": "v.mp4"}, usage={"frames": 8})
    job.refresh_from_db()
    assert (job.status, job.actual_mcu, job.terminal_event_pending) == ("succeeded", 3000, True)
    assert used(api_key.tenant_id) == 3000  # settled with the end, Redis or not
    assert not WebhookEvent.objects.filter(type="job.completed").exists()

    settings.REDIS_URL = redis_url
    assert jobs_reap() == {}  # its worker may still be publishing it
    Job.objects.filter(pk=job.pk).update(finished_at=timezone.now() - timezone.timedelta(seconds=11))
    assert jobs_reap() == {"announced": 1}
    assert jobs_reap() == {}  # once
    (event,) = [e for e in events_read(job_id=job.pk) if e.type == "job.completed"]
    assert event.data["result"] == {"video": "v.mp4"} and event.data["actual_cu"] == 3.0
    assert event.data["content_url"].endswith(f"/v1/videos/{job.pk}/content")
    (webhook,) = WebhookEvent.objects.filter(tenant=api_key.tenant, type="job.completed")
    assert webhook.payload["data"]["id"] == job.pk
    assert webhook.payload["data"]["usage"] == {"frames": 8}
    job.refresh_from_db()
    assert job.terminal_event_pending is False


def test_heartbeats_lost_with_redis_do_not_hand_running_jobs_out_again(settings, sent_tasks, clean_redis):
    """Redis restarted empty: every heartbeat is gone at once while the workers run on. The
    reaper takes a job for lost only when its heartbeat stays missing a whole TTL after it first
    noticed (the workers beat every third of it); one that beats again keeps its job. A beat
    for an attempt the job is no longer at is no sign of life."""
    import time

    from inference.services import HEARTBEAT_KEY, job_heartbeat

    settings.SLUICE_JOB_HEARTBEAT_TTL_S = 2
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    job = job_claim(job_id=video_job_submit(api_key).job.pk, attempt=1)
    Job.objects.filter(pk=job.pk).update(started_at=timezone.now() - timezone.timedelta(seconds=60))
    heartbeat = HEARTBEAT_KEY.format(job_id=job.pk)
    assert clean_redis.get(heartbeat) == b"+1"  # the attempt it beats for
    clean_redis.delete(heartbeat)  # the restart
    assert jobs_reap() == {}
    for _ in range(3):  # its worker beats on
        job_heartbeat(job_id=job.pk, attempt=1)
        time.sleep(0.7)
    assert jobs_reap() == {}
    clean_redis.delete(heartbeat)  # and now its worker is gone
    assert jobs_reap() == {}
    time.sleep(2.1)
    assert jobs_reap() == {"requeued": 1}

    second = job_claim(job_id=job.pk, attempt=2)
    Job.objects.filter(pk=job.pk).update(started_at=timezone.now() - timezone.timedelta(seconds=60))
    job_heartbeat(job_id=job.pk, attempt=1)  # the first attempt's worker, still beating
    assert jobs_reap() == {}
    time.sleep(2.1)
    assert jobs_reap() == {"requeued": 1}
    assert sent_tasks[-1] == (second.pk, 3, "video-hbm")


def test_an_older_release_workers_heartbeat_keeps_whatever_attempt_it_runs(settings, sent_tasks,
                                                                            clean_redis):
    """A rolling deploy: a worker of the release before heartbeats carried their attempt runs a
    job's second attempt (the first one's worker was stopped), beating 1 as that release did for
    every attempt. The job is its worker's, not lost, and its lease is pushed out as it runs.
    (Read as attempt 1's beat, it was handed out again while it ran, its lease left to end.)"""
    import time
    from datetime import timedelta

    from inference.services import HEARTBEAT_KEY
    from quotas.models import Reservation

    settings.SLUICE_JOB_HEARTBEAT_TTL_S = 2
    settings.SLUICE_POOL_LEASE_S = {"video-hbm": 300}
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    first = job_claim(job_id=video_job_submit(api_key).job.pk, attempt=1)
    assert job_recover_lost(job=first) == "requeued"
    job = job_claim(job_id=first.pk, attempt=2)
    Job.objects.filter(pk=job.pk).update(started_at=timezone.now() - timedelta(seconds=60))
    Reservation.objects.filter(pk=job.reservation_id).update(
        expires_at=timezone.now() + timedelta(seconds=5))
    heartbeat = HEARTBEAT_KEY.format(job_id=job.pk)

    def older_release_beat() -> None:  # that release's job_heartbeat, to the letter
        clean_redis.set(heartbeat, 1, ex=settings.SLUICE_JOB_HEARTBEAT_TTL_S)

    older_release_beat()
    assert jobs_reap() == {"renewed": 1}
    time.sleep(1)
    older_release_beat()
    time.sleep(1.1)  # a TTL since the first reaper run
    assert jobs_reap() == {}
    job.refresh_from_db()
    assert (job.status, job.attempts) == (Job.Status.RUNNING, 2)
    assert Reservation.objects.get(pk=job.reservation_id).expires_at > timezone.now() + timedelta(seconds=200)
    assert sent_tasks[-1] == (job.pk, 2, "video-hbm")  # the only redelivery: the first attempt's


@pytest.mark.django_db(transaction=True)  # the watcher's thread reads the row on its own connection
def test_the_watcher_stops_an_attempt_that_was_handed_to_another(settings, sent_tasks, clean_redis):
    """A worker cut off from Redis longer than the TTL is taken for lost and its job queued
    again, while it runs on: its watcher sees the row is no longer at its attempt and stops it
    (as a cancel would, so the engine stops), and stops beating for it."""
    import time as clock

    from inference.runner import _RunningJobs
    from inference.services import HEARTBEAT_KEY

    settings.SLUICE_JOB_HEARTBEAT_TTL_S = 2
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    job = job_claim(job_id=video_job_submit(api_key).job.pk, attempt=1)
    heartbeat = HEARTBEAT_KEY.format(job_id=job.pk)
    watch = _RunningJobs()
    watch.add(job.pk, attempt=1, watch_cancel=False)

    try:
        assert not within(1.5, lambda: watch.stop_reason(job.pk, attempt=1))  # still its own
        heartbeat_lost(job)
        assert jobs_reap() == {"requeued": 1}
        assert within(3, lambda: watch.stop_reason(job.pk, attempt=1) == "superseded")
        assert watch.cancel_requested(job.pk, attempt=1)  # what the engine reads
        clean_redis.delete(heartbeat)
        clock.sleep(1.5)  # more than a beat
        assert not clean_redis.exists(heartbeat)
    finally:
        assert watch.remove(job.pk, attempt=1) == "superseded"


def test_a_worker_that_dies_between_a_jobs_end_and_its_event_leaves_it_to_the_reaper(
        sent_tasks, monkeypatch):
    """The end commits marked as not yet announced, and the mark goes once the event is out:
    a worker killed in between (here: its publish never returns) leaves the announcement to
    the reaper, which waits a few seconds first so as not to race a worker about to publish."""
    from inference import services
    from inference.events import events_read

    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    done = job_claim(job_id=video_job_submit(api_key).job.pk, attempt=1)
    assert job_succeed(job=done, actual_mcu=1000, result={}, usage={})
    assert Job.objects.get(pk=done.pk).terminal_event_pending is False  # published: nothing left

    job = job_claim(job_id=video_job_submit(api_key, cu=4).job.pk, attempt=1)

    def killed(**_kwargs):
        raise SystemExit("SIGKILL")  # what the worker would not survive

    with monkeypatch.context() as patched:
        patched.setattr(services, "event_publish", killed)
        with pytest.raises(SystemExit):
            job_succeed(job=job, actual_mcu=3000, result={"video": "v.mp4"}, usage={})
    job.refresh_from_db()
    assert (job.status, job.terminal_event_pending) == ("succeeded", True)
    assert jobs_reap() == {}  # too recent: its worker may be about to publish it
    Job.objects.filter(pk=job.pk).update(finished_at=timezone.now() - timezone.timedelta(seconds=11))
    assert jobs_reap() == {"announced": 1}
    assert jobs_reap() == {}
    assert [e.type for e in events_read(job_id=job.pk)].count("job.completed") == 1
    assert Job.objects.get(pk=job.pk).terminal_event_pending is False


def test_reaper_runs_do_not_overlap_and_stale_beat_ticks_are_dropped(settings, sent_tasks, clean_redis):
    """After an outage beat's backlog of ticks arrives at once: a run that finds another one
    holding the reaper's lock skips (two would announce the same ends twice), a run frees only
    its own lock, and a tick still queued when the next is due expires."""
    from inference.services import REAP_LOCK_KEY

    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    job = job_claim(job_id=video_job_submit(api_key).job.pk, attempt=1)
    heartbeat_lost(job)
    clean_redis.set(REAP_LOCK_KEY, "another run")
    assert jobs_reap() == {"skipped": 1}
    assert clean_redis.get(REAP_LOCK_KEY) == b"another run"  # not its lock to free
    assert Job.objects.get(pk=job.pk).status == "running"
    clean_redis.delete(REAP_LOCK_KEY)
    assert jobs_reap() == {"requeued": 1}
    assert not clean_redis.exists(REAP_LOCK_KEY)  # released

    for name in ("jobs-reap", "scheduler-tick"):
        entry = settings.CELERY_BEAT_SCHEDULE[name]
        assert 0 < entry["options"]["expires"] <= entry["schedule"]


def test_redis_failing_while_a_job_runs_costs_events_not_the_job(sent_tasks, monkeypatch):
    """The engine's hooks publish to Redis: a brief error is retried, a longer one skips the
    event, and either way the job (on the tiny real pipeline, in-process) runs to its end,
    and charged (a RedisError there failed it with engine_error and a refund)."""
    import redis as redis_lib

    from inference import services
    from inference.events import events_read

    published = services.event_publish
    progress_calls: list[int] = []

    def flaky(*, event_type, **kwargs):
        # The first step's progress fails once (then its retry goes out); every later one fails.
        if event_type == "job.progress":
            progress_calls.append(1)
            if len(progress_calls) != 2:
                raise redis_lib.ConnectionError("Redis is restarting")
        return published(event_type=event_type, **kwargs)

    monkeypatch.setattr(services, "event_publish", flaky)
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    job = video_job_submit(api_key, cu=4).job
    assert job_run(job_id=job.pk, attempt=1) == "succeeded"
    job.refresh_from_db()
    assert (job.status, job.error_code) == ("succeeded", "") and job.actual_mcu > 0
    types = [event.type for event in events_read(job_id=job.pk)]
    assert types[:3] == ["job.queued", "job.started", "job.progress"]  # the retried one
    assert types.count("job.progress") == 1 and types[-1] == "job.completed"


def test_a_job_past_its_pools_limit_is_stopped_failed_and_charged_for_what_it_ran(settings, sent_tasks):
    """The tiny real pipeline in-process, with a limit it passes at once: the watcher stops it
    at its next step (as a cancel would) and it fails with job_timeout, charged for the steps it
    ran (its heartbeat renewed its lease, so a hung job held its slot for ever)."""
    settings.SLUICE_JOB_MAX_RUN_S = {"video-hbm": 0}
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    job = video_job_submit(api_key, cu=4, params={**VIDEO_JOB_PARAMS, "steps": 40}).job
    assert job_run(job_id=job.pk, attempt=1) == "failed"
    job.refresh_from_db()
    assert (job.status, job.error_code) == ("failed", "job_timeout")
    assert "0 s its pool allows" in job.error_message
    assert job.usage["steps"] < 40 and job.actual_mcu < job.estimated_mcu
    assert used(api_key.tenant_id) == job.actual_mcu


def test_a_lost_job_past_its_pools_limit_fails_instead_of_running_again(settings, sent_tasks):
    """Its engine hung where the worker could not stop it: the heartbeat stopped, and running it
    all again would hang again."""
    settings.SLUICE_JOB_MAX_RUN_S = {"video-hbm": 30}
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    job = job_claim(job_id=video_job_submit(api_key, cu=4).job.pk, attempt=1)
    heartbeat_lost(job, seconds_ago=60)
    assert jobs_reap() == {"failed": 1}
    job.refresh_from_db()
    assert (job.status, job.error_code, job.actual_mcu) == ("failed", "job_timeout", 0)
    assert len(sent_tasks) == 1  # not sent again
    assert used(api_key.tenant_id) == 0


def test_a_job_that_finishes_as_its_limit_passes_succeeds(settings, sent_tasks, monkeypatch):
    """The watcher marks it overdue while its engine is returning a whole result: the result
    stands (it was failed, its result thrown away, and charged in full all the same)."""
    import time as clock

    from inference import runner
    from inference.engines.base import RunResult

    class FinishesRegardless:  # an engine whose last step outlasts the limit
        def run(self, context):
            clock.sleep(0.3)
            return RunResult(actual_mcu=900, result={"video": "v.mp4"}, usage={"steps": 2})

    monkeypatch.setattr(runner, "engine_for", lambda spec: FinishesRegardless())
    settings.SLUICE_JOB_MAX_RUN_S = {"video-hbm": 0}
    job = video_job_submit(api_key_obj(tenant_with_limits(budget_cu=100)), cu=4).job
    assert job_run(job_id=job.pk, attempt=1) == "succeeded"
    job.refresh_from_db()
    assert (job.status, job.result, job.actual_mcu) == ("succeeded", {"video": "v.mp4"}, 900)


@pytest.mark.django_db(transaction=True)  # the watcher's threads read on their own connections
def test_heartbeats_go_on_while_the_attempt_check_hangs(settings, sent_tasks, clean_redis, monkeypatch):
    """The database hanging (a half-open connection after a failover) must not stop the
    heartbeats, or the reaper would take every job of the worker for lost."""
    import threading

    from inference import runner
    from inference.services import HEARTBEAT_KEY

    hung = threading.Event()

    def hangs(**kwargs):
        hung.set()
        threading.Event().wait(30)
        return set()

    monkeypatch.setattr(runner, "jobs_superseded", hangs)
    settings.SLUICE_JOB_HEARTBEAT_TTL_S = 2  # a beat every second
    watch = runner._RunningJobs()
    watch.add("job_h", attempt=1, watch_cancel=False)
    try:
        assert hung.wait(5)
        clean_redis.delete(HEARTBEAT_KEY.format(job_id="job_h"))
        assert within(3, lambda: clean_redis.exists(HEARTBEAT_KEY.format(job_id="job_h")))
    finally:
        watch.remove("job_h", attempt=1)


def test_a_job_whose_reservation_ran_out_before_a_worker_took_it_does_not_run(sent_tasks):
    """An admitted job waits in its pool's Celery queue longer than its lease: the sweep
    refunds its reservation in full and gives its pool slot away. Its message arriving late
    must not start it: it ran to the end for free (its settlement found nothing to charge),
    on capacity the semaphore had handed to another job. The reaper then fails it."""
    from datetime import timedelta

    from quotas.ledger import reservations_expire
    from quotas.models import Reservation

    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    job = video_job_submit(api_key, cu=3).job
    assert sent_tasks == [(job.pk, 1, "video-hbm")]
    Reservation.objects.filter(pk=job.reservation_id).update(
        expires_at=timezone.now() - timedelta(seconds=1))
    assert reservations_expire() == 1
    assert job_claim(job_id=job.pk, attempt=1) is None
    assert jobs_reap() == {"timed_out": 1}
    job.refresh_from_db()
    assert (job.status, job.error_code, job.actual_mcu) == ("failed", "queue_timeout", 0)
    assert used(api_key.tenant_id) == 0


def test_a_job_admitted_while_redis_is_down_is_answered_and_run_once_it_is_back(settings, sent_tasks,
                                                                               monkeypatch):
    """A fail-open tier admits while Redis is down: the job and its reservation commit. What
    follows the commit (its job.queued event, its Celery message on the broker, the same
    Redis) failed the request with a 500 - for a job the reconciliation later sent and charged,
    and that a client retrying after the error paid for twice. It is answered as queued, and
    the reconciliation starts it once Redis and the broker are back; it is charged once."""
    from datetime import timedelta

    from kombu.exceptions import OperationalError

    from inference import tasks
    from inference.reconcile import jobs_reconcile
    from quotas.ledger import reservations_sync
    from quotas.limits import CounterKeys

    tenant = tenant_with_limits(budget_cu=100)
    tenant.tier.fail_open = True
    tenant.tier.save(update_fields=["fail_open"])
    api_key = api_key_obj(tenant)
    earlier = video_job_submit(api_key, cu=1).job  # counters exist in Redis
    job_succeed(job=job_claim(job_id=earlier.pk, attempt=1), actual_mcu=1000, result={}, usage={})
    sent: list[tuple] = []

    def broker_down(args, queue):
        raise OperationalError("Error 111 connecting to 127.0.0.1:1. Connection refused.")

    monkeypatch.setattr(tasks.run_job, "apply_async", broker_down)
    healthy_url = settings.REDIS_URL
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    submission = video_job_submit(api_key, cu=3)
    assert not submission.replayed and submission.job.status == "queued"

    settings.REDIS_URL = healthy_url
    monkeypatch.setattr(tasks.run_job, "apply_async",
                        lambda args, queue: sent.append((args[0], args[1], queue)))
    assert reservations_sync() == 1
    later = timezone.now() + timedelta(seconds=settings.SLUICE_JOB_RESEND_AFTER_S + 1)
    assert jobs_reconcile(now=later) == {"resent": 1}
    assert sent == [(submission.job.pk, 1, "video-hbm")]
    job = job_claim(job_id=submission.job.pk, attempt=1)
    assert job_succeed(job=job, actual_mcu=2000, result={}, usage={}) is True
    budget = CounterKeys(tenant_id=tenant.pk, api_key_id=0, period=period_of(timezone.now()),
                         pool="").budget
    assert int(redis_client().get(budget)) == used(tenant.pk) == 1000 + 2000

"""Reservations against the real Redis and database: the whole admission + ledger path."""

from __future__ import annotations

import math
import multiprocessing
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from django.db import connections
from django.utils import timezone

from portal.redis import redis_client
from quotas.errors import InsufficientQuota, RateLimitExceeded, SystemOverloaded
from quotas.ledger import (
    budget_used_from_ledger,
    reservation_open,
    reservation_release,
    reservation_settle,
    reservations_expire,
    reservations_sync,
)
from quotas.limits import CounterKeys, period_of
from quotas.models import BudgetAlert, LedgerEntry, Reservation
from tests.factories import api_key_obj, tenant_with_limits

POOL = "text-batch"


def counter(tenant_id: int) -> int:
    key = CounterKeys(tenant_id=tenant_id, api_key_id=0, period=period_of(timezone.now()), pool="").budget
    value = redis_client().get(key)
    return None if value is None else int(value)


def ledger_used(tenant_id: int) -> int:
    return budget_used_from_ledger(tenant_id=tenant_id, period=period_of(timezone.now()))[0]


def open_cu(api_key, cu: float, mode: str = "sync"):
    return reservation_open(api_key=api_key, model_id="sluice-code-tiny", pool=POOL,
                            cost_mcu=int(cu * 1000), mode=mode)


def dispatched(queued) -> bool:
    """A scheduler round for this queued reservation alone (as a job of its own): True when it
    took its pool slot."""
    from inference.scheduler import scheduler_dispatch, scheduler_enqueue

    reservation = queued.reservation
    job_id = f"job-{reservation.id}"
    scheduler_enqueue(job_id=job_id, pool=POOL, priority=1, tenant_id=reservation.tenant_id,
                      cost_mcu=reservation.reserved_mcu, reservation_id=reservation.id,
                      job_cap=queued.limits.max_concurrent_jobs)
    started = []
    scheduler_dispatch(pool=POOL, start_job=started.append)
    return started == [job_id]


# --- the race --------------------------------------------------------------------------------


def _try_reserve(api_key_id: int) -> bool:
    from portal.models import ApiKey

    api_key = ApiKey.objects.select_related("tenant__tier").get(pk=api_key_id)
    try:
        open_cu(api_key, 10)
        return True
    except InsufficientQuota:
        return False
    finally:
        connections.close_all()


def _process_worker(api_key_id: int, attempts: int, results) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        results.put(sum(pool.map(_try_reserve, [api_key_id] * attempts)))


@pytest.mark.django_db(transaction=True)
def test_200_concurrent_reservations_admit_exactly_what_the_budget_fits():
    fits = 37  # budget 370 CU, each reservation 10 CU
    tenant = tenant_with_limits(budget_cu=370, rate_cu=10_000_000, max_jobs=10_000)
    api_key = api_key_obj(tenant)

    # 100 from threads in this process ...
    with ThreadPoolExecutor(max_workers=25) as pool:
        from_threads = sum(pool.map(_try_reserve, [api_key.pk] * 100))
    # ... and 100 from 4 forked processes at once.
    connections.close_all()
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    processes = [context.Process(target=_process_worker, args=(api_key.pk, 25, results))
                 for _ in range(4)]
    for process in processes:
        process.start()
    from_processes = sum(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0

    assert from_threads + from_processes == fits
    assert Reservation.objects.filter(tenant=tenant).count() == fits
    assert LedgerEntry.objects.filter(tenant=tenant, kind="reserve").count() == fits
    assert counter(tenant.pk) == ledger_used(tenant.pk) == fits * 10_000


# --- settlement ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_settle_charges_actual_refunds_the_rest_and_is_idempotent():
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    opened = open_cu(api_key, 5)
    assert counter(api_key.tenant_id) == 5000
    assert reservation_settle(reservation_id=opened.reservation.id, actual_mcu=1234) is True
    assert reservation_settle(reservation_id=opened.reservation.id, actual_mcu=1234) is False
    assert reservation_settle(reservation_id=opened.reservation.id, actual_mcu=4000) is False
    entries = dict(LedgerEntry.objects.filter(reservation=opened.reservation).values_list("kind", "mcu"))
    assert entries == {"reserve": 5000, "settle": 1234, "refund": 3766}
    assert counter(api_key.tenant_id) == ledger_used(api_key.tenant_id) == 1234
    reservation = Reservation.objects.get(pk=opened.reservation.id)
    assert (reservation.state, reservation.settled_mcu) == ("settled", 1234)


@pytest.mark.django_db
def test_usage_above_the_reservation_is_capped_at_the_reservation():
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    opened = open_cu(api_key, 1)
    reservation_settle(reservation_id=opened.reservation.id, actual_mcu=5000)
    assert counter(api_key.tenant_id) == ledger_used(api_key.tenant_id) == 1000


@pytest.mark.django_db
def test_failure_refunds_in_full_and_cancel_refunds_the_unused_part():
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    failed = open_cu(api_key, 7)
    cancelled = open_cu(api_key, 8)
    reservation_release(reservation_id=failed.reservation.id)
    reservation_settle(reservation_id=cancelled.reservation.id, actual_mcu=2500)
    assert counter(api_key.tenant_id) == ledger_used(api_key.tenant_id) == 2500
    assert LedgerEntry.objects.get(reservation=failed.reservation, kind="refund").mcu == 7000
    assert LedgerEntry.objects.get(reservation=failed.reservation, kind="settle").mcu == 0


@pytest.mark.django_db
def test_budget_exhaustion_is_429_insufficient_quota_and_writes_nothing():
    api_key = api_key_obj(tenant_with_limits(budget_cu=10))
    open_cu(api_key, 9)
    with pytest.raises(InsufficientQuota) as exc:
        open_cu(api_key, 2)
    assert exc.value.http_status == 429 and exc.value.code == "insufficient_quota"
    # Unlike a rate limit, waiting seconds does not help: OpenAI's SDKs are told not to retry.
    assert exc.value.headers == {"x-should-retry": "false"}
    assert counter(api_key.tenant_id) == 9000
    assert Reservation.objects.filter(tenant_id=api_key.tenant_id).count() == 1


@pytest.mark.django_db
def test_key_cap_limits_one_key_not_the_tenant():
    tenant = tenant_with_limits(budget_cu=100)
    capped = api_key_obj(tenant, cu_cap=3)
    other = api_key_obj(tenant)
    open_cu(capped, 2)
    with pytest.raises(InsufficientQuota):
        open_cu(capped, 2)
    open_cu(other, 20)
    assert counter(tenant.pk) == 22_000


@pytest.mark.django_db
def test_worker_crash_expired_reservation_is_reclaimed():
    api_key = api_key_obj(tenant_with_limits(budget_cu=100, max_jobs=1))
    opened = open_cu(api_key, 6)
    # The worker died: nobody settles. The reaper releases it once the lease is over.
    assert reservations_expire() == 0
    assert reservations_expire(now=timezone.now() + timedelta(seconds=301)) == 1
    reservation = Reservation.objects.get(pk=opened.reservation.id)
    assert reservation.state == "expired" and reservation.settled_mcu == 0
    assert counter(api_key.tenant_id) == ledger_used(api_key.tenant_id) == 0
    # Its concurrency slot is free again (max_jobs=1).
    open_cu(api_key, 1)
    # A late settlement from the "dead" worker changes nothing.
    assert reservation_settle(reservation_id=opened.reservation.id, actual_mcu=6000) is False


@pytest.mark.django_db
def test_budget_alert_raised_once_at_80_percent():
    api_key = api_key_obj(tenant_with_limits(budget_cu=10))
    open_cu(api_key, 7)
    assert not BudgetAlert.objects.exists()
    open_cu(api_key, 1)
    open_cu(api_key, 1)
    alert = BudgetAlert.objects.get(tenant_id=api_key.tenant_id)
    assert (alert.threshold_pct, alert.used_mcu, alert.limit_mcu) == (80, 8000, 10_000)


# --- token buckets ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_tenant_bucket_allows_a_burst_then_refills():
    # 60 CU/min = 1 CU/s, bucket of 3 CU.
    api_key = api_key_obj(tenant_with_limits(budget_cu=1000, rate_cu=60, burst_cu=3))
    for _ in range(3):
        open_cu(api_key, 1)
    with pytest.raises(RateLimitExceeded) as exc:
        open_cu(api_key, 1)
    assert exc.value.headers["Retry-After"] == "1"
    time.sleep(1.05)
    open_cu(api_key, 1)
    with pytest.raises(RateLimitExceeded):
        open_cu(api_key, 1)
    # Rejections spent nothing.
    assert counter(api_key.tenant_id) == 4000


@pytest.mark.django_db
def test_retry_after_is_right_to_the_second():
    # 6 CU/min: one CU every 10 s. A 2-CU request after spending the 3-CU burst must wait 10 s
    # (for one CU to refill to make room for 2 in a bucket of 3... i.e. the second CU).
    api_key = api_key_obj(tenant_with_limits(budget_cu=1000, rate_cu=6, burst_cu=3))
    open_cu(api_key, 2)
    started = time.monotonic()
    with pytest.raises(RateLimitExceeded) as exc:
        open_cu(api_key, 2)
    elapsed = time.monotonic() - started
    assert int(exc.value.headers["Retry-After"]) == math.ceil(10 - elapsed)


@pytest.mark.django_db
def test_key_bucket_is_separate_from_the_tenant_bucket():
    # The tenant's bucket refills 0.1 CU a second: the ten opens below cannot outrun it on a
    # busy machine (at 600 CU a minute, 100 ms of them refilled a CU and nothing was refused).
    tenant = tenant_with_limits(budget_cu=1000, rate_cu=6, burst_cu=10, max_jobs=100)
    slow_key = api_key_obj(tenant, cu_per_minute=2)  # 2 CU/min, bucket of 2 CU
    other_key = api_key_obj(tenant)
    open_cu(slow_key, 1)
    open_cu(slow_key, 1)
    with pytest.raises(RateLimitExceeded) as exc:
        open_cu(slow_key, 1)
    assert exc.value.headers["Retry-After"] == "30"
    assert "this API key" in exc.value.message
    for _ in range(8):  # the tenant's bucket still has 8 CU for other keys
        open_cu(other_key, 1)
    with pytest.raises(RateLimitExceeded) as exc:
        open_cu(other_key, 1)
    assert "this API key" not in exc.value.message


@pytest.mark.django_db
def test_request_bigger_than_the_burst_is_refused_without_retry_after():
    api_key = api_key_obj(tenant_with_limits(budget_cu=1000, rate_cu=60, burst_cu=5))
    with pytest.raises(RateLimitExceeded) as exc:
        open_cu(api_key, 6)
    assert "Retry-After" not in exc.value.headers


# --- pool saturation and concurrency ---------------------------------------------------------


@pytest.mark.django_db
def test_pool_saturation_queues_async_and_rejects_sync(settings):
    settings.SLUICE_POOL_CAPACITY_CU = {POOL: 2}
    settings.SLUICE_POOL_RETRY_AFTER_S = 3
    api_key = api_key_obj(tenant_with_limits(budget_cu=1000))
    first = open_cu(api_key, 1)
    open_cu(api_key, 1)
    with pytest.raises(SystemOverloaded) as exc:
        open_cu(api_key, 1)
    assert exc.value.http_status == 503 and exc.value.headers["Retry-After"] == "3"
    queued = open_cu(api_key, 1, mode="async")
    assert queued.ticket.outcome == "queued" and queued.reservation.state == "queued"
    assert counter(api_key.tenant_id) == 3000  # a queued job holds its budget
    assert not dispatched(queued)
    reservation_settle(reservation_id=first.reservation.id, actual_mcu=1000)  # frees capacity
    assert dispatched(queued)
    assert Reservation.objects.get(pk=queued.reservation.id).state == "admitted"
    with pytest.raises(SystemOverloaded):
        open_cu(api_key, 1)


@pytest.mark.django_db
def test_pool_capacity_is_shared_across_tenants(settings):
    settings.SLUICE_POOL_CAPACITY_CU = {POOL: 2}
    busy = api_key_obj(tenant_with_limits(budget_cu=1000))
    other = api_key_obj(tenant_with_limits(budget_cu=1000))
    open_cu(busy, 2)
    with pytest.raises(SystemOverloaded):
        open_cu(other, 1)


@pytest.mark.django_db
def test_job_larger_than_the_pool_runs_alone(settings):
    settings.SLUICE_POOL_CAPACITY_CU = {POOL: 2}
    api_key = api_key_obj(tenant_with_limits(budget_cu=1000))
    big = open_cu(api_key, 5)
    with pytest.raises(SystemOverloaded):
        open_cu(api_key, 1)
    reservation_settle(reservation_id=big.reservation.id, actual_mcu=5000)
    open_cu(api_key, 1)


@pytest.mark.django_db
def test_concurrent_job_cap(settings):
    api_key = api_key_obj(tenant_with_limits(budget_cu=1000, max_jobs=1))
    first = open_cu(api_key, 1)
    with pytest.raises(RateLimitExceeded) as exc:
        open_cu(api_key, 1)
    assert "concurrent jobs" in exc.value.message
    queued = open_cu(api_key, 1, mode="async")
    assert queued.ticket.outcome == "queued"
    assert not dispatched(queued)
    reservation_release(reservation_id=first.reservation.id)
    assert dispatched(queued)
    assert Reservation.objects.get(pk=queued.reservation.id).state == "admitted"


# --- Redis losing its data, or going away ----------------------------------------------------


@pytest.mark.django_db
def test_counters_rebuilt_from_ledger_after_redis_loses_everything(settings):
    api_key = api_key_obj(tenant_with_limits(budget_cu=20))
    settled = open_cu(api_key, 6)
    reservation_settle(reservation_id=settled.reservation.id, actual_mcu=4000)
    running = open_cu(api_key, 10)
    assert counter(api_key.tenant_id) == 14_000

    redis_client().flushdb()  # the test's Redis database: same effect as FLUSHALL on ours

    # No budget was gained: 6 CU are left (4 settled + 10 still reserved).
    with pytest.raises(InsufficientQuota):
        open_cu(api_key, 7)
    assert counter(api_key.tenant_id) == ledger_used(api_key.tenant_id) == 14_000
    open_cu(api_key, 6)
    # The reservation that was running before the flush still refunds correctly.
    reservation_settle(reservation_id=running.reservation.id, actual_mcu=1000)
    assert counter(api_key.tenant_id) == ledger_used(api_key.tenant_id) == 11_000


@pytest.mark.django_db
def test_rebuild_management_command(capsys):
    from django.core.management import call_command

    api_key = api_key_obj(tenant_with_limits(budget_cu=20))
    open_cu(api_key, 3)
    redis_client().set(CounterKeys(tenant_id=api_key.tenant_id, api_key_id=0,
                                   period=period_of(timezone.now()), pool="").budget, 0)
    call_command("rebuild_counters", "--tenant", api_key.tenant.slug)
    assert counter(api_key.tenant_id) == 3000


@pytest.mark.django_db
def test_redis_unreachable_fails_closed_by_default(settings):
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    with pytest.raises(SystemOverloaded) as exc:
        open_cu(api_key, 1)
    assert exc.value.http_status == 503 and "Retry-After" in exc.value.headers
    assert not Reservation.objects.exists()


def fail_open_key_with_counters():
    """A key of a fail-open tier whose Redis counters exist (2 CU used)."""
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    open_cu(api_key, 2)
    tier = api_key.tenant.tier
    tier.fail_open = True
    tier.save(update_fields=["fail_open"])
    return api_key


@pytest.mark.django_db
def test_fail_open_tier_admits_and_reconciles_when_redis_returns(settings):
    api_key = fail_open_key_with_counters()
    healthy_url = settings.REDIS_URL

    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    running = open_cu(api_key, 5)
    done = open_cu(api_key, 3)
    reservation_settle(reservation_id=done.reservation.id, actual_mcu=1000)
    assert Reservation.objects.filter(redis_synced=False).count() == 2

    settings.REDIS_URL = healthy_url
    assert counter(api_key.tenant_id) == 2000  # Redis has not seen them yet
    assert reservations_sync() == 2
    assert counter(api_key.tenant_id) == ledger_used(api_key.tenant_id) == 8000
    reservation_settle(reservation_id=running.reservation.id, actual_mcu=5000)
    assert counter(api_key.tenant_id) == ledger_used(api_key.tenant_id) == 8000


@pytest.mark.django_db
def test_settlement_while_redis_is_down_is_replayed(settings):
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    opened = open_cu(api_key, 5)
    healthy_url = settings.REDIS_URL
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    reservation_settle(reservation_id=opened.reservation.id, actual_mcu=2000)
    assert Reservation.objects.get(pk=opened.reservation.id).redis_synced is False
    settings.REDIS_URL = healthy_url
    assert counter(api_key.tenant_id) == 5000  # not yet refunded in Redis
    assert reservations_sync() == 1
    assert reservations_sync() == 0
    assert counter(api_key.tenant_id) == ledger_used(api_key.tenant_id) == 2000


@pytest.mark.django_db(transaction=True)
def test_a_settlement_during_the_replay_is_not_replayed_as_running(settings, monkeypatch):
    """The sync reads a reservation as running while its job settles: the settlement waits for
    the replay (the row's lock) and then mirrors itself, so Redis ends where the ledger is."""
    import threading

    from django.db import connection

    api_key = fail_open_key_with_counters()
    healthy_url = settings.REDIS_URL
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    running = open_cu(api_key, 5)  # admitted while Redis was down
    settings.REDIS_URL = healthy_url

    def settle() -> None:
        try:
            reservation_settle(reservation_id=running.reservation.id, actual_mcu=1000)
        finally:
            connection.close()

    client = redis_client()
    evalsha, settling = client.evalsha, []

    def replay_while_the_job_settles(*args, **kwargs):
        if not settling:  # the sync has read the reservation as running: the job ends now
            settling.append(threading.Thread(target=settle))
            settling[0].start()
            settling[0].join(timeout=1)  # it waits for the replay's lock (for ever, without one)
        return evalsha(*args, **kwargs)

    monkeypatch.setattr(client, "evalsha", replay_while_the_job_settles)
    assert reservations_sync() == 1
    settling[0].join(timeout=10)
    assert not settling[0].is_alive()
    assert Reservation.objects.get(pk=running.reservation.id).state == "settled"
    assert counter(api_key.tenant_id) == ledger_used(api_key.tenant_id) == 3000


@pytest.mark.django_db
@pytest.mark.parametrize("redis_lost", ["everything", "the budget counter"])
def test_a_settlement_replayed_after_a_rebuild_is_counted_once(settings, redis_lost):
    """A settlement Redis refused waits for the sync (redis_synced=False). If the counters are
    rebuilt from the ledger before the sync runs (Redis came back empty, or lost the budget
    counter, and the tenant's next request rebuilt it), the ledger the rebuild read already
    holds that settlement: replaying it as well counted it twice (the charge added again, or
    the refund taken off again), for the rest of the period."""
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    opened = open_cu(api_key, 5)
    healthy_url = settings.REDIS_URL
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    reservation_settle(reservation_id=opened.reservation.id, actual_mcu=2000)
    settings.REDIS_URL = healthy_url
    if redis_lost == "everything":
        redis_client().flushdb()
    else:
        redis_client().delete(CounterKeys(tenant_id=api_key.tenant_id, api_key_id=0,
                                          period=period_of(timezone.now()), pool="").budget)
    open_cu(api_key, 1)  # rebuilt from the ledger (the settlement in it), then 1 CU reserved
    assert counter(api_key.tenant_id) == ledger_used(api_key.tenant_id) == 3000

    assert reservations_sync() == 1
    assert counter(api_key.tenant_id) == ledger_used(api_key.tenant_id) == 3000
    assert redis_client().zcard(CounterKeys(tenant_id=api_key.tenant_id, api_key_id=0, period="",
                                            pool=POOL).in_flight) == 1  # the 1 CU one only


def lose_counters(api_key, redis_lost: str) -> None:
    if redis_lost == "everything":
        redis_client().flushdb()
    else:
        redis_client().delete(CounterKeys(tenant_id=api_key.tenant_id, api_key_id=0,
                                          period=period_of(timezone.now()), pool="").budget)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("redis_lost", ["everything", "the budget counter"])
def test_a_settlement_that_commits_while_the_counters_are_rebuilt_is_refunded_once(redis_lost):
    """The rebuild reads the ledger and the running reservations: a job that settles between
    the two reads (its refund not in the ledger read, its reservation no longer running) had
    its refund left out of the rebuilt counter for the rest of the period."""
    import threading

    from django.db import connection

    from quotas.ledger import counters_rebuild

    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    running = open_cu(api_key, 5)
    lose_counters(api_key, redis_lost)

    def settle() -> None:
        try:
            reservation_settle(reservation_id=running.reservation.id, actual_mcu=2000)
        finally:
            connection.close()

    settling = []

    def settle_after_the_rebuilds_first_read(execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        if not settling and "quotas_" in sql:
            settling.append(threading.Thread(target=settle))
            settling[0].start()
            settling[0].join(timeout=1)  # done, or waiting for a lock the rebuild holds
        return result

    with connection.execute_wrapper(settle_after_the_rebuilds_first_read):
        counters_rebuild(tenant_id=api_key.tenant_id, period=period_of(timezone.now()))
    settling[0].join(timeout=10)
    assert not settling[0].is_alive()
    assert Reservation.objects.get(pk=running.reservation.id).state == "settled"
    assert counter(api_key.tenant_id) == ledger_used(api_key.tenant_id) == 2000
    keys = CounterKeys(tenant_id=api_key.tenant_id, api_key_id=api_key.pk, period=period_of(timezone.now()),
                       pool=POOL)
    assert int(redis_client().get(keys.key_used)) == 2000
    assert redis_client().zcard(keys.in_flight) == 0  # its slot is free


@pytest.mark.django_db(transaction=True)
def test_an_adjustment_keeps_what_admissions_not_yet_committed_hold():
    """An operator's adjustment moves the counters by its amount. It used to drop the budget
    counter for a rebuild: an admission Redis had counted whose rows were not committed yet
    (a job being stored) was missing from the rebuilt counter, its cost given away for the
    rest of the period."""
    import threading

    from django.db import connection, transaction

    from quotas.ledger import ledger_adjust

    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    open_cu(api_key, 1)  # the counters exist: 1 CU used
    admitted, commit_now, storing = threading.Event(), threading.Event(), []

    def submit_a_job() -> None:
        try:
            with transaction.atomic():  # as job_submit stores a job with its reservation
                storing.append(open_cu(api_key, 4))
                admitted.set()
                commit_now.wait(timeout=10)
        finally:
            connection.close()

    submitting = threading.Thread(target=submit_a_job)
    submitting.start()
    try:
        assert admitted.wait(timeout=10)
        ledger_adjust(tenant_id=api_key.tenant_id, mcu=500, note="missed usage", api_key_id=api_key.pk)
        open_cu(api_key, 1)
    finally:
        commit_now.set()
        submitting.join(timeout=10)
    assert storing and not submitting.is_alive()
    assert counter(api_key.tenant_id) == ledger_used(api_key.tenant_id) == 6500
    keys = CounterKeys(tenant_id=api_key.tenant_id, api_key_id=api_key.pk,
                       period=period_of(timezone.now()), pool=POOL)
    assert int(redis_client().get(keys.key_used)) == 6500
    reservation_settle(reservation_id=storing[0].reservation.id, actual_mcu=1000)
    assert counter(api_key.tenant_id) == ledger_used(api_key.tenant_id) == 3500


# --- a process that dies between a settlement's commit and its mirror ------------------------


def slot_keys(api_key) -> CounterKeys:
    return CounterKeys(tenant_id=api_key.tenant_id, api_key_id=api_key.pk,
                       period=period_of(timezone.now()), pool=POOL)


@pytest.mark.django_db
def test_a_settlement_its_process_never_mirrored_is_mirrored_by_the_reconciler(caplog):
    """A job's end commits its settlement, then mirrors it into Redis: a process that died in
    between left Redis charging the reservation in full and holding its slot until a rebuild.
    The reconciler mirrors it once it is past the grace a live process has to do it itself."""
    from inference.reconcile import jobs_reconcile
    from quotas.ledger import reservation_settle_in_ledger, settlements_mirror_missed
    from quotas.limits import reservation_marker

    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    opened = open_cu(api_key, 5)
    settled = reservation_settle_in_ledger(reservation_id=opened.reservation.id, actual_mcu=2000)
    # ... and the process dies before settlement_mirror(settled).
    keys, client = slot_keys(api_key), redis_client()
    assert counter(api_key.tenant_id) == 5000 and ledger_used(api_key.tenant_id) == 2000
    assert settlements_mirror_missed() == 0  # within the grace: its process may be mirroring it
    assert counter(api_key.tenant_id) == 5000

    later = settled.settled_at + timedelta(seconds=11)
    with caplog.at_level("WARNING", logger="quotas.ledger"):
        assert jobs_reconcile(now=later) == {"mirrored": 1}
    assert "mirrored 1 settlement" in caplog.text
    assert counter(api_key.tenant_id) == ledger_used(api_key.tenant_id) == 2000
    assert int(client.get(keys.key_used)) == 2000
    assert not client.exists(reservation_marker(opened.reservation.id))
    assert client.zcard(keys.in_flight) == 0 and int(client.get(keys.pool_sum)) == 0
    assert settlements_mirror_missed(now=later) == 0  # a second sweep changes nothing
    assert counter(api_key.tenant_id) == 2000


@pytest.mark.django_db
def test_a_rebuild_counts_an_unmirrored_settlement_once(settings):
    """Counters rebuilt from the ledger hold the settlement its dead process never mirrored:
    the sweep that comes after must not refund it a second time."""
    from quotas.ledger import reservation_settle_in_ledger, settlements_mirror_missed

    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    opened = open_cu(api_key, 5)
    settled = reservation_settle_in_ledger(reservation_id=opened.reservation.id, actual_mcu=2000)
    lose_counters(api_key, "the budget counter")
    open_cu(api_key, 1)  # rebuilt from the ledger (the settlement in it), then 1 CU reserved
    assert counter(api_key.tenant_id) == ledger_used(api_key.tenant_id) == 3000
    assert redis_client().zcard(slot_keys(api_key).in_flight) == 1  # its slot is free

    assert settlements_mirror_missed(now=settled.settled_at + timedelta(seconds=11)) == 0
    assert counter(api_key.tenant_id) == ledger_used(api_key.tenant_id) == 3000


# --- the rebuild_counters command ----------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("admission", "submission"), [
    ("admitted", "commits"), ("admitted", "rolls back"), ("queued", "rolls back")])
def test_the_rebuild_command_keeps_an_admission_not_yet_committed(admission, submission):
    """The command dropped the budget counter and rebuilt it from the ledger: an admission Redis
    had counted whose rows were not committed yet (job_submit stores the job with them) was
    missing from it, and its release then refunded a counter that never held it. So was one
    queued for the pool (async, the tenant at its job cap here), in no per-tenant index until
    its job was committed, after the overwrite kept only the admitted ones."""
    import threading

    from django.core.management import call_command
    from django.db import connection, transaction

    from quotas.ledger import reservation_abandon

    api_key = api_key_obj(tenant_with_limits(budget_cu=100, max_jobs=1))
    first = open_cu(api_key, 1)  # committed: 1 CU used, the tenant's one job slot held
    admitted, end_it, storing = threading.Event(), threading.Event(), []

    def submit_a_job() -> None:
        try:
            try:
                with transaction.atomic():  # as job_submit stores a job with its reservation
                    storing.append(open_cu(api_key, 4, mode="async"))
                    admitted.set()
                    end_it.wait(timeout=10)
                    if submission == "rolls back":
                        raise RuntimeError("the job could not be stored")
            except RuntimeError:
                reservation_abandon(storing[0])
        finally:
            connection.close()

    if admission == "admitted":
        reservation_settle(reservation_id=first.reservation.id, actual_mcu=1000)  # slot freed
    submitting = threading.Thread(target=submit_a_job)
    submitting.start()
    try:
        assert admitted.wait(timeout=10)
        assert storing[0].ticket.outcome == admission
        call_command("rebuild_counters", "--tenant", api_key.tenant.slug)
        assert ledger_used(api_key.tenant_id) == 1000  # the admission's rows are not in it
        assert counter(api_key.tenant_id) == 5000
        assert int(redis_client().get(slot_keys(api_key).key_used)) == 5000
    finally:
        end_it.set()
        submitting.join(timeout=10)
    assert storing and not submitting.is_alive()
    if submission == "commits":
        reservation_settle(reservation_id=storing[0].reservation.id, actual_mcu=1000)
        assert counter(api_key.tenant_id) == ledger_used(api_key.tenant_id) == 2000
    else:
        assert counter(api_key.tenant_id) == ledger_used(api_key.tenant_id) == 1000
    assert int(redis_client().get(slot_keys(api_key).key_used)) == ledger_used(api_key.tenant_id)
    # What was released left no reservation behind in the tenant's indexes to read again for.
    call_command("rebuild_counters", "--tenant", api_key.tenant.slug)
    assert counter(api_key.tenant_id) == ledger_used(api_key.tenant_id)


@pytest.mark.django_db
def test_the_rebuild_command_corrects_a_counter_that_drifted():
    from django.core.management import call_command

    api_key = api_key_obj(tenant_with_limits(budget_cu=20))
    open_cu(api_key, 3)
    redis_client().set(CounterKeys(tenant_id=api_key.tenant_id, api_key_id=0,
                                   period=period_of(timezone.now()), pool="").budget, 9000)
    redis_client().set(slot_keys(api_key).key_used, 0)
    call_command("rebuild_counters", "--tenant", api_key.tenant.slug)
    assert counter(api_key.tenant_id) == 3000  # the running reservation is known to the ledger
    assert int(redis_client().get(slot_keys(api_key).key_used)) == 3000


@pytest.mark.django_db
def test_a_forced_rebuild_reads_again_when_a_reservation_commits_between_its_reads(monkeypatch):
    """An admission committed after the rebuild read the tenant's in-flight reservations and
    before it read the ledger is in the ledger figures: counted as one the ledger did not see
    as well, it would be counted twice."""
    from quotas import ledger

    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    open_cu(api_key, 1)
    ledger_read, committed = ledger._ledger_read, []

    def commit_one_first(**kwargs):
        if not committed:
            committed.append(open_cu(api_key, 2))
        return ledger_read(**kwargs)

    monkeypatch.setattr(ledger, "_ledger_read", commit_one_first)
    assert ledger.counters_rebuild(tenant_id=api_key.tenant_id, period=period_of(timezone.now()),
                                   force=True)
    assert counter(api_key.tenant_id) == ledger_used(api_key.tenant_id) == 3000

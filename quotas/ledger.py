"""Reservations and the ledger: reserve before work, settle after, refund the rest.

The database is the source of truth. Every change is written there first (conditional
updates make settlement idempotent), then mirrored into Redis' hot counters. When Redis is
down, the mirror step is marked pending (`redis_synced=False`) and replayed by a periodic
task; when the process dies between the commit and the mirror, the reconciler mirrors it
(`settlements_mirror_missed`); when Redis lost its data, counters are rebuilt from the ledger
on the next miss.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import redis
from django.conf import settings
from django.db import transaction
from django.db.models import BigIntegerField, Case, CharField, F, Q, QuerySet, Sum, Value, When
from django.db.models.functions import Least
from django.utils import timezone

from inference.webhooks import webhook_event_publish
from portal.db import update_returning
from portal.errors import SluiceError
from portal.metrics import admission_observe, settlement_observe
from portal.models import ApiKey, Tenant
from portal.redis import lua_script, redis_client
from quotas.admission import (
    ADMITTED,
    RESERVATION_TTL_S,
    AdmissionTicket,
    CountersMissing,
    admission_decide,
)
from quotas.cost import mcu_to_cu
from quotas.errors import SystemOverloaded
from quotas.limits import (
    RESERVATION_MARKER_PREFIX,
    CounterKeys,
    QuotaLimits,
    counter_ttl_s,
    key_used_counter,
    period_of,
    pool_lease_s,
    quota_limits_for,
    reservation_marker,
)
from quotas.models import BudgetAlert, LedgerEntry, Reservation

logger = logging.getLogger(__name__)

# A queued reservation may wait this long for pool capacity before the reaper releases it.
QUEUE_ALLOWANCE_S = 24 * 3600

# A job's end commits its settlement, then mirrors it into Redis (`settlement_mirror`); a
# process that dies between the two leaves the reservation's marker behind, and Redis charging
# its unused part and holding its slot. The reconciler (every 30 s) mirrors the settlements of
# the last MIRROR_SWEEP_WINDOW_S whose marker is still live, once they are MIRROR_SWEEP_GRACE_S
# old (a live process mirrors within milliseconds; settle.lua is idempotent, so a race with
# one would be harmless anyway), MIRROR_SWEEP_BATCH at a time.
MIRROR_SWEEP_WINDOW_S = 300
MIRROR_SWEEP_GRACE_S = 10
MIRROR_SWEEP_BATCH = 500
# A forced rebuild reads again when admissions or releases came between its reads and its
# script (rebuild.lua answers -1); after this many reads in a row it gives up, writing nothing.
REBUILD_FORCED_READS = 10
REBUILD_READ_AGAIN = -1


def reservation_id_new() -> str:
    # Time-ordered so ids sort by creation, random tail so they never collide.
    return f"res_{int(time.time() * 1000):011x}{secrets.token_hex(6)}"


@dataclass(frozen=True)
class Opened:
    reservation: Reservation
    ticket: AdmissionTicket
    limits: QuotaLimits  # what it was admitted under (the scheduler keeps the job cap)


def _keys_for(reservation: Reservation) -> CounterKeys:
    return CounterKeys(
        tenant_id=reservation.tenant_id,
        api_key_id=reservation.api_key_id or 0,
        period=reservation.period,
        pool=reservation.pool,
    )


def reservation_open(
    *,
    api_key: ApiKey,
    model_id: str,
    pool: str,
    cost_mcu: int,
    mode: str,
    limits: QuotaLimits | None = None,
) -> Opened:
    """Admit (or queue, for mode="async") a request costing `cost_mcu`; raises the rejection.

    A caller may open it inside its own transaction (job_submit does: the reservation and the
    job commit together); if that transaction rolls back, it calls `reservation_abandon`."""
    limits = limits or quota_limits_for(tenant=api_key.tenant, api_key=api_key)
    now = timezone.now()
    period = period_of(now)
    keys = CounterKeys(tenant_id=api_key.tenant_id, api_key_id=api_key.pk, period=period, pool=pool)
    reservation_id = reservation_id_new()
    client = redis_client()
    counted = True
    observed = {"pool": pool, "tier": api_key.tenant.tier.slug, "model": model_id,
                "cost_mcu": cost_mcu}
    try:
        try:
            ticket = _decide(client, keys, limits, cost_mcu, mode, reservation_id)
        except CountersMissing:
            counters_rebuild(tenant_id=api_key.tenant_id, period=period, api_key_id=api_key.pk)
            ticket = _decide(client, keys, limits, cost_mcu, mode, reservation_id)
    except (redis.RedisError, CountersMissing) as exc:
        if not limits.fail_open:
            logger.warning("admission unavailable: %s", exc.__class__.__name__)
            admission_observe(**observed, outcome="rejected", code=SystemOverloaded.code)
            raise SystemOverloaded(
                "Admission control is unavailable right now. Retry later.", retry_after_s=5
            ) from exc
        # This tier fails open: admit now, count it in Redis when Redis is back.
        counted = False
        ticket = AdmissionTicket(reservation_id=reservation_id, outcome=ADMITTED,
                                 cost_mcu=cost_mcu, budget_used_mcu=0, rate=None)
    except SluiceError as rejection:
        admission_observe(**observed, outcome="rejected", code=rejection.code)
        raise
    admission_observe(**observed, outcome=ticket.outcome, code="none" if counted else "fail_open")

    lease_s = pool_lease_s(pool) if ticket.outcome == ADMITTED else QUEUE_ALLOWANCE_S
    try:
        # No savepoint inside a caller's transaction: a failure here fails that one too.
        with transaction.atomic(savepoint=False):
            reservation = Reservation.objects.create(
                id=reservation_id,
                tenant_id=api_key.tenant_id,
                api_key=api_key,
                model=model_id,
                pool=pool,
                tier=api_key.tenant.tier.slug,
                period=period,
                reserved_mcu=cost_mcu,
                state=ticket.outcome,
                expires_at=now + timedelta(seconds=lease_s),
                redis_synced=counted,
            )
            LedgerEntry.objects.create(
                tenant_id=api_key.tenant_id, api_key=api_key, reservation=reservation,
                kind=LedgerEntry.Kind.RESERVE, mcu=cost_mcu, period=period, model=model_id,
            )
    except Exception:
        if counted:  # the database refused it: give the Redis reservation back
            _release_in_redis(client, keys, reservation_id, refund_mcu=cost_mcu)
        raise
    if counted:
        budget_alert_check(tenant_id=api_key.tenant_id, period=period, limits=limits,
                           used_mcu=ticket.budget_used_mcu)
    return Opened(reservation=reservation, ticket=ticket, limits=limits)


def reservation_abandon(opened: Opened) -> None:
    """The caller's transaction rolled back the reservation's rows: give back what Redis holds
    for it, so the counters agree with the ledger again. Idempotent, like every release."""
    if opened.reservation.redis_synced:
        _release_in_redis(redis_client(), _keys_for(opened.reservation), opened.reservation.id,
                          refund_mcu=opened.reservation.reserved_mcu)


def _decide(client, keys, limits, cost_mcu, mode, reservation_id) -> AdmissionTicket:
    return admission_decide(
        client=client, keys=keys, limits=limits, cost_mcu=cost_mcu, mode=mode,
        reservation_id=reservation_id, retry_after_s=settings.SLUICE_POOL_RETRY_AFTER_S,
    )


def _release_in_redis(client, keys: CounterKeys, reservation_id: str, *, refund_mcu: int) -> int:
    return lua_script(client, "settle")(
        keys=[reservation_marker(reservation_id), keys.budget, keys.key_used, keys.in_flight,
              keys.pool_hash, keys.pool_zset, keys.pool_sum, keys.queued],
        args=[reservation_id, refund_mcu],
    )


def reservation_settle(
    *, reservation_id: str, actual_mcu: int, final_state: str = Reservation.State.SETTLED
) -> bool:
    """Charge `actual_mcu` (at most the reservation) and refund the rest. Idempotent:
    a second call for the same reservation changes nothing and returns False."""
    settled = reservation_settle_in_ledger(reservation_id=reservation_id, actual_mcu=actual_mcu,
                                           final_state=final_state)
    if settled is None:
        return False
    settlement_mirror(settled)
    return True


def reservation_settle_in_ledger(
    *, reservation_id: str, actual_mcu: int, final_state: str = Reservation.State.SETTLED
) -> Reservation | None:
    """`reservation_settle`'s database half, for a caller settling inside its own transaction
    (a job's end): the settled reservation, or None if it was settled already. The caller hands
    it to `settlement_mirror` once that transaction committed; mirrored before, a commit that
    then failed left Redis refunded, and the slot freed, for a settlement the ledger never had."""
    now = timezone.now()
    # Inside a caller's transaction no savepoint: two round trips fewer.
    with transaction.atomic(savepoint=False):
        # Claim and read in one statement; the charge is capped at what was reserved.
        claimed = update_returning(
            Reservation.objects.filter(pk=reservation_id, state__in=Reservation.ACTIVE_STATES),
            state=final_state, settled_at=now,
            settled_mcu=Least(F("reserved_mcu"), Value(max(0, actual_mcu)),
                              output_field=BigIntegerField()),
        )
        if not claimed:
            return None
        (reservation,) = claimed
        charge = reservation.settled_mcu
        refund = reservation.reserved_mcu - charge
        common = {"tenant_id": reservation.tenant_id, "api_key_id": reservation.api_key_id,
                  "reservation": reservation, "period": reservation.period,
                  "model": reservation.model}
        entries = [LedgerEntry(kind=LedgerEntry.Kind.SETTLE, mcu=charge, **common)]
        if refund:
            entries.append(LedgerEntry(kind=LedgerEntry.Kind.REFUND, mcu=refund, **common))
        LedgerEntry.objects.bulk_create(entries)  # one INSERT for both rows
    if actual_mcu > reservation.reserved_mcu:
        logger.warning("usage above reservation %s: %s > %s mCU, charging the reservation",
                       reservation_id, actual_mcu, reservation.reserved_mcu)
    settlement_observe(tier=reservation.tier, model=reservation.model, settled_mcu=charge,
                       refunded_mcu=refund)
    return reservation


def reservation_release(*, reservation_id: str) -> bool:
    """Refund a reservation in full (the work failed, was rejected or never ran)."""
    return reservation_settle(reservation_id=reservation_id, actual_mcu=0)


def settlement_mirror(reservation: Reservation) -> bool:
    """Release a settled reservation in Redis: refund its unused part, free its slot. Idempotent
    (the marker goes once); when Redis refuses, the sync task replays it. A process that dies
    before this call leaves it to the reconciler (`settlements_mirror_missed`): no extra write
    per settlement. True when this call released it."""
    if not reservation.redis_synced:
        return False  # Redis never counted it; the sync task accounts for the net charge
    try:
        return bool(_release_in_redis(
            redis_client(), _keys_for(reservation), reservation.id,
            refund_mcu=reservation.reserved_mcu - reservation.settled_mcu,
        ))
    except redis.RedisError:
        logger.warning("settlement of %s queued until Redis is back", reservation.id)
        Reservation.objects.filter(pk=reservation.pk).update(redis_synced=False)
        return False


def reservations_admitted(*, reservation_ids: list[str], pool: str) -> None:
    """Record in the database that Redis moved these queued reservations onto the pool (the
    scheduler's dispatch round, inference/lua/dispatch.lua): their lease starts now."""
    Reservation.objects.filter(pk__in=reservation_ids, state=Reservation.State.QUEUED).update(
        state=Reservation.State.ADMITTED,
        expires_at=timezone.now() + timedelta(seconds=pool_lease_s(pool)),
    )


def reservation_extend(*, reservation_id: str, seconds: int) -> None:
    """A worker still on the job pushes its lease out (heartbeat), in the DB and in Redis."""
    reservation = Reservation.objects.get(pk=reservation_id)
    until = timezone.now() + timedelta(seconds=seconds)
    Reservation.objects.filter(pk=reservation_id, state__in=Reservation.ACTIVE_STATES).update(
        expires_at=until
    )
    keys = _keys_for(reservation)
    until_ms = int(until.timestamp() * 1000)
    pipe = redis_client().pipeline()
    pipe.zadd(keys.in_flight, {reservation_id: until_ms}, xx=True)
    pipe.zadd(keys.pool_zset, {reservation_id: until_ms}, xx=True)
    pipe.execute()


# --- recovery ---------------------------------------------------------------------------------


# Budget used = reserve - refund + adjust (open reservations count as used).
BUDGET_SIGN = {LedgerEntry.Kind.RESERVE: 1, LedgerEntry.Kind.REFUND: -1, LedgerEntry.Kind.ADJUST: 1}


def budget_used_from_ledger(*, tenant_id: int, period: str) -> tuple[int, dict[int | None, int]]:
    """(budget used by the tenant, used per API key) = reserve - refund + adjust."""
    total, by_key, _ = _ledger_read(tenant_id=tenant_id, period=period)
    return total, by_key


def _ledger_read(
    *, tenant_id: int, period: str, reservation_ids: list[str] | None = None
) -> tuple[int, dict[int | None, int], set[str]]:
    """`budget_used_from_ledger`, and which of `reservation_ids` have their reserve in those
    figures: one statement, so one snapshot (two would disagree about a reservation committed
    between them)."""
    sign = BUDGET_SIGN
    rows = LedgerEntry.objects.filter(tenant_id=tenant_id, period=period, kind__in=list(sign))
    group_by = ["api_key_id", "kind"]
    if reservation_ids:
        rows = rows.annotate(asked=Case(When(reservation_id__in=reservation_ids,
                                             then=F("reservation_id")),
                                        default=None, output_field=CharField()))
        group_by.append("asked")
    total = 0
    by_key: dict[int | None, int] = {}
    seen: set[str] = set()
    for row in rows.values(*group_by).annotate(total=Sum("mcu")):
        amount = sign[row["kind"]] * row["total"]
        total += amount
        by_key[row["api_key_id"]] = by_key.get(row["api_key_id"], 0) + amount
        if row.get("asked") and row["kind"] == LedgerEntry.Kind.RESERVE:
            seen.add(row["asked"])
    return total, by_key, seen


def counters_rebuild(
    *, tenant_id: int, period: str, api_key_id: int | None = None, force: bool = False
) -> bool:
    """Restore a tenant's hot counters from the ledger. True if this call applied them.

    The running reservations are read first and locked until the counters are written: one
    that settled between that read and the ledger's had its refund in neither (its marker not
    restored, the refund not in the ledger read), and one that settled before the script ran
    refunded nothing (no budget counter yet, then its marker restored as running). Locked, its
    settlement waits for the script and refunds through the marker restored here.

    A settlement the ledger read holds and Redis has not released (Redis was down, or the
    process died before `settlement_mirror`, or is just about to call it) has its marker left
    as a tombstone, so that the sync or the reconciler's sweep do not refund it a second time.

    `force` (the rebuild_counters command): the counters exist and may be wrong. Dropping them
    for a rebuild lost what admissions Redis had counted and the database not yet committed
    hold (a job being stored), and their release then refunded a counter that never held
    them; instead rebuild.lua overwrites them in one step with the ledger's figures plus those
    admissions, found through the tenant's in-flight and queued zsets, read before the ledger.
    It reads again while those changed under it; False (nothing written) when they did at
    every one of REBUILD_FORCED_READS reads."""
    now = timezone.now()
    client = redis_client()
    tenant_keys = CounterKeys(tenant_id=tenant_id, api_key_id=0, period=period, pool="")
    with transaction.atomic():
        for _ in range(REBUILD_FORCED_READS if force else 1):
            open_read = _open_reservations_read(client, tenant_keys) if force else []
            payload = _rebuild_payload(client, tenant_id=tenant_id, period=period, now=now,
                                       api_key_id=api_key_id, open_read=open_read)
            if force:
                payload["force"] = {
                    "period": period, "in_flight_key": tenant_keys.in_flight,
                    "queued_key": tenant_keys.queued, "marker_prefix": RESERVATION_MARKER_PREFIX,
                    "read": open_read, "known": payload.pop("known"),
                }
            else:
                payload.pop("known")
            outcome = lua_script(client, "rebuild")(keys=[tenant_keys.budget],
                                                    args=[json.dumps(payload)])
            if outcome != REBUILD_READ_AGAIN:
                break
    if outcome == REBUILD_READ_AGAIN:
        logger.warning("counters of tenant %s for %s not rebuilt: its admissions kept changing "
                       "under %s reads", tenant_id, period, REBUILD_FORCED_READS)
    elif outcome:
        logger.info("rebuilt counters of tenant %s for %s from the ledger", tenant_id, period)
    return outcome == 1


def _open_reservations_read(client: redis.Redis, keys: CounterKeys) -> list[str]:
    """The reservations Redis holds open for the tenant of `keys`, in one round trip: admitted
    (its in-flight zset) or queued (its queued zset, but those whose marker has expired)."""
    pipe = client.pipeline(transaction=False)
    pipe.zrange(keys.in_flight, 0, -1)
    pipe.zrangebyscore(keys.queued, int(time.time() * 1000), "+inf")
    in_flight, queued = pipe.execute()
    return sorted({member.decode() for member in (*in_flight, *queued)})


def _rebuild_payload(client: redis.Redis, *, tenant_id: int, period: str, now: datetime,
                     api_key_id: int | None, open_read: list[str]) -> dict:
    """rebuild.lua's argument, read from the database inside `counters_rebuild`'s transaction
    (the running reservations locked), and `known`: those of `open_read` whose reserve the
    ledger figures hold."""
    running = Reservation.objects.select_for_update(no_key=True).filter(
        tenant_id=tenant_id, period=period, state__in=Reservation.ACTIVE_STATES
    ).order_by("pk")
    reservations = []
    for reservation in running:
        keys = _keys_for(reservation)
        reservations.append({
            "key": reservation_marker(reservation.id),
            "state": reservation.state,
            "cost": reservation.reserved_mcu,
            "pool": reservation.pool,
            "in_flight_key": keys.in_flight,
            "pool_hash": keys.pool_hash,
            "pool_zset": keys.pool_zset,
            "pool_sum": keys.pool_sum,
            "lease_until_ms": int(reservation.expires_at.timestamp() * 1000),
        })
    used, by_key, known = _ledger_read(tenant_id=tenant_id, period=period,
                                       reservation_ids=open_read)
    if api_key_id is not None:
        by_key.setdefault(api_key_id, 0)
    # Settlements Redis has not seen yet: the ledger read above holds them, so the rebuild
    # leaves their markers as tombstones for the sync's replay to find accounted for.
    settled = [
        _tombstone(reservation, live_only=False)
        for reservation in Reservation.objects.filter(
            tenant_id=tenant_id, period=period, redis_synced=False
        ).exclude(state__in=Reservation.ACTIVE_STATES)
    ]
    # Settlements committed and not (yet) mirrored: the same, for the reconciler's sweep (and
    # the mirror's own late call), where their marker is still live when the script runs.
    recent = list(_settled_recently(now=now).filter(tenant_id=tenant_id, period=period))
    live = _markers_live(client, [reservation.id for reservation in recent])
    settled += [_tombstone(reservation, live_only=True)
                for reservation in recent if reservation.id in live]
    return {
        "budget_used": used,
        "ttl_s": counter_ttl_s(period, now),
        "key_counters": {key_used_counter(key_id, period): value
                         for key_id, value in by_key.items()},
        "reservations": reservations,
        "settled": settled,
        "known": sorted(known),
    }


def _tombstone(reservation: Reservation, *, live_only: bool) -> dict:
    keys = _keys_for(reservation)
    return {
        "key": reservation_marker(reservation.id),
        "in_flight_key": keys.in_flight,
        "pool_hash": keys.pool_hash,
        "pool_zset": keys.pool_zset,
        "pool_sum": keys.pool_sum,
        "live_only": live_only,
    }


def _settled_recently(*, now: datetime) -> QuerySet[Reservation]:
    """Reservations settled (or expired) in the last MIRROR_SWEEP_WINDOW_S whose settlement
    Redis is taken to have seen: those a dead process may have left unmirrored."""
    return (
        Reservation.objects.filter(
            settled_at__gte=now - timedelta(seconds=MIRROR_SWEEP_WINDOW_S), redis_synced=True
        )
        .exclude(state__in=Reservation.ACTIVE_STATES)
        .only("tenant_id", "api_key_id", "period", "pool", "reserved_mcu", "settled_mcu",
              "settled_at", "redis_synced")
    )


def _markers_live(client: redis.Redis, reservation_ids: list[str]) -> set[str]:
    """Those of `reservation_ids` whose marker Redis holds live (not released, not a rebuild's
    tombstone): one round trip."""
    if not reservation_ids:
        return set()
    pipe = client.pipeline(transaction=False)
    for reservation_id in reservation_ids:
        pipe.hget(reservation_marker(reservation_id), "state")
    states = pipe.execute()
    return {reservation_id for reservation_id, state in zip(reservation_ids, states, strict=True)
            if state is not None and state != b"settled"}


def settlements_mirror_missed(*, now: datetime | None = None) -> int:
    """Mirror into Redis the settlements whose process died between their commit and
    `settlement_mirror` (the reconciler's sweep): a settled reservation of the last
    MIRROR_SWEEP_WINDOW_S, older than MIRROR_SWEEP_GRACE_S, whose marker is still live. Each
    batch costs one indexed query and one Redis round trip; only a repair costs more. Returns
    how many were mirrored; any is a process that died, so it is logged."""
    now = now or timezone.now()
    client = redis_client()
    settled = _settled_recently(now=now).filter(
        settled_at__lt=now - timedelta(seconds=MIRROR_SWEEP_GRACE_S)
    ).order_by("settled_at", "pk")
    mirrored = 0
    batch = list(settled[:MIRROR_SWEEP_BATCH])
    while batch:
        live = _markers_live(client, [reservation.id for reservation in batch])
        mirrored += sum(settlement_mirror(reservation) for reservation in batch
                        if reservation.id in live)
        if len(batch) < MIRROR_SWEEP_BATCH:
            break
        last = batch[-1]
        batch = list(settled.filter(Q(settled_at__gt=last.settled_at)
                                    | Q(settled_at=last.settled_at, pk__gt=last.pk))
                     [:MIRROR_SWEEP_BATCH])
    if mirrored:
        logger.warning("mirrored %s settlement(s) into Redis that their process committed and "
                       "never mirrored (it died in between)", mirrored)
    return mirrored


def reservations_expire(*, now: datetime | None = None) -> int:
    """Release reservations whose lease ran out (their worker died): a full refund."""
    now = now or timezone.now()
    expired_ids = list(
        Reservation.objects.filter(state__in=Reservation.ACTIVE_STATES, expires_at__lt=now)
        .values_list("id", flat=True)[:500]
    )
    released = 0
    for reservation_id in expired_ids:
        released += reservation_settle(
            reservation_id=reservation_id, actual_mcu=0, final_state=Reservation.State.EXPIRED
        )
    return released


def reservations_sync() -> int:
    """Replay into Redis what happened while it was unreachable. Safe to run repeatedly.

    Each reservation is replayed under its row's lock, as it is now: a settlement that commits
    between a read of the list and the replay would otherwise be replayed as still running
    (counted in full, its marker left behind) for the rest of the period. A settlement that
    comes during the replay waits for the lock, then finds the row synced and mirrors itself."""
    client = redis_client()
    synced = 0
    for reservation_id in list(
        Reservation.objects.filter(redis_synced=False).values_list("id", flat=True)[:500]
    ):
        with transaction.atomic():
            reservation = (Reservation.objects.select_for_update()
                           .filter(pk=reservation_id, redis_synced=False).first())
            if reservation is None:
                continue  # synced meanwhile
            try:
                _replay_in_redis(client, reservation)
            except redis.RedisError:
                break
            Reservation.objects.filter(pk=reservation.pk).update(redis_synced=True)
        synced += 1
    return synced


def _replay_in_redis(client: redis.Redis, reservation: Reservation) -> None:
    keys = _keys_for(reservation)
    active = reservation.state in Reservation.ACTIVE_STATES
    # Never counted (admitted while Redis was down, no marker): add what it holds or cost.
    # The marker is checked inside the script: a rebuild may come between (rebuild.lua).
    amount = reservation.reserved_mcu if active else reservation.settled_mcu
    counted_now = lua_script(client, "adopt")(
        keys=[keys.budget, keys.key_used, reservation_marker(reservation.id)],
        args=[amount, "marker" if active else "", reservation.reserved_mcu,
              reservation.pool, RESERVATION_TTL_S],
    )
    if not counted_now and not active:
        # Counted while running, settled since: release it (only its tombstone goes, when a
        # rebuild has counted the settlement already).
        _release_in_redis(client, keys, reservation.id,
                          refund_mcu=reservation.reserved_mcu - reservation.settled_mcu)


# --- alerts and status ---------------------------------------------------------------------------


def budget_threshold_reached(*, used_mcu: int, limit_mcu: int, threshold_pct: int) -> bool:
    return used_mcu * 100 >= limit_mcu * threshold_pct


def budget_alert_check(*, tenant_id: int, period: str, limits: QuotaLimits, used_mcu: int) -> None:
    if not limits.budget_mcu:
        return
    threshold = settings.SLUICE_BUDGET_ALERT_PCT
    if not budget_threshold_reached(used_mcu=used_mcu, limit_mcu=limits.budget_mcu,
                                    threshold_pct=threshold):
        return
    _, created = BudgetAlert.objects.get_or_create(
        tenant_id=tenant_id, period=period, threshold_pct=threshold,
        defaults={"used_mcu": used_mcu, "limit_mcu": limits.budget_mcu},
    )
    if created:
        logger.info("tenant %s passed %s%% of its %s budget", tenant_id, threshold, period)
        _budget_alert_publish(tenant_id=tenant_id, period=period, threshold_pct=threshold,
                              used_mcu=used_mcu, limit_mcu=limits.budget_mcu)


def _budget_alert_publish(*, tenant_id: int, period: str, threshold_pct: int, used_mcu: int,
                          limit_mcu: int) -> None:
    try:
        webhook_event_publish(
            tenant=Tenant.objects.get(pk=tenant_id),
            event_type="budget.threshold_reached",
            data={"period": period, "threshold_pct": threshold_pct,
                  "used_cu": mcu_to_cu(used_mcu), "limit_cu": mcu_to_cu(limit_mcu)},
        )
    except Exception:
        # The reservation is already committed; a webhook problem must not fail the request.
        logger.exception("could not publish the budget alert webhook for tenant %s", tenant_id)


def ledger_adjust(*, tenant_id: int, mcu: int, note: str, api_key_id: int | None = None) -> LedgerEntry:
    """An operator's correction (credit with a negative amount), committed, then added to the
    tenant's counters that exist (a missing one is rebuilt from the ledger, adjustment included)."""
    period = period_of(timezone.now())
    entry = LedgerEntry.objects.create(tenant_id=tenant_id, api_key_id=api_key_id,
                                       kind=LedgerEntry.Kind.ADJUST, mcu=mcu, period=period,
                                       note=note[:200])
    keys = CounterKeys(tenant_id=tenant_id, api_key_id=api_key_id or 0, period=period, pool="")
    lua_script(redis_client(), "adjust")(keys=[keys.budget, keys.key_used], args=[mcu])
    return entry

"""Reads for reports: usage from the ledger (per tenant), and for operators the load of the
pools, the period's use of every tenant and recent admission rejections."""

from __future__ import annotations

import time as time_module
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from django.db.models import Count, Q, Sum
from django.db.models.functions import Coalesce, TruncDate

from portal.models import Tenant
from quotas.cost import mcu_to_cu
from quotas.ledger import BUDGET_SIGN
from quotas.limits import CounterKeys, pool_capacity_mcu, pool_slots, rejections_key
from quotas.models import LedgerEntry

GROUPINGS = {"day": "day", "model": "model", "key": "api_key_id"}


def usage_rows(*, tenant: Tenant, start: date, end: date, group_by: list[str]) -> list[dict]:
    """CU charged per group between start and end (inclusive), oldest first. A settlement counts
    on the day its work was admitted (its reservation's), an adjustment on its own: the day of
    the period whose budget it is billed to. By the settlement's own day, a job admitted before
    midnight at the end of a month and settled after it was in the next month's usage and
    missing from its own, which its budget and the ledger's period bill it to."""
    fields = [GROUPINGS[name] for name in group_by]
    admitted_at = Coalesce("reservation__created_at", "created_at")
    queryset = LedgerEntry.objects.filter(
        tenant=tenant,
        kind__in=[LedgerEntry.Kind.SETTLE, LedgerEntry.Kind.ADJUST],
        # A range on the (tenant, period, kind) index: "YYYY-MM" sorts as its months do. (A
        # list of the periods between had 96,000 entries for an export ending 9999-12-31.)
        period__gte=f"{start.year:04d}-{start.month:02d}", period__lte=f"{end.year:04d}-{end.month:02d}",
    ).alias(admitted_at=admitted_at).filter(
        admitted_at__gte=datetime.combine(start, time.min, tzinfo=UTC))
    if end < date.max:  # the day after 9999-12-31 is an OverflowError (it was a 500)
        queryset = queryset.filter(
            admitted_at__lt=datetime.combine(end + timedelta(days=1), time.min, tzinfo=UTC))
    queryset = queryset.annotate(day=TruncDate(admitted_at, tzinfo=UTC))
    rows = (
        queryset.values(*fields)
        .annotate(mcu=Sum("mcu"), requests=Count("id", filter=Q(kind=LedgerEntry.Kind.SETTLE)))
        .order_by(*fields)
    )
    return list(rows)



def usage_chart(*, tenant: Tenant, start: date, end: date) -> dict:
    """CU charged per day and model, shaped for a stacked bar chart: every day in the range
    is a label (days without usage are zero), one series per model."""
    days = [start + timedelta(days=offset) for offset in range((end - start).days + 1)]
    series: dict[str, list[float]] = {}
    for row in usage_rows(tenant=tenant, start=start, end=end, group_by=["day", "model"]):
        values = series.setdefault(row["model"] or "other", [0.0] * len(days))
        values[(row["day"] - start).days] += mcu_to_cu(row["mcu"])
    ordered = sorted(series.items())
    return {"labels": [day.isoformat() for day in days],
            "series": [{"model": model, "cu": values} for model, values in ordered],
            # The same numbers by day, for the chart's accessible table.
            "rows": [[day.isoformat(), *(values[index] for _, values in ordered)]
                     for index, day in enumerate(days)]}


def budget_used_by_tenant(*, period: str) -> dict[int, int]:
    """mCU used (charged or reserved) this period, per tenant: the operator console's view."""
    used: dict[int, int] = {}
    rows = (LedgerEntry.objects.filter(period=period, kind__in=list(BUDGET_SIGN))
            .values("tenant_id", "kind").annotate(total=Sum("mcu")))
    for row in rows:
        used[row["tenant_id"]] = used.get(row["tenant_id"], 0) + BUDGET_SIGN[row["kind"]] * row["total"]
    return used


@dataclass(frozen=True)
class PoolLoad:
    pool: str
    in_flight_mcu: int
    capacity_mcu: int
    jobs_in_flight: int
    slots: int

    @property
    def used_pct(self) -> float:
        return round(100 * self.in_flight_mcu / self.capacity_mcu, 1) if self.capacity_mcu else 0.0


def pool_load(*, pool: str, client) -> PoolLoad:
    """CU and jobs a pool's semaphore holds now (leases that ran out no longer count)."""
    keys = CounterKeys(tenant_id=0, api_key_id=0, period="", pool=pool)
    now_ms = int(time_module.time() * 1000)
    pipe = client.pipeline(transaction=False)
    pipe.get(keys.pool_sum)
    pipe.zcount(keys.pool_zset, now_ms, "+inf")
    in_flight, jobs = pipe.execute()
    return PoolLoad(pool=pool, in_flight_mcu=int(in_flight or 0), capacity_mcu=pool_capacity_mcu(pool),
                    jobs_in_flight=int(jobs), slots=pool_slots(pool))


def rejections_recent(*, client, hours: int = 24, now: datetime | None = None) -> dict[str, int]:
    """Admission rejections per error code over the last `hours` hours, most frequent first."""
    now = now or datetime.now(UTC)
    pipe = client.pipeline(transaction=False)
    for back in range(hours):
        pipe.hgetall(rejections_key(now - timedelta(hours=back)))
    totals: dict[str, int] = {}
    for counts in pipe.execute():
        for code, count in counts.items():
            name = code.decode() if isinstance(code, bytes) else code
            totals[name] = totals.get(name, 0) + int(count)
    return dict(sorted(totals.items(), key=lambda item: (-item[1], item[0])))

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from django.db.models import Count, QuerySet

from inference.models import Job
from inference.scheduler import scheduler_pools
from portal.db import Page, page_after
from portal.errors import NotFound
from portal.models import Tenant


def job_get_for_tenant(*, tenant: Tenant, job_id: str, kind: str | None = None) -> Job:
    """Missing, deleted, another tenant's, or another kind's job: the same NotFound."""
    queryset = Job.objects.filter(tenant=tenant, pk=job_id, deleted_at__isnull=True)
    if kind is not None:
        queryset = queryset.filter(kind=kind)
    job = queryset.first()
    if job is None:
        raise NotFound(f"No job {job_id!r}.", param="id")
    return job


def jobs_page_for_tenant(*, tenant: Tenant, kind: str | None = None,
                         statuses: Iterable[str] | None = None, after: str | None = None,
                         order: str = "desc", limit: int = 20) -> Page:
    """A page of the tenant's jobs in id order (`desc`: newest first; job ids are ULIDs, their
    order is their creation's), after the id `after` in that order."""
    queryset: QuerySet[Job] = Job.objects.filter(tenant=tenant, deleted_at__isnull=True)
    if kind:
        queryset = queryset.filter(kind=kind)
    if statuses:
        queryset = queryset.filter(status__in=list(statuses))
    return page_after(queryset, after=after, order=order, limit=limit)


def jobs_in_flight_for_tenant(*, tenant: Tenant) -> dict[str, int]:
    """How many of the tenant's jobs are queued and running right now."""
    counts = dict(
        Job.objects.filter(tenant=tenant, status__in=[Job.Status.QUEUED, Job.Status.RUNNING])
        .values_list("status").annotate(n=Count("id"))
    )
    return {"queued": counts.get(Job.Status.QUEUED, 0), "running": counts.get(Job.Status.RUNNING, 0)}


def jobs_running_by_pool() -> dict[str, int]:
    """Jobs a worker is running now, per pool, every scheduler pool included (zeros too): the
    metrics' gauge, and what `make run`'s stop waits for. Platform-wide, so no tenant."""
    running = dict.fromkeys(scheduler_pools(), 0)
    running.update(
        Job.objects.filter(status=Job.Status.RUNNING).values("pool")
        .annotate(jobs=Count("id")).values_list("pool", "jobs")
    )
    return running


def job_errors_for_tenant(*, tenant: Tenant, since: datetime) -> list[dict]:
    """Failed jobs since `since`, counted per error code, most frequent first."""
    return list(
        Job.objects.filter(tenant=tenant, status=Job.Status.FAILED, finished_at__gte=since)
        .values("error_code").annotate(count=Count("id")).order_by("-count", "error_code")
    )

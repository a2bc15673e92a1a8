from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from django.db.models import Count, QuerySet

from inference.models import Job
from inference.scheduler import scheduler_pools
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


@dataclass(frozen=True)
class JobPage:
    jobs: list[Job]
    has_more: bool


def jobs_page_for_tenant(*, tenant: Tenant, kind: str | None = None,
                         statuses: Iterable[str] | None = None, after: str | None = None,
                         order: str = "desc", limit: int = 20) -> JobPage:
    """A page of a list in id order (`desc`: newest first), after the id `after` in that order.
    One row more than the page is read: whether there is more is known, not guessed from a
    full page (a last page that is exactly full said there was more)."""
    rows = list(_jobs_listed(tenant=tenant, kind=kind, statuses=statuses, after=after,
                             order=order)[:limit + 1])
    return JobPage(jobs=rows[:limit], has_more=len(rows) > limit)


def _jobs_listed(*, tenant: Tenant, kind: str | None, statuses: Iterable[str] | None,
                 after: str | None, order: str) -> QuerySet[Job]:
    # Job ids are ULIDs: their order is their creation's.
    queryset: QuerySet[Job] = Job.objects.filter(tenant=tenant, deleted_at__isnull=True)
    if kind:
        queryset = queryset.filter(kind=kind)
    if statuses:
        queryset = queryset.filter(status__in=list(statuses))
    if order == "asc":
        return queryset.filter(id__gt=after).order_by("id") if after else queryset.order_by("id")
    return queryset.filter(id__lt=after).order_by("-id") if after else queryset.order_by("-id")


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

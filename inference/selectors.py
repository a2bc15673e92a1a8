from __future__ import annotations

from datetime import datetime

from django.db.models import Count, QuerySet

from inference.models import Job
from portal.errors import NotFound
from portal.models import Tenant


def job_get_for_tenant(*, tenant: Tenant, job_id: str, kind: str | None = None) -> Job:
    """Missing, another tenant's, or another kind's job: the same NotFound."""
    queryset = Job.objects.filter(tenant=tenant, pk=job_id)
    if kind is not None:
        queryset = queryset.filter(kind=kind)
    job = queryset.first()
    if job is None:
        raise NotFound(f"No job {job_id!r}.", param="id")
    return job


def jobs_for_tenant(*, tenant: Tenant, kind: str | None = None, status: str | None = None,
                    after: str | None = None, limit: int = 20) -> list[Job]:
    """Newest first; `after` is the last id of the previous page (ids sort by time)."""
    queryset: QuerySet[Job] = Job.objects.filter(tenant=tenant).order_by("-id")
    if kind:
        queryset = queryset.filter(kind=kind)
    if status:
        queryset = queryset.filter(status=status)
    if after:
        queryset = queryset.filter(id__lt=after)
    return list(queryset[:limit])


def jobs_in_flight_for_tenant(*, tenant: Tenant) -> dict[str, int]:
    """How many of the tenant's jobs are queued and running right now."""
    counts = dict(
        Job.objects.filter(tenant=tenant, status__in=[Job.Status.QUEUED, Job.Status.RUNNING])
        .values_list("status").annotate(n=Count("id"))
    )
    return {"queued": counts.get(Job.Status.QUEUED, 0), "running": counts.get(Job.Status.RUNNING, 0)}


def job_errors_for_tenant(*, tenant: Tenant, since: datetime) -> list[dict]:
    """Failed jobs since `since`, counted per error code, most frequent first."""
    return list(
        Job.objects.filter(tenant=tenant, status=Job.Status.FAILED, finished_at__gte=since)
        .values("error_code").annotate(count=Count("id")).order_by("-count", "error_code")
    )

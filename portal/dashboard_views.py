"""Dashboard pages for work: jobs (live list, detail, cancel, media), the playground and the
usage export. Thin: resolve the membership (tenant_page), call a selector or one service."""

from __future__ import annotations

import csv
import uuid
from datetime import date, timedelta
from urllib.parse import urlencode

from django.contrib import messages
from django.http import HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST
from redis import RedisError
from rest_framework.exceptions import ValidationError

from inference.media import job_media_response
from inference.models import Job
from inference.registry import model_get, models_for_tier
from inference.selectors import job_get_for_tenant, jobs_page_for_tenant
from inference.services import job_cancel
from portal import selectors, services
from portal.errors import InvalidParameter, PermissionDenied, SluiceError, to_sluice_error
from portal.models import Membership, Role
from portal.views import tenant_page
from quotas.cost import mcu_to_cu
from quotas.limits import period_bounds, period_of
from quotas.selectors import usage_rows

JOBS_SHOWN = 50
USAGE_EXPORT_MAX_DAYS = 366


def _job_filters(request) -> dict:
    """Filters from the query string; unknown values are ignored rather than refused."""
    kind = request.GET.get("kind", "")
    status = request.GET.get("status", "")
    return {"kind": kind if kind in Job.Kind.values else "",
            "status": status if status in Job.Status.values else ""}


@tenant_page
def jobs_page(request, membership: Membership):
    filters = _job_filters(request)
    after = request.GET.get("after") or None
    page = jobs_page_for_tenant(tenant=membership.tenant, limit=JOBS_SHOWN, after=after,
                                kind=filters["kind"] or None,
                                statuses=[filters["status"]] if filters["status"] else None)
    shown = {name: value for name, value in filters.items() if value}
    context = {
        "tenant": membership.tenant,
        "jobs": page.rows,
        # Older jobs are a page on, after the last one shown (ids sort by time), filters kept.
        "older_query": urlencode({**shown, "after": page.rows[-1].pk}) if page.has_more else None,
        "newest_query": urlencode(shown) if after else None,
        "filters": filters,
        "kinds": Job.Kind.choices,
        "statuses": Job.Status.choices,
    }
    # htmx asks for the table alone when a filter changes or a live event arrives.
    template = "portal/_jobs_table.html" if request.headers.get("HX-Request") else "portal/jobs.html"
    return render(request, template, context)


def _job_context(membership: Membership, job: Job) -> dict:
    return {"tenant": membership.tenant, "job": job,
            "can_cancel": membership.has_role_at_least(Role.MEMBER) and not job.is_terminal}


@tenant_page
def job_detail_page(request, membership: Membership, job_id: str):
    job = job_get_for_tenant(tenant=membership.tenant, job_id=job_id)
    return render(request, "portal/job_detail.html", _job_context(membership, job))


@require_POST
@tenant_page
def job_cancel_view(request, membership: Membership, job_id: str):
    services.require_role(membership=membership, role=Role.MEMBER)
    job = job_get_for_tenant(tenant=membership.tenant, job_id=job_id)
    try:
        job_cancel(job=job)
        messages.success(request, f"Cancelling {job.pk}: a running job stops at its next step.")
    except SluiceError as exc:
        messages.error(request, exc.message)
    except RedisError:  # the scheduler's queue did not answer; cancelling again finishes it
        messages.error(request, f"Could not cancel {job.pk} right now: try again in a moment.")
    return redirect("tenant-job", tenant_slug=membership.tenant.slug, job_id=job.pk)


@tenant_page
def job_content_view(request, membership: Membership, job_id: str):
    """The video or thumbnail for the dashboard's <video>/<img>: the session's counterpart of
    /v1/videos/{id}/content, which takes API keys only."""
    job = job_get_for_tenant(tenant=membership.tenant, job_id=job_id, kind=Job.Kind.VIDEO)
    try:
        return job_media_response(request, job=job, variant=request.GET.get("variant", "video"))
    except InvalidParameter as exc:
        return HttpResponse(exc.message, status=400, content_type="text/plain")


def _default_model(models) -> str:
    return models[0].id if models else ""


PLAYGROUND_FIELDS = {
    "video": {"prompt": str, "size": str, "seconds": str, "num_inference_steps": str},
    "text": {"prompt": str, "max_tokens": int, "temperature": float},
}


def _playground_payload(form) -> dict:
    """The API payload a playground form stands for: the fields of the chosen model's kind,
    numbers as numbers for the text endpoint's strict parser. An unknown model is the API's
    404 model_not_found."""
    model = form.get("model", "")
    fields = PLAYGROUND_FIELDS[model_get(model).kind]
    payload = {"model": model}
    for name, kind in fields.items():
        raw = form.get(name)
        if not raw:
            continue
        try:
            payload[name] = kind(raw)
        except ValueError as exc:
            raise InvalidParameter(f"{name} must be a number.", param=name) from exc
    return payload


@tenant_page
def playground_page(request, membership: Membership):
    tenant = membership.tenant
    models = models_for_tier(tenant.tier)
    error = None
    status = 200
    if request.method == "POST":
        try:
            payload = _playground_payload(request.POST)
            submission = services.playground_submit(
                actor=membership, payload=payload, form_token=request.POST.get("form_token"))
            return redirect(f"{reverse('tenant-playground', args=[tenant.slug])}?job={submission.job.pk}")
        except PermissionDenied:
            raise  # a viewer: tenant_page answers 403
        except (SluiceError, ValidationError) as exc:
            error = to_sluice_error(exc)  # the API's message and code, shown beside the form
            status = error.http_status
    job_id = request.GET.get("job")
    job = job_get_for_tenant(tenant=tenant, job_id=job_id) if job_id else None
    context = {
        "tenant": tenant,
        "models": models,
        "selected": request.POST.get("model") or (job.model if job else _default_model(models)),
        "form": request.POST if error else {},
        "error": error,
        "form_token": uuid.uuid4().hex,
        "can_run": membership.has_role_at_least(Role.MEMBER),
        **(_job_context(membership, job) if job else {}),
    }
    return render(request, "portal/playground.html", context, status=status)


def _date_param(request, name: str, default: date) -> date:
    raw = request.GET.get(name)
    if not raw:
        return default
    try:
        return date.fromisoformat(raw)
    except ValueError as exc:
        raise InvalidParameter(f"{name} must be a date (YYYY-MM-DD).", param=name) from exc


# A cell starting with one of these is a formula to a spreadsheet (OWASP "CSV injection").
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_text(value: str) -> str:
    """Free text for a CSV cell: key names are typed by any member, and whoever opens the
    export in a spreadsheet would run a name like `=HYPERLINK(...)`. The quote makes it text."""
    return f"'{value}" if value.startswith(_FORMULA_STARTS) else value


class _Echo:
    def write(self, value: str) -> str:
        return value


@tenant_page
def usage_export_view(request, membership: Membership):
    """The ledger's usage rows (day x model x key) for a date range, streamed as CSV."""
    tenant = membership.tenant
    period_start = period_bounds(period_of(timezone.now()))[0].date()
    try:
        start = _date_param(request, "start", period_start)
        end = _date_param(request, "end", timezone.now().date())
        if start > end or (end - start) > timedelta(days=USAGE_EXPORT_MAX_DAYS):
            raise InvalidParameter(f"Choose start <= end, at most {USAGE_EXPORT_MAX_DAYS} days apart.")
    except InvalidParameter as exc:
        return HttpResponse(exc.message, status=400, content_type="text/plain")
    key_names = {key.pk: f"{key.name} ({key.masked})" for key in selectors.api_keys_for_tenant(tenant=tenant)}
    rows = usage_rows(tenant=tenant, start=start, end=end, group_by=["day", "model", "key"])
    writer = csv.writer(_Echo())

    def lines():
        yield writer.writerow(["date", "model", "api_key", "requests", "cu"])
        for row in rows:
            yield writer.writerow([row["day"].isoformat(), _csv_text(row["model"]),
                                   _csv_text(key_names.get(row["api_key_id"], "deleted key")),
                                   row["requests"], mcu_to_cu(row["mcu"])])

    # Key names carry "…" (ApiKey.masked): without the charset, clients read it as Latin-1.
    response = StreamingHttpResponse(lines(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{tenant.slug}-usage-{start}-{end}.csv"'
    return response

"""Job endpoints: list, retrieve, cancel, and follow (SSE)."""

from __future__ import annotations

import asyncio
import functools
from datetime import datetime, timedelta

from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.exceptions import NotAcceptable
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.response import Response
from rest_framework.views import APIView

from inference.errors import StreamInterrupted
from inference.events import JobEnd, events_to_end
from inference.models import Job
from inference.scheduler import scheduler_position
from inference.selectors import job_get_for_tenant, jobs_page_for_tenant
from inference.services import job_cancel, job_delete, job_terminal_event
from portal.authentication import ApiPrincipal, api_key_from_authorization, method_not_allowed
from portal.db import Page, database_step
from portal.errors import InvalidApiKey, SluiceError, json_error
from portal.models import ApiKey, Membership

SSE_KEEPALIVE_S = 15


def _epoch(moment) -> int | None:
    return int(moment.timestamp()) if moment else None


def job_queue_info(job: Job) -> dict | None:
    """A queued job's `queue`: `position`, the jobs that start before it (higher priorities
    included); `eta_seconds`, how long until it should have run, from the work ahead of it in
    estimated CU (what the pool's running jobs have left, and the jobs queued ahead) and its own,
    at the pool's recent throughput (CU per second of run), or null before the pool has
    completed a job. None once it is no longer queued."""
    if job.status != Job.Status.QUEUED:
        return None
    position = scheduler_position(job_id=job.pk, pool=job.pool, priority=job.priority)
    if position is None:
        return {"position": 0, "eta_seconds": None}  # admitted, about to start
    return {"position": position.position, "eta_seconds": position.eta_s}


class JobOutputSerializer(serializers.Serializer):
    def to_representation(self, job: Job) -> dict:
        return {
            "id": job.pk,
            "object": "job",
            "kind": job.kind,
            "model": job.model,
            "variant": job.variant,
            "status": job.status,
            "priority": job.priority,
            "pool": job.pool,
            "queue": job_queue_info(job),
            "progress": round(job.progress, 1),
            "attempts": job.attempts,
            "estimated_cu": job.estimated_mcu / 1000,
            "actual_cu": None if job.actual_mcu is None else job.actual_mcu / 1000,
            "created_at": _epoch(job.queued_at),
            "started_at": _epoch(job.started_at),
            "first_output_at": _epoch(job.first_output_at),
            "finished_at": _epoch(job.finished_at),
            "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
            "result": job.result or None,
            "usage": job.usage or None,
        }


class ListInput(serializers.Serializer):
    """OpenAI's list parameters: `after` an id of the previous page, in `order`."""

    after = serializers.CharField(required=False, max_length=40)
    limit = serializers.IntegerField(required=False, min_value=1, max_value=100, default=20)
    order = serializers.ChoiceField(choices=["asc", "desc"], required=False, default="desc")


def list_body(page: Page, data: list[dict]) -> dict:
    """OpenAI's list shape around a page of objects (jobs, videos, a webhook delivery log)."""
    return {"object": "list", "data": data,
            "first_id": page.rows[0].pk if page.rows else None,
            "last_id": page.rows[-1].pk if page.rows else None,
            "has_more": page.has_more}


class JobListApi(APIView):
    class Input(ListInput):
        kind = serializers.ChoiceField(choices=Job.Kind.choices, required=False)
        status = serializers.ChoiceField(choices=Job.Status.choices, required=False)

    @extend_schema(operation_id="jobs_list", parameters=[Input], responses=JobOutputSerializer(many=True))
    def get(self, request):
        params = self.Input(data=request.query_params)
        params.is_valid(raise_exception=True)
        data = dict(params.validated_data)
        status = data.pop("status", None)
        page = jobs_page_for_tenant(tenant=request.user.tenant, statuses=[status] if status else None,
                                    **data)
        return Response(list_body(page, JobOutputSerializer(page.rows, many=True).data))


class JobDetailApi(APIView):
    @extend_schema(operation_id="jobs_retrieve", responses=JobOutputSerializer)
    def get(self, request, job_id: str):
        job = job_get_for_tenant(tenant=request.user.tenant, job_id=job_id)
        return Response(JobOutputSerializer(job).data)

    @extend_schema(operation_id="jobs_delete")
    def delete(self, request, job_id: str):
        job = job_get_for_tenant(tenant=request.user.tenant, job_id=job_id)
        job_delete(job=job)
        return Response(deleted_representation(job, object_name="job.deleted"))


def deleted_representation(job: Job, *, object_name: str) -> dict:
    """OpenAI's answer to a DELETE (the SDK's `videos.delete()` reads `deleted`)."""
    return {"id": job.pk, "object": object_name, "deleted": True}


class JobCancelApi(APIView):
    @extend_schema(operation_id="jobs_cancel", request=None, responses=JobOutputSerializer)
    def post(self, request, job_id: str):
        job = job_cancel(job=job_get_for_tenant(tenant=request.user.tenant, job_id=job_id))
        return Response(JobOutputSerializer(job).data)


# --- following a job -------------------------------------------------------------------------


def job_for_caller(*, authorization: str, user, job_id: str) -> Job:
    """The job if the caller may see it: by API key (its tenant), or by dashboard session
    (a tenant the user belongs to). Raises the same NotFound otherwise."""
    return job_for_key_or_user(api_key=api_key_from_authorization(authorization), user=user,
                               job_id=job_id)


def job_for_key_or_user(*, api_key: ApiKey | None, user, job_id: str) -> Job:
    from portal.errors import NotFound

    if api_key is not None:
        return job_get_for_tenant(tenant=api_key.tenant, job_id=job_id)
    if user is not None and user.is_authenticated:
        job = Job.objects.filter(pk=job_id, deleted_at__isnull=True).first()
        if job and Membership.objects.filter(user=user, tenant_id=job.tenant_id).exists():
            return job
        raise NotFound(f"No job {job_id!r}.", param="id")
    raise InvalidApiKey("You didn't provide an API key. Send it as 'Authorization: Bearer sk-...'.")


def _after_seq(raw: str | None) -> int:
    try:
        return max(0, int(raw or 0))
    except ValueError:
        return 0


@database_step
def job_end_read(job_id: str) -> JobEnd | None:
    """How the job ended, from its row (None while it runs): what a follower is sent when the
    job's stream cannot say it (events.events_to_end)."""
    job = Job.objects.filter(pk=job_id).first()
    if job is None or not job.is_terminal:
        return None
    event_type, data = job_terminal_event(job)
    return JobEnd(type=event_type, data=data, ended_at=(job.finished_at or job.queued_at).timestamp())


def _job_for_request(request, *, user, job_id: str) -> Job:
    """job_for_caller for an HTTP request. A key is the request's principal, as DRF's views make
    it: its answers, errors and the stream alike, carry the rate-limit headers (DESIGN.md)."""
    api_key = api_key_from_authorization(request.headers.get("Authorization", ""))
    if api_key is not None:
        request.user = ApiPrincipal(api_key=api_key)
    return job_for_key_or_user(api_key=api_key, user=user, job_id=job_id)


@csrf_exempt  # it changes nothing: any method but a read is the JSON 405, not CSRF's HTML 403
async def job_events_sse(request, job_id: str):
    """GET /v1/jobs/{id}/events: the job's events as Server-Sent Events, resumable with
    Last-Event-ID (or ?after=<seq>). Ends after the terminal event; 204 to a client resuming
    after it (EventSource reconnects after every end of a response, but not after a 204)."""
    if request.method not in ("GET", "HEAD"):
        return await database_step(method_not_allowed)(request, allowed="GET, HEAD")
    user = await request.auser()
    try:
        # database_step: the connection goes back to the pool when the call returns.
        job = await database_step(_job_for_request)(request, user=user, job_id=job_id)
        after = _after_seq(request.headers.get("Last-Event-ID") or request.GET.get("after"))
        events = await events_to_end(job_id=job.pk, after_seq=after, block_ms=round(SSE_KEEPALIVE_S * 1000),
                                     job_end=functools.partial(job_end_read, job.pk))
    except SluiceError as error:
        return json_error(error)
    if events is None:
        return HttpResponse(status=204)

    async def stream():
        yield ": connected\n\n"
        try:
            async for event in events:
                yield ": keep-alive\n\n" if event is None else event.as_sse()
                await asyncio.sleep(0)
        except StreamInterrupted:
            return  # the client reconnects with Last-Event-ID and misses nothing

    response = StreamingHttpResponse(stream(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


# --- videos (OpenAI's Videos API shape) ------------------------------------------------------

_VIDEO_STATUS = {
    Job.Status.QUEUED: "queued",
    Job.Status.RUNNING: "in_progress",
    Job.Status.SUCCEEDED: "completed",
    Job.Status.FAILED: "failed",
    Job.Status.CANCELLED: "cancelled",
    Job.Status.REJECTED: "failed",
}


def video_content_expiry(job: Job) -> datetime | None:
    """When a completed video's files go (inference/retention.py): its retention after its end,
    the one it expired under once it has. None while it has no files, or keeps them for ever."""
    from inference.retention import RETENTION_DAYS

    if job.status != Job.Status.SUCCEEDED or job.finished_at is None:
        return None
    days = (job.result or {}).get(RETENTION_DAYS, settings.SLUICE_MEDIA_RETENTION_DAYS)
    return job.finished_at + timedelta(days=days) if days else None


def video_representation(job: Job) -> dict:
    params = job.params
    return {
        "id": job.pk,
        "object": "video",
        "model": job.model,
        "status": _VIDEO_STATUS[job.status],
        "progress": int(job.progress),
        "prompt": params.get("prompt"),
        "seconds": f"{params.get('seconds', 0):g}",
        "size": f"{params.get('width')}x{params.get('height')}",
        "num_inference_steps": params.get("steps"),
        "frames": params.get("frames"),
        "created_at": _epoch(job.queued_at),
        # When it ended, however it ended (OpenAI sets it on failed videos too).
        "completed_at": _epoch(job.finished_at),
        "expires_at": _epoch(video_content_expiry(job)),
        "queue": job_queue_info(job),
        "estimated_cu": job.estimated_mcu / 1000,
        "actual_cu": None if job.actual_mcu is None else job.actual_mcu / 1000,
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
    }


class VideoListApi(APIView):
    from rest_framework.parsers import FormParser, MultiPartParser

    from portal.parsers import JsonObjectParser

    # The openai SDK posts videos as multipart/form-data.
    parser_classes = [JsonObjectParser, MultiPartParser, FormParser]

    @extend_schema(operation_id="videos_create", request=None)
    def post(self, request):
        from inference.services import video_job_create
        from quotas.cost import mcu_to_cu

        payload = {key: request.data.get(key) for key in request.data}
        submission = video_job_create(api_key=request.auth, payload=payload,
                                      idempotency_key=request.headers.get("Idempotency-Key"),
                                      endpoint="videos", request_id=getattr(request, "request_id", ""))
        return Response(video_representation(submission.job), status=200 if submission.replayed else 201,
                        headers={"x-cu-estimate": str(mcu_to_cu(submission.job.estimated_mcu))})

    class ListInput(ListInput):
        status = serializers.ChoiceField(choices=sorted(set(_VIDEO_STATUS.values())), required=False)

    @extend_schema(operation_id="videos_list", parameters=[ListInput])
    def get(self, request):
        params = self.ListInput(data=request.query_params)
        params.is_valid(raise_exception=True)
        data = dict(params.validated_data)
        status = data.pop("status", None)
        statuses = [job_status for job_status, name in _VIDEO_STATUS.items() if name == status]
        page = jobs_page_for_tenant(tenant=request.user.tenant, kind=Job.Kind.VIDEO,
                                    statuses=statuses or None, **data)
        return Response(list_body(page, [video_representation(job) for job in page.rows]))


class VideoDetailApi(APIView):
    @extend_schema(operation_id="videos_retrieve")
    def get(self, request, job_id: str):
        job = job_get_for_tenant(tenant=request.user.tenant, job_id=job_id, kind=Job.Kind.VIDEO)
        return Response(video_representation(job))

    @extend_schema(operation_id="videos_delete")
    def delete(self, request, job_id: str):
        job = job_get_for_tenant(tenant=request.user.tenant, job_id=job_id, kind=Job.Kind.VIDEO)
        job_delete(job=job)
        return Response(deleted_representation(job, object_name="video.deleted"))


class _AnyAcceptNegotiation(DefaultContentNegotiation):
    """The openai SDK downloads with `Accept: application/binary`, which no renderer offers:
    the body is a file whatever the client accepts, and errors still render as JSON."""

    def select_renderer(self, request, renderers, format_suffix=None):
        try:
            return super().select_renderer(request, renderers, format_suffix)
        except NotAcceptable:
            return renderers[0], renderers[0].media_type


class VideoContentApi(APIView):
    content_negotiation_class = _AnyAcceptNegotiation

    @extend_schema(operation_id="videos_content")
    def get(self, request, job_id: str):
        from inference.media import job_media_response

        job = job_get_for_tenant(tenant=request.user.tenant, job_id=job_id, kind=Job.Kind.VIDEO)
        return job_media_response(request, job=job, variant=request.query_params.get("variant", "video"))

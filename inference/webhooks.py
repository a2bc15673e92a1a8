"""Webhooks: endpoints, publishing events, and at-least-once signed delivery.

Flow: `webhook_event_publish` records an event and one WebhookDelivery per subscribed endpoint,
and enqueues attempt 1 on the `webhooks` queue when the transaction commits. The task calls
`webhook_delivery_attempt`, which claims the attempt with a conditional update, POSTs the signed
body through the SSRF guard and records the outcome. A failed attempt schedules the next one in
the database (`next_attempt_at`, from SLUICE_WEBHOOK_RETRY_SCHEDULE_S with jitter); the periodic
`webhook_deliveries_dispatch` hands due ones back to the queue. Retries live in the database, not
in Celery countdowns, because the schedule spans a day and a Redis broker redelivers long-ETA
messages unreliably; it also means a lost message or a killed worker is retried, never forgotten.

An endpoint has at most SLUICE_WEBHOOK_ENDPOINT_MAX_IN_FLIGHT deliveries in flight: each attempt
holds a slot of the endpoint's lease semaphore (quotas' semaphore, inference/lua/webhook_slot_*.lua)
from before its claim until it is recorded. An attempt that finds none free waits in the
endpoint's line, oldest delivery first, without spending an attempt: its message comes back after
a short countdown, sooner when a slot is given back (the giver wakes the head of the line).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import random
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import kombu.exceptions
import redis
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone
from standardwebhooks import Webhook

from inference.events import webhook_tenant_add
from inference.idempotency import Idempotency, idempotency_record_create, idempotent_create
from inference.models import CONTENT_EXPIRED_KEY, IdempotencyKey, Job
from inference.ssrf import GuardedResponse, UnsafeUrl, guarded_post, url_check_for_registration
from inference.webhook_models import (
    DEFAULT_EVENT_TYPES,
    WEBHOOK_EVENT_TYPES,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
    event_id_new,
)
from portal.audit import Actor, audit_record
from portal.errors import InvalidParameter, NotFound
from portal.metrics import webhook_attempt_observe
from portal.models import AuditEvent, Tenant
from portal.redis import lua_script, redis_client
from quotas.errors import SystemOverloaded

logger = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"  # noqa: S105 (the format marker, not a secret)
_SECRET_BYTES = 32  # Standard Webhooks: 24 to 64 random bytes
_MAX_ENDPOINTS_PER_TENANT = 20


# --- secrets and signing ---------------------------------------------------------------------


def webhook_secret_generate() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(_SECRET_BYTES)).decode("ascii")


# A receiver verifies against every signature: a bound keeps the header and its work small.
_MAX_RETIRED_SECRETS = 4


def _retired_secrets_live(endpoint: WebhookEndpoint, now: datetime) -> list[dict]:
    return [retired for retired in endpoint.retired_secrets
            if datetime.fromisoformat(retired["expires_at"]) > now]


def _signing_secrets(endpoint: WebhookEndpoint, now: datetime) -> list[str]:
    return [endpoint.secret] + [
        retired["secret"] for retired in reversed(_retired_secrets_live(endpoint, now))
    ]


def webhook_headers_sign(
    *, endpoint: WebhookEndpoint, message_id: str, body: str, now: datetime
) -> dict[str, str]:
    """The three Standard Webhooks headers; one `v1,` signature per active secret."""
    signatures = [
        Webhook(secret).sign(msg_id=message_id, timestamp=now, data=body)
        for secret in _signing_secrets(endpoint, now)
    ]
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": " ".join(signatures),
    }


# --- endpoints -------------------------------------------------------------------------------


def _clean_url(url: str) -> str:
    url = (url or "").strip()
    if not url:
        raise InvalidParameter("url: This field is required.", param="url")
    if len(url) > 2000:
        raise InvalidParameter("url: at most 2000 characters.", param="url")
    try:
        url_check_for_registration(url)
    except UnsafeUrl as exc:
        raise InvalidParameter(f"url: {exc.reason}.", param="url") from exc
    return url


def _clean_event_types(event_types: list[str] | None) -> list[str]:
    if event_types is None:
        return list(DEFAULT_EVENT_TYPES)
    if not isinstance(event_types, list | tuple) or not event_types:
        raise InvalidParameter("event_types: subscribe to at least one event.", param="event_types")
    unknown = sorted({name for name in event_types if name not in WEBHOOK_EVENT_TYPES})
    if unknown:
        raise InvalidParameter(
            f"event_types: unknown {', '.join(map(str, unknown))}; choose from "
            f"{', '.join(WEBHOOK_EVENT_TYPES)}.",
            param="event_types",
        )
    # Stored in the canonical order, without duplicates.
    return [name for name in WEBHOOK_EVENT_TYPES if name in event_types]


def webhook_endpoint_create(
    *,
    tenant: Tenant,
    url: str,
    event_types: list[str] | None = None,
    description: str = "",
    enabled: bool = True,
    actor: Actor = None,
    idempotency: Idempotency | None = None,
) -> WebhookEndpoint:
    """A new endpoint with a fresh secret. `endpoint.secret` is for this response only.
    `idempotency`: the (Idempotency-Key, request fingerprint) recorded with it, in its
    transaction (`webhook_endpoint_create_idempotent`)."""
    url = _clean_url(url)
    event_types = _clean_event_types(event_types)
    if WebhookEndpoint.objects.filter(tenant=tenant).count() >= _MAX_ENDPOINTS_PER_TENANT:
        raise InvalidParameter(
            f"A tenant has at most {_MAX_ENDPOINTS_PER_TENANT} webhook endpoints.", param="url"
        )
    # Before the row: event publishing must never skip a tenant that has an endpoint
    # (inference/events.py); if Redis cannot take it, no endpoint is created.
    try:
        webhook_tenant_add(tenant_id=tenant.pk)
    except redis.RedisError as exc:
        raise SystemOverloaded("Webhook endpoints cannot be created right now. Retry later.",
                               retry_after_s=5) from exc
    with transaction.atomic():
        endpoint = WebhookEndpoint.objects.create(
            tenant=tenant,
            url=url,
            event_types=event_types,
            description=description.strip()[:200],
            enabled=enabled,
            secret=webhook_secret_generate(),
        )
        _audit(endpoint, AuditEvent.Action.WEBHOOK_CREATED, actor,
               {"host": _host(url), "event_types": event_types, "enabled": enabled})
        idempotency_record_create(tenant_id=tenant.pk, idempotency=idempotency,
                                  webhook_endpoint=endpoint)
    logger.info("webhook endpoint created tenant=%s endpoint=%s", tenant.slug, endpoint.id)
    return endpoint


@dataclass(frozen=True)
class EndpointCreation:
    endpoint: WebhookEndpoint
    replayed: bool  # an Idempotency-Key returned the endpoint an earlier request made


def webhook_endpoint_create_idempotent(*, tenant: Tenant, idempotency_key: str | None,
                                       actor: Actor = None, **fields) -> EndpointCreation:
    """`webhook_endpoint_create` for the API's POST, with the jobs' Idempotency-Key: the same key
    and body again return the endpoint the first request made (a retry after a lost answer makes
    no second endpoint with a second secret); another body is the conflict. A replay is not a
    creation: nothing is validated or counted against the endpoint limit again."""
    endpoint, replayed = idempotent_create(
        tenant_id=tenant.pk, idempotency_key=idempotency_key,
        # Scoped to this request: a body can never match a job's under the same key.
        request={"webhook_endpoint_create": fields},
        create=lambda idempotency: webhook_endpoint_create(tenant=tenant, actor=actor,
                                                           idempotency=idempotency, **fields),
        replay=_idempotent_endpoint,
    )
    return EndpointCreation(endpoint, replayed=replayed)


def _idempotent_endpoint(record: IdempotencyKey) -> WebhookEndpoint:
    if record.webhook_endpoint is None:
        # Not a second endpoint for a retry of a creation whose endpoint was deleted since.
        raise NotFound("The webhook endpoint this Idempotency-Key made was deleted.",
                       param="Idempotency-Key")
    return record.webhook_endpoint


def webhook_endpoint_update(
    *,
    endpoint: WebhookEndpoint,
    url: str | None = None,
    event_types: list[str] | None = None,
    description: str | None = None,
    enabled: bool | None = None,
    actor: Actor = None,
) -> WebhookEndpoint:
    """Change what was given. Enabling again clears an automatic disable and its failure run."""
    changed = ["updated_at"]
    if url is not None:
        endpoint.url = _clean_url(url)
        changed.append("url")
    if event_types is not None:
        endpoint.event_types = _clean_event_types(event_types)
        changed.append("event_types")
    if description is not None:
        endpoint.description = description.strip()[:200]
        changed.append("description")
    if enabled is not None and enabled != endpoint.enabled:
        endpoint.enabled = enabled
        changed.append("enabled")
        if enabled:
            endpoint.disabled_reason = ""
            endpoint.disabled_at = None
            endpoint.consecutive_failures = 0
            changed += ["disabled_reason", "disabled_at", "consecutive_failures"]
    endpoint.updated_at = timezone.now()
    with transaction.atomic():
        endpoint.save(update_fields=changed)
        detail = {"fields": [name for name in changed if name in ("url", "event_types",
                                                                  "description", "enabled")]}
        if "url" in changed:
            detail["host"] = _host(endpoint.url)
        if "enabled" in changed:
            detail["enabled"] = endpoint.enabled
        _audit(endpoint, AuditEvent.Action.WEBHOOK_UPDATED, actor, detail)
    logger.info("webhook endpoint updated endpoint=%s fields=%s", endpoint.id, ",".join(changed))
    return endpoint


def webhook_endpoint_delete(*, endpoint: WebhookEndpoint, actor: Actor = None) -> None:
    # Its deliveries go with it; a queued attempt then finds no row and does nothing.
    logger.info("webhook endpoint deleted endpoint=%s", endpoint.id)
    with transaction.atomic():
        _audit(endpoint, AuditEvent.Action.WEBHOOK_DELETED, actor, {"host": _host(endpoint.url)})
        endpoint.delete()


def _host(url: str) -> str:
    # The audit log keeps the receiver's host only: a path or query may carry a token.
    return urlsplit(url).hostname or ""


def _audit(endpoint: WebhookEndpoint, action: str, actor: Actor, detail: dict) -> None:
    audit_record(tenant=endpoint.tenant_id, action=action, actor=actor, target=endpoint.id,
                 detail=detail)


def webhook_endpoint_secret_rotate(*, endpoint: WebhookEndpoint, actor: Actor = None
                                   ) -> WebhookEndpoint:
    """A new secret; the one it replaces keeps signing for SLUICE_WEBHOOK_SECRET_OVERLAP_S, as do
    those retired before it whose overlap has not ended (the newest few)."""
    now = timezone.now()
    overlap = settings.SLUICE_WEBHOOK_SECRET_OVERLAP_S
    with transaction.atomic():
        # Locked: two rotations at once must not each retire the same secret and lose the other.
        endpoint.refresh_from_db(
            from_queryset=WebhookEndpoint.objects.select_for_update(),
            fields=["secret", "retired_secrets"])
        retired = _retired_secrets_live(endpoint, now)
        if overlap:
            retired.append({"secret": endpoint.secret,
                            "expires_at": (now + timedelta(seconds=overlap)).isoformat()})
        endpoint.retired_secrets = retired[-_MAX_RETIRED_SECRETS:]
        endpoint.secret = webhook_secret_generate()
        endpoint.updated_at = now
        endpoint.save(update_fields=["secret", "retired_secrets", "updated_at"])
        _audit(endpoint, AuditEvent.Action.WEBHOOK_SECRET_ROTATED, actor,
               {"retired_secrets_signing": len(endpoint.retired_secrets)})
    logger.info("webhook secret rotated endpoint=%s", endpoint.id)
    return endpoint


# --- publishing ------------------------------------------------------------------------------


def _enqueue_attempt(*, delivery_id: str, attempt: int, countdown_s: float | None = None) -> None:
    from inference.webhook_tasks import webhook_deliver_task  # the task module imports this one

    webhook_deliver_task.apply_async_on_commit((delivery_id, attempt), countdown=countdown_s)


def _claim_lease() -> timedelta:
    # Long enough for one attempt with all its hops; after it, the sweeper assumes the worker died.
    hops = settings.SLUICE_WEBHOOK_MAX_REDIRECTS + 1
    return timedelta(seconds=settings.SLUICE_WEBHOOK_TIMEOUT_S * hops + 30)


def _iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def webhook_records_purge(*, now: datetime | None = None) -> int:
    """Drop events older than SLUICE_WEBHOOK_RETENTION_DAYS whose deliveries are all over, with
    their deliveries and attempt logs (what a tenant debugs and redelivers from): one row per
    event, delivery and attempt otherwise grows for ever. Returns how many events went."""
    now = now or timezone.now()
    old = (WebhookEvent.objects
           .filter(created_at__lt=now - timedelta(days=settings.SLUICE_WEBHOOK_RETENTION_DAYS))
           .exclude(deliveries__status__in=WebhookDelivery.LIVE_STATUSES))
    event_ids = list(old.values_list("pk", flat=True)[:5000])  # a bounded batch per run
    WebhookEvent.objects.filter(pk__in=event_ids).delete()
    return len(event_ids)


def webhook_event_publish(*, tenant: Tenant, event_type: str, data: dict,
                          event_id: str | None = None) -> WebhookEvent | None:
    """Record `event_type` with `data` for `tenant` and deliver it to every enabled endpoint that
    subscribes to it, once this transaction commits. None when no endpoint wants it (nothing is
    stored then), or when an event `event_id` is recorded already (an occurrence published again
    is recorded and delivered once). `data` must be JSON-serialisable (datetimes, Decimals and
    UUIDs are turned into strings here, so what is stored is exactly what is sent)."""
    if event_type not in WEBHOOK_EVENT_TYPES:
        raise InvalidParameter(f"Unknown webhook event type {event_type!r}.", param="event_type")
    endpoints = [
        endpoint
        for endpoint in WebhookEndpoint.objects.filter(tenant=tenant, enabled=True).only(
            "id", "event_types"
        )
        if endpoint.subscribes_to(event_type)
    ]
    if not endpoints:
        return None
    now = timezone.now()
    payload = json.loads(json.dumps(
        {"type": event_type, "timestamp": _iso_utc(now), "data": data}, cls=DjangoJSONEncoder
    ))
    try:
        with transaction.atomic():
            # The key decides: two publishers of the same occurrence racing, the second waits
            # for the first's commit and finds its id taken. No query more for the first.
            event = WebhookEvent.objects.create(
                id=event_id or event_id_new(), tenant=tenant, type=event_type, payload=payload,
                created_at=now, job_id=data.get("id") if data.get("object") == "job" else None,
            )
            deliveries = WebhookDelivery.objects.bulk_create(
                WebhookDelivery(endpoint=endpoint, event=event, next_attempt_at=now + _claim_lease(),
                                created_at=now, updated_at=now)
                for endpoint in endpoints
            )
            for delivery in deliveries:
                _enqueue_attempt(delivery_id=delivery.id, attempt=1)
    except IntegrityError:
        if event_id is None or not WebhookEvent.objects.filter(pk=event_id).exists():
            raise
        logger.info("webhook event %s %s already recorded", event_id, event_type)
        return None
    logger.info("webhook event %s %s tenant=%s deliveries=%d", event.id, event_type, tenant.slug,
                len(deliveries))
    return event


# --- delivery --------------------------------------------------------------------------------


def retry_delay(*, attempt: int) -> timedelta | None:
    """How long after failed attempt number `attempt` the next one is due; None: give up."""
    schedule = settings.SLUICE_WEBHOOK_RETRY_SCHEDULE_S
    if attempt > len(schedule):
        return None
    jitter = settings.SLUICE_WEBHOOK_RETRY_JITTER
    # Jitter spreads the retries of many deliveries that failed together (an endpoint's outage).
    factor = random.uniform(1 - jitter, 1 + jitter) if jitter else 1.0  # noqa: S311 (not crypto)
    return timedelta(seconds=max(0.0, schedule[attempt - 1] * factor))


def webhook_body_serialize(event: WebhookEvent) -> str:
    return json.dumps(event.payload, separators=(",", ":"), ensure_ascii=False)


# What a job's events carry of its content: job.completed's `result` (a completion's text, a
# video's files). None carries what the job was sent (its params); its tokens and preview frames
# (job.output, job.preview) go to its stream only, never to a webhook.
JOB_EVENT_CONTENT_KEYS = ("result",)


def _payload_without_job_content(payload: dict) -> dict:
    data = payload.get("data") or {}
    return {**payload, "data": {name: value for name, value in data.items()
                                if name not in JOB_EVENT_CONTENT_KEYS}}


def webhook_events_job_content_remove(*, job_id: str) -> int:
    """A deleted or content-expired job's recorded events lose what it produced: kept, it would
    outlive the job's own copy until SLUICE_WEBHOOK_RETENTION_DAYS, and go out again with a
    retry or a redelivery. The rest (id, status, usage, CU) stays: the delivery log and a
    receiver still learn how the job ended. Returns how many events changed."""
    events = list(WebhookEvent.objects.filter(
        job_id=job_id, payload__data__has_any_keys=list(JOB_EVENT_CONTENT_KEYS),
    ).values_list("pk", "payload"))
    for event_id, payload in events:
        WebhookEvent.objects.filter(pk=event_id).update(payload=_payload_without_job_content(payload))
    if events:
        # What the receiver answered to them goes too: one that echoes the request body (a
        # common test receiver) put the content into the delivery log's response snippets.
        event_ids = [event_id for event_id, _payload in events]
        WebhookDelivery.objects.filter(event_id__in=event_ids).exclude(
            last_response_snippet="").update(last_response_snippet="")
        WebhookAttempt.objects.filter(delivery__event_id__in=event_ids).exclude(
            response_snippet="").update(response_snippet="")
    return len(events)


def _deleted_job_content_drop(event: WebhookEvent) -> WebhookEvent:
    """The send-time check of a job's end event: one recorded after its job's content was
    removed (the end of a job deleted while it ran can come after the reaper's removal) loses
    the content here, stored and sent, so no retry or redelivery sends it."""
    data = event.payload.get("data") or {}
    if data.get("object") != "job" or not set(JOB_EVENT_CONTENT_KEYS) & data.keys():
        return event
    withdrawn = Job.objects.filter(pk=data["id"], tenant_id=event.tenant_id).filter(
        Q(deleted_at__isnull=False) | Q(result__has_key=CONTENT_EXPIRED_KEY)).exists()
    if withdrawn:
        event.payload = _payload_without_job_content(event.payload)
        WebhookEvent.objects.filter(pk=event.pk).update(payload=event.payload)
    return event


def webhook_delivery_attempt(*, delivery_id: str, attempt: int) -> WebhookDelivery | None:
    """Make attempt number `attempt` of a delivery (the task's body). A missing delivery, one that
    is settled, or an attempt number another worker already took is a no-op (returns None): queue
    redelivery and the sweeper's re-dispatch are both normal. So is an attempt that finds the
    endpoint's slots taken: it waits its turn (`_delivery_wait`) and is made later."""
    delivery = (
        WebhookDelivery.objects.select_related("endpoint", "event", "endpoint__tenant")
        .filter(pk=delivery_id)
        .first()
    )
    if delivery is None or not delivery.is_live or delivery.attempts != attempt - 1:
        return None
    now = timezone.now()
    endpoint = delivery.endpoint
    if not endpoint.enabled:
        WebhookDelivery.objects.filter(pk=delivery.pk, status__in=WebhookDelivery.LIVE_STATUSES,
                                       attempts=attempt - 1).update(
            status=WebhookDelivery.Status.GIVING_UP, next_attempt_at=None,
            last_error="endpoint disabled", updated_at=now,
        )
        return None
    holder = secrets.token_hex(8)
    place = _endpoint_slot_take(endpoint_id=endpoint.pk, holder=holder,
                                member=_line_member(delivery.pk, attempt))
    if place:
        _delivery_wait(delivery=delivery, attempt=attempt, place=place)
        return None
    try:
        return _delivery_send(delivery=delivery, attempt=attempt)
    finally:
        # Every way out, an exception's too; a worker that dies here leaves the slot to its lease.
        _endpoint_slot_release(endpoint_id=endpoint.pk, holder=holder)


def _delivery_send(*, delivery: WebhookDelivery, attempt: int) -> WebhookDelivery | None:
    now = timezone.now()
    claimed = WebhookDelivery.objects.filter(
        pk=delivery.pk, status__in=WebhookDelivery.LIVE_STATUSES, attempts=attempt - 1
    ).update(attempts=attempt, next_attempt_at=now + _claim_lease(), updated_at=now)
    if claimed != 1:
        return None

    endpoint = delivery.endpoint
    body = webhook_body_serialize(_deleted_job_content_drop(delivery.event))
    headers = webhook_headers_sign(endpoint=endpoint, message_id=delivery.event_id, body=body,
                                   now=now)
    headers.update({"Content-Type": "application/json", "User-Agent": "Sluice-Webhooks/1"})
    response = guarded_post(
        endpoint.url,
        content=body.encode(),
        headers=headers,
        timeout_s=settings.SLUICE_WEBHOOK_TIMEOUT_S,
        max_redirects=settings.SLUICE_WEBHOOK_MAX_REDIRECTS,
        max_body_bytes=settings.SLUICE_WEBHOOK_RESPONSE_MAX_BYTES,
    )
    return _attempt_record(delivery=delivery, attempt=attempt, started_at=now, response=response)


# --- an endpoint's deliveries in flight ------------------------------------------------------

# The head of the line looks again this soon (a slot given back wakes it sooner); those behind
# it later, by their place, so a long line is not a stream of messages going round the queue.
_SLOT_RECHECK_S = 1.0
_SLOT_RECHECK_MAX_S = 30.0


def _slot_keys(endpoint_id: str) -> list[str]:
    return [f"wh:ep:{endpoint_id}:slots", f"wh:ep:{endpoint_id}:line",
            f"wh:ep:{endpoint_id}:places"]


def _line_member(delivery_id: str, attempt: int) -> str:
    return f"{delivery_id}:{attempt}"


def _ms(duration: timedelta) -> int:
    return math.ceil(duration.total_seconds() * 1000)


def _endpoint_slot_take(*, endpoint_id: str, holder: str, member: str) -> int:
    """0 when `holder` took one of the endpoint's slots (for an attempt's claim lease);
    otherwise the place in line `member` now waits at (1: next)."""
    # A place outlives the longest recheck by a lease: a member's message may wait in a busy
    # queue for a while, and one that never comes back (lost) is woken by a give-back anyway.
    keep = timedelta(seconds=_SLOT_RECHECK_MAX_S) + _claim_lease()
    return lua_script(redis_client(), "webhook_slot_take", package="inference")(
        keys=_slot_keys(endpoint_id),
        args=[holder, member, settings.SLUICE_WEBHOOK_ENDPOINT_MAX_IN_FLIGHT,
              _ms(_claim_lease()), _ms(keep)],
    )


def _endpoint_slot_release(*, endpoint_id: str, holder: str) -> None:
    """Give the slot back and wake the head of the line, never raising: this runs on the way out
    of an attempt, whose own outcome (or exception) must not be replaced."""
    try:
        woken = lua_script(redis_client(), "webhook_slot_release", package="inference")(
            keys=_slot_keys(endpoint_id),
            args=[holder, settings.SLUICE_WEBHOOK_ENDPOINT_MAX_IN_FLIGHT],
        )
        for member in woken:
            delivery_id, attempt = member.decode().rsplit(":", 1)
            # A duplicate of its own recheck: whichever comes second finds the attempt taken.
            _enqueue_attempt(delivery_id=delivery_id, attempt=int(attempt))
    except (redis.RedisError, kombu.exceptions.OperationalError):
        # The slot's lease frees it; the line's own rechecks come anyway.
        logger.warning("webhook endpoint %s: slot not given back", endpoint_id, exc_info=True)


def _delivery_wait(*, delivery: WebhookDelivery, attempt: int, place: int) -> None:
    """The endpoint has its deliveries in flight: this attempt waits in line without being made
    (no attempt spent, nothing logged) and comes back after a countdown. Its due time moves past
    that countdown by a lease, so should the message be lost the sweeper sends it again."""
    limit = settings.SLUICE_WEBHOOK_ENDPOINT_MAX_IN_FLIGHT
    countdown_s = min(_SLOT_RECHECK_MAX_S, _SLOT_RECHECK_S * math.ceil(place / limit))
    due = timezone.now() + timedelta(seconds=countdown_s) + _claim_lease()
    waiting = WebhookDelivery.objects.filter(
        pk=delivery.pk, status__in=WebhookDelivery.LIVE_STATUSES, attempts=attempt - 1
    ).update(next_attempt_at=due)
    if waiting == 1:
        _enqueue_attempt(delivery_id=delivery.pk, attempt=attempt, countdown_s=countdown_s)
        logger.info("webhook delivery %s attempt %d endpoint=%s waits for a slot (place %d)",
                    delivery.pk, attempt, delivery.endpoint_id, place)


def _attempt_record(*, delivery: WebhookDelivery, attempt: int, started_at: datetime,
                    response: GuardedResponse) -> WebhookDelivery:
    succeeded = response.status_code is not None and 200 <= response.status_code < 300
    error = response.error or ("" if succeeded else f"HTTP {response.status_code}")
    # PostgreSQL text cannot hold NUL: a receiver's binary answer would make the attempt
    # unrecordable, and the delivery, still live, would be sent again after every lease.
    snippet = response.body_snippet.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
    now = timezone.now()
    if succeeded:
        status, next_attempt_at = WebhookDelivery.Status.SUCCEEDED, None
    else:
        delay = retry_delay(attempt=attempt)
        status = WebhookDelivery.Status.FAILED if delay is not None else (
            WebhookDelivery.Status.GIVING_UP)
        next_attempt_at = now + delay if delay is not None else None
    with transaction.atomic():
        WebhookAttempt.objects.create(
            delivery=delivery, number=attempt, attempted_at=started_at, url=response.url[:2000],
            status_code=response.status_code, latency_ms=response.latency_ms,
            response_snippet=snippet, error=error[:300],
        )
        WebhookDelivery.objects.filter(pk=delivery.pk, attempts=attempt).update(
            status=status, next_attempt_at=next_attempt_at, last_status_code=response.status_code,
            last_latency_ms=response.latency_ms, last_response_snippet=snippet,
            last_error=error[:300], updated_at=now,
        )
    webhook_attempt_observe(outcome=status)
    logger.info("webhook delivery %s attempt %d endpoint=%s -> %s", delivery.id, attempt,
                delivery.endpoint_id, status if not error else f"{status} ({error})")
    if succeeded:
        # Reset the failure run, writing only when there is one to reset.
        WebhookEndpoint.objects.filter(pk=delivery.endpoint_id, consecutive_failures__gt=0).update(
            consecutive_failures=0
        )
    elif status == WebhookDelivery.Status.GIVING_UP:
        _endpoint_failure_count(endpoint_id=delivery.endpoint_id, last_error=error)
    delivery.refresh_from_db()
    return delivery


def _endpoint_failure_count(*, endpoint_id: str, last_error: str) -> None:
    """One more delivery gave up; after a run of them the endpoint is switched off, once."""
    WebhookEndpoint.objects.filter(pk=endpoint_id).update(
        consecutive_failures=F("consecutive_failures") + 1
    )
    threshold = settings.SLUICE_WEBHOOK_DISABLE_AFTER_FAILURES
    if not threshold:
        return
    now = timezone.now()
    reason = (f"Disabled automatically after {threshold} deliveries in a row failed "
              f"(last error: {last_error})")[:300]
    disabled = WebhookEndpoint.objects.filter(
        pk=endpoint_id, enabled=True, consecutive_failures__gte=threshold
    ).update(enabled=False, disabled_reason=reason, disabled_at=now, updated_at=now)
    if disabled == 1:
        logger.warning("webhook endpoint %s disabled: %s", endpoint_id, reason)


def webhook_deliveries_dispatch(*, now: datetime | None = None, limit: int = 500) -> int:
    """Hand every delivery whose next attempt is due to the queue (the periodic sweeper).

    Each row is claimed by pushing its due time one lease ahead with a conditional update, so two
    sweepers never dispatch the same attempt; if its message is lost or its worker dies, the row
    comes due again after the lease."""
    now = now or timezone.now()
    due = list(
        WebhookDelivery.objects.filter(
            status__in=WebhookDelivery.LIVE_STATUSES, next_attempt_at__lte=now
        )
        .order_by("next_attempt_at")
        .values_list("pk", "attempts", "next_attempt_at")[:limit]
    )
    dispatched = 0
    for delivery_id, attempts, due_at in due:
        claimed = WebhookDelivery.objects.filter(
            pk=delivery_id, attempts=attempts, next_attempt_at=due_at,
            status__in=WebhookDelivery.LIVE_STATUSES,
        ).update(next_attempt_at=now + _claim_lease())
        if claimed == 1:
            _enqueue_attempt(delivery_id=delivery_id, attempt=attempts + 1)
            dispatched += 1
    return dispatched


def webhook_delivery_redeliver(*, delivery: WebhookDelivery) -> WebhookDelivery:
    """Send a delivery's event again, as a new delivery with its own attempts and schedule."""
    # Read again: the endpoint may have been disabled since the delivery was loaded.
    if not WebhookEndpoint.objects.filter(pk=delivery.endpoint_id, enabled=True).exists():
        raise InvalidParameter("Enable the endpoint before redelivering to it.", param="endpoint")
    now = timezone.now()
    with transaction.atomic():
        again = WebhookDelivery.objects.create(
            endpoint_id=delivery.endpoint_id, event_id=delivery.event_id, redelivery_of=delivery,
            next_attempt_at=now + _claim_lease(), created_at=now, updated_at=now,
        )
        _enqueue_attempt(delivery_id=again.id, attempt=1)
    logger.info("webhook delivery %s redelivered as %s", delivery.id, again.id)
    return again

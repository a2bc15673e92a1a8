"""`Idempotency-Key` on the POSTs that create something (DESIGN.md): scoped per tenant, kept
IDEMPOTENCY_TTL, and the same key with another body is an IdempotencyConflict. One record per
key (inference.models.IdempotencyKey) pointing at what the first request made: a job
(inference/services.py) or a webhook endpoint (inference/webhooks.py)."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

from django.utils import timezone

from inference.errors import IdempotencyConflict
from inference.models import IdempotencyKey
from portal.errors import InvalidParameter

IDEMPOTENCY_TTL = timedelta(hours=24)


def request_fingerprint(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def idempotency_key_check(idempotency_key: str) -> None:
    """A key longer than its column is the client's 400 (its insert failed: a 500, after the
    work was priced and reserved)."""
    longest = IdempotencyKey._meta.get_field("key").max_length
    if len(idempotency_key) > longest:
        raise InvalidParameter(f"An Idempotency-Key is at most {longest} characters.",
                               param="Idempotency-Key")


def idempotency_record_find(*, tenant_id: int, idempotency_key: str,
                            fingerprint: str) -> IdempotencyKey | None:
    """The record an earlier request with this key left, what it made loaded; None when there is
    none, or it expired (removed then: the key may be used again). Another body: the conflict."""
    record = (
        IdempotencyKey.objects.filter(tenant_id=tenant_id, key=idempotency_key)
        .select_related("job", "webhook_endpoint")
        .first()
    )
    if record is None:
        return None
    if record.created_at < timezone.now() - IDEMPOTENCY_TTL:
        record.delete()
        return None
    if record.request_hash != fingerprint:
        raise IdempotencyConflict(param="Idempotency-Key")
    return record

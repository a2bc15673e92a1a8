"""`Idempotency-Key` on the POSTs that create something (DESIGN.md): scoped per tenant, kept
IDEMPOTENCY_TTL, and the same key with another body is an IdempotencyConflict. One record per
key (inference.models.IdempotencyKey) pointing at what the first request made: a job
(inference/services.py) or a webhook endpoint (inference/webhooks.py), both created through
`idempotent_create`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

from django.db import IntegrityError
from django.utils import timezone

from inference.errors import IdempotencyConflict
from inference.models import IdempotencyKey
from portal.errors import InvalidParameter

IDEMPOTENCY_TTL = timedelta(hours=24)

# What a creation records with what it makes: (Idempotency-Key, request fingerprint).
Idempotency = tuple[str, str]
Made = TypeVar("Made")


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


def idempotency_record_create(*, tenant_id: int, idempotency: Idempotency | None,
                              **made) -> None:
    """Record the key with what its request made (`job=` or `webhook_endpoint=`), inside the
    transaction that makes it; nothing without a key. A second request with the key that got
    this far fails here on the unique constraint (IntegrityError): see `idempotent_create`."""
    if idempotency is None:
        return
    key, fingerprint = idempotency
    IdempotencyKey.objects.create(tenant_id=tenant_id, key=key, request_hash=fingerprint, **made)


def idempotent_create(*, tenant_id: int, idempotency_key: str | None, request: dict,
                      create: Callable[[Idempotency | None], Made],
                      replay: Callable[[IdempotencyKey], Made]) -> tuple[Made, bool]:
    """Create once per Idempotency-Key: (what was made, whether it was replayed).

    Without a key, `create(None)`. With one, the same `request` again within IDEMPOTENCY_TTL
    is `replay(record)` of the earlier request's record (which raises when what it made was
    deleted since: never a second one), another request is the IdempotencyConflict, and a new
    key is `create((key, fingerprint))`, which records it with what it makes, in one
    transaction (`idempotency_record_create`). Two requests with one key that both found no
    record race to that insert: the loser's transaction rolls back on the unique constraint
    and it replays the winner's (`create` gives back anything it held outside the database
    before re-raising)."""
    if not idempotency_key:
        return create(None), False
    idempotency_key_check(idempotency_key)
    fingerprint = request_fingerprint(request)
    earlier = idempotency_record_find(tenant_id=tenant_id, idempotency_key=idempotency_key,
                                      fingerprint=fingerprint)
    if earlier is not None:
        return replay(earlier), True
    try:
        return create((idempotency_key, fingerprint)), False
    except IntegrityError:
        earlier = idempotency_record_find(tenant_id=tenant_id, idempotency_key=idempotency_key,
                                          fingerprint=fingerprint)
        if earlier is None:  # not the key's constraint: another integrity error
            raise
        return replay(earlier), True

"""The one module that publishes what a client can see of a job, in order, resumably.

Each job has a Redis stream `ev:<job id>` whose entry ids are `0-<seq>`: SSE and websocket
clients tail it with XREAD (no gaps, resumable from any seq via Last-Event-ID), and the
stream outlives the job for a day so late followers still get the whole story. Status
changes are also broadcast to the tenant's Channels group for live job lists.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import redis
from django.conf import settings

from inference.errors import StreamInterrupted
from portal.broadcast import group_broadcast, group_storage_key
from portal.redis import lua_script, redis_client

logger = logging.getLogger(__name__)

STREAM_TTL_S = 24 * 3600
STREAM_MAXLEN = 20_000
TERMINAL_EVENTS = frozenset({"job.completed", "job.failed", "job.cancelled"})
STATUS_EVENTS = frozenset({"job.queued", "job.started"}) | TERMINAL_EVENTS
# job.progress also goes out as a webhook (to endpoints that opted in), at most once per
# settings.SLUICE_WEBHOOK_PROGRESS_INTERVAL_S; job.preview (JPEG frames) only on the stream.


@dataclass(frozen=True)
class JobEvent:
    seq: int
    type: str
    data: dict

    def as_sse(self) -> str:
        return f"id: {self.seq}\nevent: {self.type}\ndata: {json.dumps(self.data)}\n\n"

    def as_dict(self) -> dict:
        return {"seq": self.seq, "type": self.type, "data": self.data}


def stream_key(job_id: str) -> str:
    return f"ev:{job_id}"


def tenant_group(tenant_id: int) -> str:
    return f"tenant.{tenant_id}.jobs"


def event_publish(*, job_id: str, tenant_id: int, event_type: str, data: dict,
                  attempt: int | None = None, attempt_seq: int | None = None) -> int:
    """Append an event to the job's stream; status changes also go to the tenant's group.

    `published_at` (epoch seconds) lets a follower measure how late an event reached it.
    A running attempt numbers its events (`attempt_seq`: 1, 2, ... within `attempt`), so that
    publishing one again after an error whose reply was lost appends it once (lua/publish.lua).
    A job's end is appended once however often it is published (a retry, the reaper): each
    publish returns the first one's seq, and its webhook is recorded once.
    Returns its seq; 0 when it came from an attempt the job was handed away from (dropped)."""
    payload = _payload(job_id, data, published_at=time.time())
    group = tenant_group(tenant_id)
    seq, webhooks, listeners = lua_script(redis_client(), "publish", package="inference")(
        keys=[stream_key(job_id), f"{stream_key(job_id)}:seq", WEBHOOK_TENANTS_KEY,
              group_storage_key(group), f"{stream_key(job_id)}:last"],
        args=[event_type, json.dumps(payload), STREAM_TTL_S, STREAM_MAXLEN, tenant_id,
              "" if attempt_seq is None else attempt, "" if attempt_seq is None else attempt_seq,
              1 if event_type in TERMINAL_EVENTS else ""],
    )
    if not seq:
        return 0
    # Nobody on the tenant's live list (no dashboard open): no broadcast, which would cost a
    # hop to the broadcast thread and two Redis round trips to find the group empty.
    if event_type in STATUS_EVENTS and listeners:
        group_broadcast(group, {"type": "job.status", "event": event_type, "data": payload})
    if webhooks == -1:
        try:
            webhook_tenants_rebuild()
        except redis.RedisError:
            # The event is in the stream: raising now would have its caller count it refused
            # and publish it again. The next publish rebuilds the index.
            logger.warning("could not rebuild the index of tenants with webhooks")
    if webhooks != 0 and (
        event_type in STATUS_EVENTS or (event_type == "job.progress" and _progress_webhook_due(job_id))
    ):
        _webhook(tenant_id=tenant_id, event_type=event_type,
                 data={"id": job_id, "object": "job", "seq": int(seq), **data})
    return int(seq)


def _payload(job_id: str, data: dict, *, published_at: float) -> dict:
    return {"job_id": job_id, "published_at": round(published_at, 6), **data}


# Tenant ids that have (or had) a webhook endpoint, so publishing an event for any other tenant
# needs no database query. Ids are only ever added (an endpoint's creation adds its tenant before
# the row exists); a stale id costs that tenant the query it would have paid anyway. The member
# "*" marks the set complete: when Redis loses or evicts the set, the mark goes with it and the
# next publish rebuilds it from the database.
WEBHOOK_TENANTS_KEY = "wh:tenants"
_COMPLETE = "*"


def webhook_tenant_add(*, tenant_id: int) -> None:
    redis_client().sadd(WEBHOOK_TENANTS_KEY, tenant_id)


def webhook_tenants_rebuild() -> None:
    from inference.webhook_models import WebhookEndpoint

    tenant_ids = set(WebhookEndpoint.objects.values_list("tenant_id", flat=True).distinct())
    redis_client().sadd(WEBHOOK_TENANTS_KEY, _COMPLETE, *tenant_ids)  # one command: never the mark alone


def _progress_webhook_due(job_id: str) -> bool:
    interval_ms = max(1, round(settings.SLUICE_WEBHOOK_PROGRESS_INTERVAL_S * 1000))
    return bool(redis_client().set(f"ev:{job_id}:whp", 1, nx=True, px=interval_ms))


def _webhook(*, tenant_id: int, event_type: str, data: dict) -> None:
    from inference.webhook_models import WebhookEndpoint
    from inference.webhooks import webhook_event_publish
    from portal.models import Tenant

    try:
        # The index let this tenant through: it has, or had, an endpoint. One cheap query
        # spares the rest when none is enabled now (deleted, or disabled after failures).
        if not WebhookEndpoint.objects.filter(tenant_id=tenant_id, enabled=True).exists():
            return
        tenant = Tenant.objects.only("id", "slug").get(pk=tenant_id)
        # A job's end has one webhook id: published again (the script returns the first end's
        # seq, and this caller may be the first to get this far: its first try's reply was
        # lost), it is recorded once, and a receiver never gets two ends under two ids.
        end_id = job_end_webhook_id(data["id"]) if event_type in TERMINAL_EVENTS else None
        webhook_event_publish(tenant=tenant, event_type=event_type, data=data, event_id=end_id)
    except Exception:  # delivery is retried by webhooks; recording must never fail the job
        logger.exception("could not record webhook %s for %s", event_type, data.get("id"))


def job_end_webhook_id(job_id: str) -> str:
    """The webhook-id of a job's end (its job.completed, job.failed or job.cancelled): the same
    each time the end is published, so it is recorded, and delivered, once. Shaped like the
    other events' `msg_<ULID>`, though not time-ordered."""
    digest = hashlib.sha256(f"{job_id}:end".encode()).digest()
    return f"msg_{base64.b32encode(digest).decode()[:26]}"


def _decode(entry_id: bytes, fields: dict) -> JobEvent:
    return JobEvent(
        seq=int(fields[b"seq"]),
        type=fields[b"type"].decode(),
        data=json.loads(fields[b"data"]),
    )


def events_read(*, job_id: str, after_seq: int = 0) -> list[JobEvent]:
    entries = redis_client().xrange(stream_key(job_id), min=f"0-{after_seq + 1}", max="+")
    return [_decode(entry_id, fields) for entry_id, fields in entries]


# Entries a backward read of a stream takes per round trip (attempt_last_event).
BACKWARD_PAGE = 100


def attempt_last_event(*, job_id: str, attempt: int, event_type: str) -> JobEvent | None:
    """The last `event_type` event that `attempt` of a running job published (its stream's
    events carry no attempt): read back from the stream's end, no further than where that
    attempt began, its job.started or the job.queued that handed it out. None when it
    published none, or the stream lost them. Most often the first page: the event sought is
    the attempt's latest of its kind, and the attempt's latest events end the stream."""
    client = redis_client()
    # Which attempt appended the latest of a run's events (lua/publish.lua): another one, or
    # none, and the stream holds nothing this attempt published.
    appended_by = client.hget(f"{stream_key(job_id)}:last", "attempt")
    if appended_by is None or int(appended_by) != attempt:
        return None
    newest = "+"
    while True:
        entries = client.xrevrange(stream_key(job_id), max=newest, min="-", count=BACKWARD_PAGE)
        for entry_id, fields in entries:
            event = _decode(entry_id, fields)
            if event.type == event_type:
                return event
            if event.type in ("job.started", "job.queued"):
                return None
        if len(entries) < BACKWARD_PAGE or event.seq <= 1:
            return None
        newest = f"0-{event.seq - 1}"


# One asyncio Redis client (a connection pool) per event loop for every follower on it: a
# client per follower paid a connect and its handshake on every stream (~1.4 ms of CPU).
_follow_clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _follow_client():
    import redis.asyncio as aioredis

    loop = asyncio.get_running_loop()
    url, client = _follow_clients.get(loop, (None, None))
    if url != settings.REDIS_URL:  # first use on this loop, or tests pointed Redis elsewhere
        for closed in [other for other in _follow_clients if other.is_closed()]:
            del _follow_clients[closed]  # a finished loop's client (tests run a loop per test)
        # No client read timeout (settings.REDIS_ASYNC_BLOCKING_OPTIONS says why); XREAD's
        # own `block` bounds each read.
        client = aioredis.Redis.from_url(settings.REDIS_URL, **settings.REDIS_ASYNC_BLOCKING_OPTIONS)
        _follow_clients[loop] = (settings.REDIS_URL, client)
    return client


# A Redis blip (a dropped connection, a failover) must not end a stream: XREAD goes on from
# the last id it returned, so a retry loses nothing. Failing this long, the follower gives up.
FOLLOW_RETRY_S = 5.0
FOLLOW_RETRY_PAUSE_S = 0.2


async def events_follow(*, job_id: str, after_seq: int = 0, block_ms: int = 15_000,
                        is_finished=None) -> AsyncIterator[JobEvent | None]:
    """Yield the job's events after `after_seq` as they land; None on each idle timeout
    (so callers can send keep-alives). Ends after the terminal event. Raises StreamInterrupted
    when Redis cannot be read for FOLLOW_RETRY_S: the caller decides what an unfinished
    stream means (a completion's relay cancels its job; an SSE client resumes)."""
    client = _follow_client()
    last = f"0-{after_seq}"
    failing_since: float | None = None
    while True:
        try:
            batches = await client.xread({stream_key(job_id): last}, block=block_ms, count=500)
            failing_since = None
        except redis.RedisError as exc:
            now = time.monotonic()
            failing_since = failing_since if failing_since is not None else now
            if now - failing_since >= FOLLOW_RETRY_S:
                logger.warning("event stream of %s unavailable: %r", job_id, exc)
                raise StreamInterrupted() from exc
            await asyncio.sleep(FOLLOW_RETRY_PAUSE_S)
            continue
        if not batches:
            if is_finished is not None and await is_finished():
                return  # the job ended and its stream expired or was never written
            yield None
            continue
        for entry_id, fields in batches[0][1]:
            last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            event = _decode(entry_id, fields)
            yield event
            if event.type in TERMINAL_EVENTS:
                return


@dataclass(frozen=True)
class JobEnd:
    """How an ended job ended, read from its row: what its terminal event says."""

    type: str
    data: dict
    ended_at: float  # epoch seconds


# The seq at which a follower was sent an end built from the row (see events_to_end), so that
# one resuming after it is told there is nothing more instead of being sent the end again.
END_SENT_KEY = "ev:{job_id}:end"


async def events_to_end(*, job_id: str, after_seq: int, block_ms: int,
                        job_end: Callable[[], Awaitable[JobEnd | None]],
                        ) -> AsyncIterator[JobEvent | None] | None:
    """A follower's events after `after_seq`, live (None on each idle `block_ms`), ending with
    the job's terminal event. When the stream cannot give that event - it expired a day after
    the end, or Redis refused it (`terminal_event_pending`) - one is built from the ended row
    (`job_end`: None while the job runs), with the next seq. None instead of events: the
    follower resumed after the end it already had, and there is nothing to send (SSE answers
    204, which stops a browser's EventSource from reconnecting for ever).

    An ended job's stream is read once, without blocking: it will not grow (if Redis cannot be
    read just then, the follower waits and retries as a running job's does)."""
    end = await job_end()
    if end is None:
        return _follow_to_end(job_id=job_id, after_seq=after_seq, block_ms=block_ms, job_end=job_end)
    client = _follow_client()
    try:
        entries = await client.xrange(stream_key(job_id), min=f"0-{after_seq + 1}", max="+")
        events = [_decode(entry_id, fields) for entry_id, fields in entries]
        ends = [index for index, event in enumerate(events) if event.type in TERMINAL_EVENTS]
        if ends:
            return _replayed(events[:ends[0] + 1])
        if not events and await _end_already_sent(client, job_id=job_id, after_seq=after_seq):
            return None
        last_seq = events[-1].seq if events else after_seq
        return _replayed([*events, await _end_event(client, job_id=job_id, end=end, last_seq=last_seq)])
    except redis.RedisError:
        return _follow_to_end(job_id=job_id, after_seq=after_seq, block_ms=block_ms, job_end=job_end)


async def _replayed(events: list[JobEvent]) -> AsyncIterator[JobEvent | None]:
    for event in events:
        yield event


async def _follow_to_end(*, job_id: str, after_seq: int, block_ms: int,
                         job_end: Callable[[], Awaitable[JobEnd | None]],
                         ) -> AsyncIterator[JobEvent | None]:
    end: JobEnd | None = None

    async def is_finished() -> bool:
        nonlocal end
        end = await job_end()
        return end is not None

    last_seq = after_seq
    async for event in events_follow(job_id=job_id, after_seq=after_seq, block_ms=block_ms,
                                     is_finished=is_finished):
        yield event
        if event is None:
            continue
        last_seq = event.seq
        if event.type in TERMINAL_EVENTS:
            return
    # The job ended, and its stream went quiet without saying so.
    try:
        yield await _end_event(_follow_client(), job_id=job_id, end=end, last_seq=last_seq)
    except redis.RedisError as exc:
        raise StreamInterrupted() from exc


async def _end_already_sent(client, *, job_id: str, after_seq: int) -> bool:
    """Whether a follower with nothing left after `after_seq` already had the end: the
    stream's terminal event, or one built from the row, at or before it."""
    before = await client.xrevrange(stream_key(job_id), max=f"0-{after_seq}", min="-", count=1)
    if before and _decode(*before[0]).type in TERMINAL_EVENTS:
        return True
    sent = await client.get(END_SENT_KEY.format(job_id=job_id))
    return sent is not None and int(sent) <= after_seq


async def _end_event(client, *, job_id: str, end: JobEnd, last_seq: int) -> JobEvent:
    """The end built from the row, after every seq the stream gave out and the follower saw.
    Its seq is remembered for a day (the first follower's, when several race)."""
    given_out = await client.get(f"{stream_key(job_id)}:seq")
    seq = max(last_seq, int(given_out or 0)) + 1
    key = END_SENT_KEY.format(job_id=job_id)
    if not await client.set(key, seq, nx=True, ex=STREAM_TTL_S):
        seq = max(seq, int(await client.get(key) or 0))
    return JobEvent(seq=seq, type=end.type, data=_payload(job_id, end.data, published_at=end.ended_at))

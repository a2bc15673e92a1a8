"""ws /ws/jobs/{id}/: the same events as SSE, over a websocket (API key or session)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from inference.apis import job_end_read, job_for_caller
from inference.errors import StreamInterrupted
from inference.events import events_to_end, tenant_group
from portal.errors import SluiceError

logger = logging.getLogger(__name__)

# 4000 + the HTTP status the same request would get, so a browser can tell "not allowed" (do not
# retry) from a network error or an interruption (resume with ?after=<last seq>).
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403  # the tenant is suspended
CLOSE_NOT_FOUND = 4404
CLOSE_UNAVAILABLE = 4503
CLOSE_INTERNAL_ERROR = 1011  # RFC 6455: the server met an unexpected condition
_CLOSE_BY_STATUS = {401: CLOSE_UNAUTHORIZED, 403: CLOSE_FORBIDDEN}
# A quiet stream is waited on this long before the job's row is read: a job that ended without
# its terminal event reaching the stream is ended from its row.
FOLLOW_IDLE_MS = 15_000


class JobEventsConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        headers = {name.decode().lower(): value.decode() for name, value in self.scope["headers"]}
        job_id = self.scope["url_route"]["kwargs"]["job_id"]
        try:
            self.job = await database_sync_to_async(job_for_caller)(
                authorization=headers.get("authorization", ""), user=self.scope.get("user"),
                job_id=job_id,
            )
        except SluiceError as error:
            # Accept then close with a code, so browsers can tell "not yours" from a network error.
            await self.accept()
            await self.close(code=_CLOSE_BY_STATUS.get(error.http_status, CLOSE_NOT_FOUND))
            return
        await self.accept()
        query = dict(part.split("=", 1) for part in self.scope["query_string"].decode().split("&") if "=" in part)
        try:
            after = max(0, int(query.get("after", 0)))
        except ValueError:
            after = 0
        self.follower = asyncio.create_task(self._follow(after))

    async def _follow(self, after: int) -> None:
        try:
            events = await events_to_end(job_id=self.job.pk, after_seq=after, block_ms=FOLLOW_IDLE_MS,
                                         job_end=functools.partial(job_end_read, self.job.pk))
            if events is not None:  # None: resumed after the end it had, nothing to send
                async for event in events:
                    if event is not None:
                        await self.send_json(event.as_dict())
        except StreamInterrupted:
            # Try again later: reconnecting with ?after=<last seq> misses nothing.
            await self.close(code=CLOSE_UNAVAILABLE)
            return
        except Exception:
            # The task's exception would be kept until the socket closes, and the client would
            # wait on a silent socket for ever: it is told, and may resume with ?after=.
            logger.exception("following job %s failed", self.job.pk)
            await self.close(code=CLOSE_INTERNAL_ERROR)
            return
        await self.close()

    async def disconnect(self, code):
        follower = getattr(self, "follower", None)
        if follower is not None:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower


class TenantJobsConsumer(AsyncJsonWebsocketConsumer):
    """ws /ws/tenants/{slug}/jobs/: status changes of every job of a tenant, for the dashboard's
    live job list. Session only (members of the tenant); the messages only notify, the page
    re-reads the database for anything it has not seen."""

    group = None

    async def connect(self):
        from portal.selectors import membership_get_for_user

        user = self.scope.get("user")
        slug = self.scope["url_route"]["kwargs"]["tenant_slug"]
        await self.accept()
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHORIZED)
            return
        try:
            membership = await database_sync_to_async(membership_get_for_user)(user=user, tenant_slug=slug)
        except SluiceError:
            await self.close(code=CLOSE_NOT_FOUND)  # a tenant you are not in does not exist
            return
        self.group = tenant_group(membership.tenant_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.send_json({"type": "subscribed", "data": {"tenant": slug}})

    async def job_status(self, message):
        await self.send_json({"type": message["event"], "data": message["data"]})

    async def disconnect(self, code):
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)

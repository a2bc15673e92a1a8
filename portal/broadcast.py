"""Fire-and-forget sends to the Channels layer from synchronous code (workers, services).

`async_to_sync(group_send)` builds an event loop and a Redis connection per call (about 6 ms
each); this keeps one loop per process in a daemon thread, so a broadcast costs a queue hop.
Broadcasts only notify (live lists); clients that need every event read the Redis stream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading

from channels.layers import get_channel_layer

logger = logging.getLogger(__name__)

_state: dict = {"loop": None, "pid": None}
_lock = threading.Lock()


def _loop() -> asyncio.AbstractEventLoop:
    # A forked worker child must not reuse its parent's loop thread (it does not exist there).
    with _lock:
        if _state["loop"] is None or _state["pid"] != os.getpid():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, daemon=True, name="channels-broadcast").start()
            _state.update(loop=loop, pid=os.getpid())
        return _state["loop"]


def group_storage_key(group: str) -> str:
    """The Redis key under which the channel layer keeps `group`'s members (channels_redis's
    own naming, from the layer itself), so a Lua script on the same Redis can tell whether
    anyone listens before a broadcast is paid for."""
    return get_channel_layer()._group_key(group).decode()


def group_broadcast(group: str, message: dict) -> None:
    async def send() -> None:
        try:
            await get_channel_layer().group_send(group, message)
        except Exception:  # a missed live-list refresh must never fail the caller
            logger.warning("broadcast to %s failed", group)

    asyncio.run_coroutine_threadsafe(send(), _loop())

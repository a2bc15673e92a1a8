"""Blocking asyncio Redis reads must end when their task is cancelled.

Every websocket consumer sits in the channel layer's BZPOPMIN and every SSE/websocket follower
in XREAD; a disconnect cancels them. With a client-side read timeout, redis-py 8 on Python 3.11
now and then swallowed that cancellation and the reader blocked again for ever (a consumer that
never finished disconnecting hung CI). Many cancellations at random moments, each must finish.
"""

from __future__ import annotations

import asyncio
import random

from channels.layers import get_channel_layer

from inference.events import events_follow

CANCELLATIONS = 300
GRACE_S = 3.0


async def _cancel_at_random_moments(start_reader, rounds: int) -> list[int]:
    pick = random.Random(7)
    stuck = []
    for round_no in range(rounds):
        reader = asyncio.ensure_future(await start_reader())
        await asyncio.sleep(pick.random() * 0.03)
        reader.cancel()
        _done, pending = await asyncio.wait([reader], timeout=GRACE_S)
        if pending:
            stuck.append(round_no)
    return stuck


async def test_channel_layer_receive_ends_when_cancelled():
    layer = get_channel_layer()

    async def start_reader():
        return layer.receive(await layer.new_channel())

    stuck = await _cancel_at_random_moments(start_reader, CANCELLATIONS)
    assert stuck == [], f"receive() ignored cancellation in rounds {stuck}"


async def test_event_follower_ends_when_cancelled():
    async def follow_one():
        async for _event in events_follow(job_id="no-such-job", block_ms=5_000):
            pass

    async def start_reader():
        return follow_one()

    stuck = await _cancel_at_random_moments(start_reader, CANCELLATIONS // 3)
    assert stuck == [], f"events_follow() ignored cancellation in rounds {stuck}"

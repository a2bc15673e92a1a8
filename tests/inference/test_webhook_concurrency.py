"""An endpoint's deliveries in flight: at most SLUICE_WEBHOOK_ENDPOINT_MAX_IN_FLIGHT at once, the
rest waiting their turn in line, against real receivers (and the Lua scripts on their own)."""

from __future__ import annotations

import base64
import json
import queue
import threading

import pytest
from django.db import connections

from inference.webhook_models import WebhookAttempt, WebhookDelivery
from inference.webhooks import (
    webhook_delivery_attempt,
    webhook_endpoint_create,
    webhook_event_publish,
)
from portal.redis import lua_script
from tests.inference.conftest import Reply

Status = WebhookDelivery.Status

# --- the scripts ---------------------------------------------------------------------------

KEYS = ["t:slots", "t:line", "t:places"]


def take(client, holder: str, member: str, *, limit: int = 2, lease_ms: int = 60_000,
         keep_ms: int = 60_000) -> int:
    return lua_script(client, "webhook_slot_take", package="inference")(
        keys=KEYS, args=[holder, member, limit, lease_ms, keep_ms])


def release(client, holder: str, *, limit: int = 2) -> list[str]:
    woken = lua_script(client, "webhook_slot_release", package="inference")(
        keys=KEYS, args=[holder, limit])
    return [member.decode() for member in woken]


def test_slots_go_up_to_the_limit_then_deliveries_wait_oldest_first(clean_redis):
    assert take(clean_redis, "h1", "wd_01:1") == 0
    assert take(clean_redis, "h2", "wd_02:1") == 0
    assert take(clean_redis, "h3", "wd_04:1") == 1  # full: it waits, first in line
    assert take(clean_redis, "h4", "wd_03:1") == 1  # older: it goes before wd_04
    assert take(clean_redis, "h5", "wd_04:1") == 2
    # A slot given back names whom to wake: the head of the line.
    assert release(clean_redis, "h1") == ["wd_03:1"]
    # The newer one coming back first does not take the head's slot.
    assert take(clean_redis, "h6", "wd_04:1") == 2
    assert take(clean_redis, "h7", "wd_03:1") == 0
    assert release(clean_redis, "h2") == ["wd_04:1"]
    assert take(clean_redis, "h8", "wd_04:1") == 0
    assert clean_redis.zcard("t:line") == 0 and clean_redis.zcard("t:slots") == 2
    # Giving a slot back twice frees it once.
    release(clean_redis, "h7")
    release(clean_redis, "h7")
    assert clean_redis.zcard("t:slots") == 1
    # Nothing outlives its use: the slots expire with the last lease, an empty line is no key.
    assert 0 < clean_redis.pttl("t:slots") <= 60_000 and not clean_redis.exists("t:line")
    assert take(clean_redis, "h9", "wd_05:1", limit=1) == 1
    assert 0 < clean_redis.pttl("t:line") <= 60_000 and 0 < clean_redis.pttl("t:places") <= 60_000


def test_a_dead_workers_slot_and_a_lost_waiters_place_run_out(clean_redis):
    # A worker that died mid-attempt never gives its slot back: its lease ends it.
    assert take(clean_redis, "dead", "wd_01:1", limit=1, lease_ms=0) == 0
    assert take(clean_redis, "h1", "wd_02:1", limit=1) == 0
    # A waiter whose message was lost does not hold up those behind it for longer than its place.
    assert take(clean_redis, "lost", "wd_03:1", limit=1, keep_ms=0) == 1
    assert release(clean_redis, "h1", limit=1) == []
    assert take(clean_redis, "h2", "wd_04:1", limit=1) == 0


# --- deliveries ----------------------------------------------------------------------------


def _attempt_on_a_thread(delivery_id: str, results: queue.Queue) -> threading.Thread:
    def attempt():
        try:
            results.put((delivery_id, webhook_delivery_attempt(delivery_id=delivery_id, attempt=1)))
        finally:
            connections.close_all()

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    return thread


def _queued(redis_client) -> list[tuple[list, bool]]:
    """The webhooks queue's messages: (task args, whether it has a countdown)."""
    return [(json.loads(base64.b64decode(message["body"]))[0], bool(message["headers"].get("eta")))
            for message in map(json.loads, redis_client.lrange("webhooks", 0, -1))]


@pytest.mark.django_db(transaction=True)  # the attempts run on threads, each on its connection
def test_an_endpoint_gets_at_most_its_limit_at_once_while_another_is_not_held_up(
        cast, receiver, second_receiver, settings, clean_redis):
    settings.SLUICE_WEBHOOK_ENDPOINT_MAX_IN_FLIGHT = 2
    settings.SLUICE_WEBHOOK_TIMEOUT_S = 30  # the held requests wait for the test, however slow
    slow = webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    fast = webhook_endpoint_create(tenant=cast.tenant, url=second_receiver.url)
    for number in range(4):
        webhook_event_publish(tenant=cast.tenant, event_type="job.completed",
                              data={"id": f"job_{number}", "status": "succeeded"})
    to_slow = list(WebhookDelivery.objects.filter(endpoint=slow).order_by("pk")
                   .values_list("pk", flat=True))
    to_fast = WebhookDelivery.objects.filter(endpoint=fast).order_by("pk")
    clean_redis.delete("webhooks")  # their first messages, as publishing sent them

    receiver.hold()
    receiver.script(Reply(500))  # the first to arrive fails: its slot is given back all the same
    results: queue.Queue = queue.Queue()
    threads = [_attempt_on_a_thread(delivery_id, results) for delivery_id in to_slow]
    receiver.wait_in_flight(2)
    # The two that found both slots taken come back at once, without an attempt made.
    waiting = {results.get(timeout=10), results.get(timeout=10)}
    assert {outcome for _, outcome in waiting} == {None}
    waiting_ids = sorted(delivery_id for delivery_id, _ in waiting)
    for delivery in WebhookDelivery.objects.filter(pk__in=waiting_ids):
        assert (delivery.status, delivery.attempts, delivery.last_error) == (Status.PENDING, 0, "")
    assert not WebhookAttempt.objects.filter(delivery_id__in=waiting_ids).exists()
    # Each comes back after a countdown (a recheck), not lost.
    assert sorted(_queued(clean_redis)) == [([delivery_id, 1], True) for delivery_id in waiting_ids]

    # The other endpoint of the same tenant is delivered to meanwhile.
    for delivery in to_fast:
        assert webhook_delivery_attempt(delivery_id=delivery.pk, attempt=1).status == Status.SUCCEEDED
    assert len(second_receiver.requests) == 4
    assert receiver.in_flight == 2

    clean_redis.delete("webhooks")
    receiver.let_go()
    for thread in threads:
        thread.join(timeout=10)
    # The slots given back wake the line (each the waiters it has room for) before its
    # countdowns end.
    woken = {(tuple(args), countdown) for args, countdown in _queued(clean_redis)}
    assert woken == {((delivery_id, 1), False) for delivery_id in waiting_ids}
    threads = [_attempt_on_a_thread(delivery_id, results) for delivery_id in waiting_ids]
    for thread in threads:
        thread.join(timeout=10)

    assert receiver.most_in_flight == 2 and len(receiver.requests) == 4
    outcomes = sorted(WebhookDelivery.objects.filter(endpoint=slow).values_list("status", "attempts"))
    assert outcomes == [(Status.FAILED, 1)] + [(Status.SUCCEEDED, 1)] * 3
    assert WebhookAttempt.objects.filter(delivery__endpoint=slow).count() == 4


@pytest.mark.django_db
def test_an_attempt_that_raises_gives_its_slot_back_and_the_next_delivery_goes(
        cast, receiver, settings, clean_redis, monkeypatch):
    """Not an HTTP failure (recorded as one) but an exception out of the attempt, here recording
    it after the receiver answered: the slot it held is free again at once, not after its lease,
    so the endpoint's next delivery is made rather than waiting in line."""
    import inference.webhooks

    settings.SLUICE_WEBHOOK_ENDPOINT_MAX_IN_FLIGHT = 1
    endpoint = webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    for number in range(2):
        webhook_event_publish(tenant=cast.tenant, event_type="job.completed",
                              data={"id": f"job_{number}", "status": "succeeded"})
    first, second = WebhookDelivery.objects.filter(endpoint=endpoint).order_by("pk")
    slots = f"wh:ep:{endpoint.pk}:slots"
    held_while_raising = []

    def record_fails(**_kwargs):
        held_while_raising.append(clean_redis.zcard(slots))
        raise RuntimeError("the attempt's record failed")

    with monkeypatch.context() as patched:
        patched.setattr(inference.webhooks, "_attempt_record", record_fails)
        with pytest.raises(RuntimeError, match="record failed"):
            webhook_delivery_attempt(delivery_id=first.pk, attempt=1)
    assert held_while_raising == [1] and len(receiver.requests) == 1
    assert clean_redis.zcard(slots) == 0

    delivered = webhook_delivery_attempt(delivery_id=second.pk, attempt=1)
    assert (delivered.status, delivered.attempts) == (Status.SUCCEEDED, 1)
    assert len(receiver.requests) == 2 and clean_redis.zcard(slots) == 0
    assert not clean_redis.exists(f"wh:ep:{endpoint.pk}:line")

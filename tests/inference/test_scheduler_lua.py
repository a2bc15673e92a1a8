"""The scheduler's scripts on their own, against the real Redis (STYLE rule 11): enqueue.lua
and dispatch.lua with quotas' pool semaphore (quotas/lua/pool_acquire.lua) inside it."""

import pytest

from portal.redis import lua_script, redis_client

POOL_KEYS = ["t:prios", "t:jobs", "t:vt", "t:ph", "t:pz", "t:ps", "t:unsent"]
FAR = 9_999_999_999_999  # a lease that has not run out


@pytest.fixture
def client(clean_redis):
    return redis_client()


def enqueue(client, job_id, *, tenant="a", cost=1000, priority=5, reservation=None, cap=10):
    reservation = reservation or f"r{job_id}"
    client.hset(f"t:r:{reservation}", mapping={"state": "queued", "cost": cost})
    return float(lua_script(client, "enqueue", package="inference")(
        keys=[f"t:q:{priority}", f"t:tf:{tenant}", "t:vt", "t:prios", "t:jobs", f"t:r:{reservation}"],
        args=[job_id, cost, 1, priority, f"{reservation} {tenant} {cap}"],
    ) or "nan")


def dispatch(client, *, capacity=2000, slots=10):
    started = lua_script(client, "dispatch", package="inference")(
        keys=POOL_KEYS, args=["t:q:", "t:c:", "t:r:", capacity, 60_000, slots, 50],
    )
    return [value.decode() for value in started]


def test_dispatch_starts_in_order_while_the_pool_has_room(client):
    enqueue(client, "low", priority=1)
    enqueue(client, "first")
    enqueue(client, "second")
    assert dispatch(client, capacity=2000) == ["first", "rfirst", "second", "rsecond"]
    assert client.zrange("t:q:5", 0, -1) == [] and client.zrange("t:q:1", 0, -1) == [b"low"]
    assert client.hkeys("t:jobs") == [b"low"]  # started jobs leave the job hash
    assert client.hget("t:r:rfirst", "state") == b"admitted"
    assert int(client.get("t:ps")) == 2000 and client.zcard("t:pz") == 2
    assert client.zrange("t:c:a", 0, -1) == [b"rfirst", b"rsecond"]
    # The pool's virtual time moves to the last tag started: tenant a's tags ran 1000 (low),
    # 2000 (first), 3000 (second).
    assert float(client.get("t:vt")) == 3000.0
    assert dispatch(client, capacity=2000) == []  # full: the low-priority job waits


def test_a_full_pool_stops_the_round_and_a_freed_slot_reopens_it(client):
    enqueue(client, "a1")
    enqueue(client, "a2")
    assert dispatch(client, slots=1) == ["a1", "ra1"]
    assert dispatch(client, slots=1) == []
    client.zrem("t:pz", "ra1")  # what settle.lua does when a1 finishes
    assert dispatch(client, slots=1) == ["a2", "ra2"]


def test_an_expired_lease_gives_its_capacity_back(client):
    client.hset("t:ph", "dead", 2000)
    client.zadd("t:pz", {"dead": 1})  # its worker died long ago
    client.set("t:ps", 2000)
    enqueue(client, "j")
    assert dispatch(client, capacity=2000) == ["j", "rj"]
    assert client.hget("t:ph", "dead") is None and int(client.get("t:ps")) == 1000


def test_a_tenant_at_its_cap_waits_and_others_go_past_it(client):
    client.zadd("t:c:busy", {"running": FAR})
    enqueue(client, "busy1", tenant="busy", cap=1)
    enqueue(client, "other1", tenant="other", cap=1)
    assert dispatch(client) == ["other1", "rother1"]
    assert client.zrange("t:q:5", 0, -1) == [b"busy1"]
    client.zrem("t:c:busy", "running")
    assert dispatch(client) == ["busy1", "rbusy1"]


def test_a_reservation_redis_lost_stays_queued_and_does_not_block(client):
    enqueue(client, "lost")
    enqueue(client, "fine")
    client.delete("t:r:rlost")
    assert dispatch(client) == ["fine", "rfine"]
    assert client.zrange("t:q:5", 0, -1) == [b"lost"]  # until the ledger rebuild restores it


def test_an_already_admitted_reservation_is_started(client):
    enqueue(client, "j")
    client.hset("t:r:rj", "state", "admitted")
    assert dispatch(client) == ["j", "rj"]
    assert client.zcard("t:pz") == 0  # it took no second slot


def test_jobs_a_round_could_not_send_go_out_again_first_without_a_second_slot(client):
    """A job whose send failed keeps the slot its round gave it: the next round hands it out
    again before any queued job, even with the pool full, and takes no capacity for it."""
    enqueue(client, "a1")
    enqueue(client, "a2")
    assert dispatch(client, slots=1) == ["a1", "ra1"]
    client.hset("t:unsent", "a1", "ra1")  # what scheduler_dispatch keeps when a1's send fails
    assert dispatch(client, slots=1) == ["a1", "ra1"]  # full: a2 waits, a1 goes out again
    assert client.zcard("t:pz") == 1 and int(client.get("t:ps")) == 1000
    assert not client.exists("t:unsent")
    assert dispatch(client, slots=2) == ["a2", "ra2"]  # sent once again, not on every round


def test_enqueue_is_idempotent_and_refuses_a_job_whose_reservation_was_admitted(client):
    """The reconciliation may queue a job again that is already queued (its tag and its
    tenant's stay), or that a dispatch round has just taken onto the pool (not queued again)."""
    assert enqueue(client, "a1") == 1000.0
    client.hdel("t:jobs", "a1")  # the entry the round reads, lost
    assert enqueue(client, "a1") == 1000.0
    assert float(client.get("t:tf:a")) == 1000.0 and client.hexists("t:jobs", "a1")
    assert enqueue(client, "a2") == 2000.0
    assert dispatch(client, slots=1) == ["a1", "ra1"]
    client.hset("t:r:ra1", "state", "admitted")
    script = lua_script(client, "enqueue", package="inference")
    assert script(keys=["t:q:5", "t:tf:a", "t:vt", "t:prios", "t:jobs", "t:r:ra1"],
                  args=["a1", 1000, 1, 5, "ra1 a 10"]) is None
    assert client.zrange("t:q:5", 0, -1) == [b"a2"] and not client.hexists("t:jobs", "a1")


def test_run_time_keeps_an_exponentially_weighted_average(client):
    script = lua_script(client, "run_time", package="inference")
    assert float(script(keys=["t:avg"], args=[10, 60])) == 10.0  # the first run sets it
    assert float(script(keys=["t:avg"], args=[20, 60])) == 12.0  # then 0.8 old + 0.2 new
    assert float(client.get("t:avg")) == 12.0 and 0 < client.ttl("t:avg") <= 60

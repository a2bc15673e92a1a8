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


def test_run_time_keeps_the_pools_pace_as_averages_of_run_time_and_cost(client):
    script = lua_script(client, "run_time", package="inference")
    assert float(script(keys=["t:pace"], args=[10, 1000, 60])) == 100.0  # the first run sets it
    # Then 0.8 old + 0.2 new, each: a 4x bigger job in 2x the time -> 12 s, 1600 mCU.
    assert float(script(keys=["t:pace"], args=[20, 4000, 60])) == pytest.approx(1600 / 12)
    assert client.hgetall("t:pace") == {b"seconds": b"12", b"mcu": b"1600"}
    assert 0 < client.ttl("t:pace") <= 60


def queue_position(client, job_id, *, priority=5, most_read=1000):
    stand = lua_script(client, "queue_position", package="inference")(
        keys=["t:prios", "t:jobs", "t:ph", "t:pz", "t:pace"],
        args=["t:q:", "t:r:", job_id, priority, most_read],
    )
    if stand is None:
        return None
    ahead, ahead_mcu, own_mcu, pace_seconds, pace_mcu, *running = stand
    return (ahead, ahead_mcu, own_mcu, pace_seconds, pace_mcu,
            {r.decode(): int(mcu) for r, mcu in zip(running[::2], running[1::2], strict=True)})


def test_queue_position_sums_the_cost_ahead_higher_priorities_included(client):
    enqueue(client, "low", priority=1, cost=9000)  # behind, whatever its size
    enqueue(client, "big", cost=5000)
    enqueue(client, "me", cost=300)
    enqueue(client, "after", cost=7000)
    enqueue(client, "urgent", priority=9, cost=2000, tenant="b")
    assert queue_position(client, "me") == (2, 7000, 300, None, None, {})
    assert queue_position(client, "urgent", priority=9) == (0, 0, 2000, None, None, {})
    assert queue_position(client, "gone") is None


def test_queue_position_reads_the_running_reservations_and_the_pace(client):
    client.hset("t:ph", mapping={"live": 4000, "dead": 8000})
    client.zadd("t:pz", {"live": FAR, "dead": 1})  # dead's worker stopped renewing its lease
    client.hset("t:pace", mapping={"seconds": 12, "mcu": 1600})
    enqueue(client, "me", cost=300)
    assert queue_position(client, "me") == (0, 0, 300, b"12", b"1600", {"live": 4000})


def test_a_deep_queue_counts_the_costs_it_does_not_read_at_their_mean(client):
    for n, cost in enumerate([1000, 3000, 5000, 7000]):
        enqueue(client, f"j{n}", cost=cost)
    enqueue(client, "me", cost=10)
    assert queue_position(client, "me", most_read=2)[:3] == (4, 1000 + 3000 + 2 * 2000, 10)
    client.delete("t:r:rj1")  # Redis lost a reservation: its job counts at the mean too
    assert queue_position(client, "me")[:3] == (4, 1000 + 5000 + 7000 + 13000 // 3, 10)

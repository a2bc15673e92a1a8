"""The Lua scripts on their own, against the real Redis (STYLE rule 11)."""

import json

import pytest

from portal.redis import lua_script, redis_client

ADMIT_KEYS = ["b", "k", "rt", "rk", "c", "ph", "pz", "ps", "r:1"]


def admit(client, *, cost=1000, budget=10_000, key_cap=-1, rate=60_000, burst=60_000,
          key_rate=-1, key_burst=0, max_jobs=10, capacity=100_000, mode="sync", rid="1"):
    keys = [f"t:{name}" for name in ADMIT_KEYS[:-1]] + [f"t:r:{rid}", "t:cq"]
    outcome, *rest = lua_script(client, "admit")(
        keys=keys,
        args=[cost, budget, key_cap, rate, burst, key_rate, key_burst, max_jobs, capacity, mode,
              60_000, 3600, rid, "pool", 2000, 1000],
    )
    return outcome.decode(), [int(v) for v in rest]


@pytest.fixture
def client():
    return redis_client()


def test_admit_reports_a_miss_when_counters_are_absent_and_writes_nothing(client):
    assert admit(client)[0] == "miss"
    assert client.keys("t:*") == []


def test_admit_writes_only_on_admission(client):
    client.mset({"t:b": 9500, "t:k": 0})
    outcome, (retry, used, remaining, reset) = admit(client, cost=1000)
    assert outcome == "insufficient_quota" and used == 9500
    assert sorted(client.keys("t:*")) == [b"t:b", b"t:k"]  # no bucket, no marker, no slot
    outcome, (_, used, remaining, reset) = admit(client, cost=500)
    assert outcome == "admitted" and used == 10_000
    assert remaining == 59_500 and reset == 500  # 500 mCU at 1 mCU/ms to refill
    assert client.hgetall("t:r:1") == {b"state": b"admitted", b"cost": b"500", b"pool": b"pool",
                                       b"key_used": b"t:k"}
    assert int(client.get("t:ps")) == 500 and client.zcard("t:c") == 1


def test_admit_queues_async_work_without_taking_a_slot(client):
    client.mset({"t:b": 0, "t:k": 0})
    assert admit(client, max_jobs=1, rid="1")[0] == "admitted"
    assert admit(client, max_jobs=1, rid="2")[0] == "concurrency"
    assert admit(client, max_jobs=1, rid="2", mode="async")[0] == "queued"
    assert client.zcard("t:c") == 1 and int(client.get("t:b")) == 2000
    # Indexed by tenant till released, as the admitted one is (a forced rebuild reads both).
    assert client.zrange("t:c", 0, -1) == [b"1"] and client.zrange("t:cq", 0, -1) == [b"2"]
    settle_keys = ["t:r:2", "t:b", "t:k", "t:c", "t:ph", "t:pz", "t:ps", "t:cq"]
    assert lua_script(client, "settle")(keys=settle_keys, args=["2", 1000]) == 1
    assert client.zcard("t:cq") == 0 and int(client.get("t:b")) == 1000


def test_settle_is_idempotent_and_never_creates_a_counter(client):
    client.mset({"t:b": 0, "t:k": 0})
    admit(client, cost=3000)
    settle_keys = ["t:r:1", "t:b", "t:k", "t:c", "t:ph", "t:pz", "t:ps", "t:cq"]
    assert lua_script(client, "settle")(keys=settle_keys, args=["1", 2000]) == 1
    assert lua_script(client, "settle")(keys=settle_keys, args=["1", 2000]) == 0
    assert int(client.get("t:b")) == 1000 and int(client.get("t:ps")) == 0
    client.delete("t:b")
    admit_again = lua_script(client, "settle")(keys=["t:r:x", "t:b", "t:k", "t:c", "t:ph", "t:pz", "t:ps",
                                                     "t:cq"],
                                               args=["x", 500])
    assert admit_again == 0 and client.get("t:b") is None


def test_rebuild_applies_once(client):
    payload = {"budget_used": 4000, "ttl_s": 600, "key_counters": {"t:k": 1000}, "reservations": [
        {"key": "q:r:abc", "state": "admitted", "cost": 1000, "pool": "p", "in_flight_key": "t:c",
         "pool_hash": "t:ph", "pool_zset": "t:pz", "pool_sum": "t:ps", "lease_until_ms": 9_999_999_999_999},
    ]}
    assert lua_script(client, "rebuild")(keys=["t:b"], args=[json.dumps(payload)]) == 1
    assert lua_script(client, "rebuild")(keys=["t:b"], args=[json.dumps(payload)]) == 0
    assert int(client.get("t:b")) == 4000 and int(client.get("t:ps")) == 1000
    assert client.hget("q:r:abc", "state") == b"admitted" and client.zscore("t:c", "abc")


def test_a_rebuild_leaves_a_settlement_redis_missed_as_a_tombstone_the_replay_only_removes(client):
    """The ledger the rebuild reads holds the settlement: its replay must change no counter."""
    client.mset({"t:b": 0, "t:k": 0})
    admit(client, cost=3000)  # counted; then settled while Redis was unreachable
    client.delete("t:b")  # the budget counter is lost, and rebuilt from the ledger (1000 charged)
    payload = {"budget_used": 1000, "ttl_s": 600, "key_counters": {"t:k": 1000}, "reservations": [],
               "settled": [{"key": "t:r:1", "in_flight_key": "t:c", "pool_hash": "t:ph",
                            "pool_zset": "t:pz", "pool_sum": "t:ps"}]}
    assert lua_script(client, "rebuild")(keys=["t:b"], args=[json.dumps(payload)]) == 1
    assert int(client.get("t:k")) == 1000  # set with the budget, from the same ledger
    assert client.hget("t:r:1", "state") == b"settled"
    assert int(client.get("t:ps")) == 0 and client.zcard("t:c") == 0 and client.zcard("t:pz") == 0
    adopt_keys = ["t:b", "t:k", "t:r:1"]
    assert lua_script(client, "adopt")(keys=adopt_keys, args=[1000, "", 3000, "pool", 600]) == 0
    settle_keys = ["t:r:1", "t:b", "t:k", "t:c", "t:ph", "t:pz", "t:ps", "t:cq"]
    assert lua_script(client, "settle")(keys=settle_keys, args=["1", 2000]) == 0
    assert not client.exists("t:r:1")
    assert int(client.get("t:b")) == 1000 and int(client.get("t:k")) == 1000


def test_adopt_counts_a_reservation_without_a_marker_once(client):
    client.mset({"t:b": 500, "t:k": 500})
    keys = ["t:b", "t:k", "t:r:9"]
    assert lua_script(client, "adopt")(keys=keys, args=[2000, "marker", 2000, "pool", 600]) == 1
    assert lua_script(client, "adopt")(keys=keys, args=[2000, "marker", 2000, "pool", 600]) == 0
    assert int(client.get("t:b")) == 2500 and client.hget("t:r:9", "state") == b"admitted"


def test_adjust_moves_only_the_counters_that_exist(client):
    client.set("t:b", 3000)
    assert lua_script(client, "adjust")(keys=["t:b", "t:k"], args=[-500]) == 1
    assert int(client.get("t:b")) == 2500 and not client.exists("t:k")


def test_a_forced_rebuild_overwrites_and_keeps_what_the_ledger_read_did_not_see(client):
    """Admissions 1 and 2 are counted in Redis; the ledger read saw 1 only (2's rows are not
    committed yet). An admission 3 after the reads of the tenant's admissions makes it read
    again, and so does 4, queued for the pool (the tenant at its job cap): a queued admission
    is found through the tenant's queued zset as an admitted one is through its in-flight
    zset (it was in no per-tenant index, and left out of the rebuilt counter)."""
    keys = ["q:b:7:2026-11", "q:k:5:2026-11", "t:rt", "t:rk", "q:c:7", "t:ph", "t:pz", "t:ps"]
    client.mset({keys[0]: 0, keys[1]: 0})

    def admit_as(rid: str, cost: int, *, mode: str = "sync", outcome: bytes = b"admitted") -> None:
        assert lua_script(client, "admit")(
            keys=[*keys, f"q:r:{rid}", "q:cq:7"],
            args=[cost, -1, -1, 60_000, 60_000, -1, 0, 3, 100_000, mode, 60_000, 3600, rid,
                  "pool", 2000, 1000])[0] == outcome

    admit_as("1", 1000)
    admit_as("2", 4000)
    payload = {"budget_used": 1000, "ttl_s": 600, "key_counters": {keys[1]: 1000},
               "reservations": [], "settled": [],
               "force": {"period": "2026-11", "in_flight_key": "q:c:7", "queued_key": "q:cq:7",
                         "marker_prefix": "q:r:", "read": ["1", "2"], "known": ["1"]}}
    admit_as("3", 500)
    admit_as("4", 700, mode="async", outcome=b"queued")
    client.set(keys[0], 99_000)  # drifted
    assert lua_script(client, "rebuild")(keys=[keys[0]], args=[json.dumps(payload)]) == -1
    assert int(client.get(keys[0])) == 99_000  # nothing written
    payload["force"]["read"].append("3")
    assert lua_script(client, "rebuild")(keys=[keys[0]], args=[json.dumps(payload)]) == -1
    payload["force"]["read"].append("4")
    assert lua_script(client, "rebuild")(keys=[keys[0]], args=[json.dumps(payload)]) == 1
    assert int(client.get(keys[0])) == int(client.get(keys[1])) == 6200

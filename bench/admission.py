"""make bench-admission: one full admission decision, Sluice vs naive designs, side by side.

Sluice: quotas.admission.admission_decide -> one EVALSHA of quotas/lua/admit.lua (budget,
per-key cap, tenant and key token buckets, concurrency cap, pool semaphore).
Naive A: the same four checks as separate Redis round trips (read, decide in Python, write).
Naive B: the same four checks in PostgreSQL with SELECT ... FOR UPDATE on the tenant's and the
pool's rows, one transaction per decision, in ordinary (durable) tables: where a naive design
keeps its counters, beside the rest of the application's data.
Naive B, unlogged: the same on UNLOGGED tables (no WAL, no fsync at commit; lost on a crash),
the most generous form of that baseline.
Clients are processes (x threads at 64) hammering for a fixed time; each client holds its own
connection (Redis or PostgreSQL) for the whole run. Prints a table; the last line is one JSON
object of the figures.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import threading
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
# The benchmark's pool never saturates: every decision runs all four checks and admits.
os.environ["SLUICE_POOL_CAPACITY_CU"] = "bench=1000000000000"
os.environ["SLUICE_POOL_SLOTS"] = "bench=1000000000000"

DURATION_S = float(os.environ.get("BENCH_DURATION_S", "3"))
CONCURRENCIES = [1, 8, 64]
HUGE = 10**15
PG_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _dedicated_redis(redis_url: str):
    """One connection held by the client for its whole life, as each PostgreSQL client holds
    its own: redis-py's pool would otherwise check a connection out and back in around every
    command (a readiness poll, fork check and locks: ~20 us of client CPU per decision here),
    a cost of the pool, not of the decision being measured."""
    import redis

    return redis.Redis.from_url(redis_url, single_connection_client=True)


def _sluice_decider(redis_url: str, client_index: int):
    from quotas.admission import admission_decide
    from quotas.limits import CounterKeys, QuotaLimits

    client = _dedicated_redis(redis_url)
    keys = CounterKeys(tenant_id=client_index, api_key_id=client_index, period="2026-11", pool="bench")
    client.mset({keys.budget: 0, keys.key_used: 0})
    limits = QuotaLimits(budget_mcu=HUGE, tenant_rate_mcu=HUGE, tenant_burst_mcu=HUGE,
                         key_cap_mcu=HUGE, key_rate_mcu=HUGE, key_burst_mcu=HUGE,
                         max_concurrent_jobs=HUGE, fail_open=False)
    counter = [0]

    def decide():
        counter[0] += 1
        admission_decide(client=client, keys=keys, limits=limits, cost_mcu=1000, mode="sync",
                         reservation_id=f"{client_index}-{threading.get_ident()}-{counter[0]}",
                         retry_after_s=1)

    return decide


def _naive_redis_decider(redis_url: str, client_index: int):
    """Every check its own round trip; the writes follow the reads (not atomic: racy)."""
    client = _dedicated_redis(redis_url)
    prefix = f"naive:{client_index}"
    client.mset({f"{prefix}:b": 0, f"{prefix}:k": 0})
    counter = [0]

    def decide():
        counter[0] += 1
        rid = f"{client_index}-{threading.get_ident()}-{counter[0]}"
        now = time.time() * 1000
        used = int(client.get(f"{prefix}:b"))
        key_used = int(client.get(f"{prefix}:k"))
        tat = float(client.get(f"{prefix}:rt") or now)
        key_tat = float(client.get(f"{prefix}:rk") or now)
        in_flight = client.zcard(f"{prefix}:c")
        pool_used = int(client.get("naive:pool:sum") or 0)
        if used + 1000 > HUGE or key_used + 1000 > HUGE or in_flight >= HUGE or pool_used > HUGE:
            raise RuntimeError("rejected")
        new_tat, new_key_tat = max(tat, now) + 1e-9, max(key_tat, now) + 1e-9
        client.set(f"{prefix}:rt", new_tat)
        client.set(f"{prefix}:rk", new_key_tat)
        client.incrby(f"{prefix}:b", 1000)
        client.incrby(f"{prefix}:k", 1000)
        client.zadd(f"{prefix}:c", {rid: now + 60_000})
        client.hset("naive:pool:h", rid, 1000)
        client.incrby("naive:pool:sum", 1000)

    return decide


def _naive_pg_decider(pg_url: str, client_index: int, *, schema: str = "bench_durable"):
    import psycopg

    connection = psycopg.connect(pg_url, autocommit=False, options=f"-c search_path={schema}")
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO bench_quota (tenant_id, used, key_used, tat, in_flight) VALUES (%s, 0, 0, 0, 0) "
            "ON CONFLICT (tenant_id) DO NOTHING", [client_index])
    connection.commit()

    def decide():
        now = time.time() * 1000
        with connection.cursor() as cursor:
            cursor.execute("SELECT used, key_used, tat, in_flight FROM bench_quota "
                           "WHERE tenant_id = %s FOR UPDATE", [client_index])
            used, key_used, tat, in_flight = cursor.fetchone()
            cursor.execute("SELECT used FROM bench_pool WHERE name = 'bench' FOR UPDATE")
            (pool_used,) = cursor.fetchone()
            if used + 1000 > HUGE or key_used + 1000 > HUGE or in_flight >= HUGE or pool_used > HUGE:
                raise RuntimeError("rejected")
            cursor.execute("UPDATE bench_quota SET used = used + 1000, key_used = key_used + 1000, "
                           "tat = %s, in_flight = in_flight + 1 WHERE tenant_id = %s",
                           [max(tat, now) + 1e-9, client_index])
            cursor.execute("UPDATE bench_pool SET used = used + 1000 WHERE name = 'bench'")
        connection.commit()

    return decide


def _naive_unlogged_pg_decider(pg_url: str, client_index: int):
    return _naive_pg_decider(pg_url, client_index, schema="bench_unlogged")


SLUICE = "sluice (Lua)"
NAIVE_REDIS = "naive Redis round trips"
NAIVE_PG = "naive PostgreSQL FOR UPDATE"
NAIVE_PG_UNLOGGED = "naive PostgreSQL FOR UPDATE, unlogged"
DECIDERS = {SLUICE: _sluice_decider, NAIVE_REDIS: _naive_redis_decider,
            NAIVE_PG: _naive_pg_decider, NAIVE_PG_UNLOGGED: _naive_unlogged_pg_decider}


def _client_process(impl: str, target: str, first_index: int, threads: int, start_at: float,
                    results) -> None:
    import django

    django.setup()
    latencies: list[float] = []
    lock = threading.Lock()

    def run(index: int) -> None:
        decide = DECIDERS[impl](target, index)
        local: list[float] = []
        while time.time() < start_at:
            time.sleep(0.001)
        deadline = start_at + DURATION_S
        while True:
            begin = time.perf_counter()
            decide()
            local.append(time.perf_counter() - begin)
            if time.time() >= deadline:
                break
        with lock:
            latencies.extend(local)

    workers = [threading.Thread(target=run, args=(first_index + i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    results.put(latencies)


def measure(impl: str, target: str, concurrency: int) -> dict:
    processes = min(concurrency, 8)
    threads = concurrency // processes
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    start_at = time.time() + 1.5  # let every client connect first
    children = [
        context.Process(target=_client_process,
                        args=(impl, target, p * threads + 1, threads, start_at, results))
        for p in range(processes)
    ]
    for child in children:
        child.start()
    latencies = [value for _ in children for value in results.get(timeout=120)]
    for child in children:
        child.join()
    from bench.common import percentile

    return {
        "decisions_per_s": len(latencies) / DURATION_S,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }


def _prepare_pg() -> bool:
    try:
        import psycopg
        from psycopg import sql

        with psycopg.connect(PG_URL, autocommit=True, connect_timeout=3) as connection:
            for schema, kind in (("bench_durable", ""), ("bench_unlogged", "UNLOGGED")):
                names = {"schema": sql.Identifier(schema), "kind": sql.SQL(kind)}
                for statement in (
                    "DROP SCHEMA IF EXISTS {schema} CASCADE",
                    "CREATE SCHEMA {schema}",
                    "CREATE {kind} TABLE {schema}.bench_quota (tenant_id int PRIMARY KEY, "
                    "used bigint, key_used bigint, tat double precision, in_flight bigint)",
                    "CREATE {kind} TABLE {schema}.bench_pool (name text PRIMARY KEY, used bigint)",
                    "INSERT INTO {schema}.bench_pool VALUES ('bench', 0)",
                ):
                    connection.execute(sql.SQL(statement).format(**names))
        return True
    except Exception as exc:  # no PostgreSQL here: report the Redis comparison only
        print(f"(PostgreSQL naive baselines skipped: {exc})", file=sys.stderr)
        return False


def main() -> None:
    import django
    import redis

    django.setup()
    from bench.common import bench_redis_url, print_table

    redis_url, embedded = bench_redis_url()
    impls = {SLUICE: redis_url, NAIVE_REDIS: redis_url}
    if _prepare_pg():
        impls[NAIVE_PG] = PG_URL
        impls[NAIVE_PG_UNLOGGED] = PG_URL
    rows, figures = [], {}
    try:
        for concurrency in CONCURRENCIES:
            for impl, target in impls.items():
                redis.Redis.from_url(redis_url).flushdb()
                result = measure(impl, target, concurrency)
                figures[(impl, concurrency)] = result
                rows.append([impl, concurrency, result["decisions_per_s"], result["p50_ms"],
                             result["p99_ms"]])
    finally:
        if embedded is not None:
            embedded.stop()
    print(f"Admission decisions, {DURATION_S:.0f} s per cell, {os.cpu_count()} CPUs, Redis {redis_url}")
    print_table(["implementation", "clients", "decisions/s", "p50 ms", "p99 ms"], rows)

    def speedup(naive: str, concurrency: int) -> float | None:
        if (naive, concurrency) not in figures:
            return None
        return round(figures[(SLUICE, concurrency)]["decisions_per_s"]
                     / figures[(naive, concurrency)]["decisions_per_s"], 2)

    sluice8 = figures[(SLUICE, 8)]
    summary = {
        "decisions_per_s_c1": round(figures[(SLUICE, 1)]["decisions_per_s"]),
        "decisions_per_s_c8": round(sluice8["decisions_per_s"]),
        "decisions_per_s_c64": round(figures[(SLUICE, 64)]["decisions_per_s"]),
        "p50_ms_c8": round(sluice8["p50_ms"], 3),
        "p99_ms_c8": round(sluice8["p99_ms"], 3),
        # The naive design as it would be built: counters in the application's durable tables.
        "speedup_vs_naive_c8": speedup(NAIVE_PG, 8),
        "speedup_vs_naive_unlogged_pg_c8": speedup(NAIVE_PG_UNLOGGED, 8),
        "speedup_vs_naive_redis_c8": speedup(NAIVE_REDIS, 8),
        "speedup_vs_naive_pg_c64": speedup(NAIVE_PG, 64),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

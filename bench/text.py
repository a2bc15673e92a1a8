"""make bench-text: code generation through Sluice vs straight to the engine.

Same tiny model, same prompts (max_tokens 32, temperature 0), one run, the two targets
alternating round by round so drift cancels:
(a) time to first token and total latency: Sluice (HTTP -> auth -> safety -> admission ->
    Celery -> engine -> Redis stream -> SSE) vs the engine's own OpenAI server, at 1/8/32
    concurrent streams;
(b) aggregate tokens/s at 1/8/32 streams, Sluice / direct;
(c) CPU ms that Sluice's own processes (ASGI server + text worker) spend per streamed request,
    and apart from them what its local Redis and PostgreSQL spend on it.
The engine is pinned to CPU 0, everything else (Sluice, the client, and a local Redis and
PostgreSQL while the benchmark runs) to CPU 1: left on both cores, they take turns with the
engine during Sluice's rounds only, and the direct baseline never meets them. The client is
aiohttp (a third of httpx's CPU per stream) and its own CPU per stream is a column: on Sluice's
core, what the load generator spends is taken from Sluice.
BENCH_FIRST_WINDOW_CHARS=N gives the bench tenant a copy of its safety policy whose first output
window is N characters (the time to first token it holds back; the default is the policy's own).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import psutil

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
os.environ["DATABASE_URL"] = os.environ.get("BENCH_DATABASE_URL",
                                            "postgres://postgres@127.0.0.1:5432/sluice_bench")
from bench.common import postgres_database_ensure  # noqa: E402

postgres_database_ensure(os.environ["DATABASE_URL"])
REPO = Path(__file__).resolve().parent.parent
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "6"))
FIRST_WINDOW_CHARS = int(os.environ.get("BENCH_FIRST_WINDOW_CHARS", "0"))  # 0: the policy's own
CONCURRENCY = [1, 8, 32]
SEQUENTIAL_AT_1 = 8
PROMPTS = ["def add(a, b):", "class Stack:", "import os\n\ndef main():", "def parse(line):",
           "for item in items:", "def fibonacci(n):", "with open(path) as handle:",
           "def merge(left, right):"]


def _redis_url() -> str:
    from bench.common import bench_redis_url

    return bench_redis_url()[0].rsplit("/", 1)[0] + "/12"


def _pinned(cpu: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv]


def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


def _start_stack(env: dict[str, str]) -> tuple[list[subprocess.Popen], str, str]:
    from inference.engines.vllm import vllm_server_argv, vllm_server_env
    from inference.registry import model_get
    from portal.embedded_redis import free_port

    spec = model_get("sluice-code-tiny")
    variant = spec.variant("full")
    engine_port, web_port = free_port(), free_port()
    engine_url, web_url = f"http://127.0.0.1:{engine_port}", f"http://127.0.0.1:{web_port}"
    env["SLUICE_VLLM_URLS"] = f"{variant.served_name}={engine_url}"
    logs = REPO / "var"
    logs.mkdir(exist_ok=True)

    def spawn(name: str, argv: list[str], process_env: dict[str, str]) -> subprocess.Popen:
        log = open(logs / f"bench-text-{name}.log", "w")  # noqa: SIM115 - lives with the process
        return subprocess.Popen(argv, cwd=REPO, env=process_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    engine = spawn("engine", _pinned("0", vllm_server_argv(spec=spec, variant=variant, port=engine_port)),
                   {**vllm_server_env(env), "VLLM_CPU_OMP_THREADS_BIND": "0"})
    web = spawn("web", _pinned("1", [sys.executable, "-m", "uvicorn", "portal.asgi:application",
                                      "--host", "127.0.0.1", "--port", str(web_port),
                                      "--log-level", "warning", "--no-access-log"]),
                {**env, "SLUICE_DB_POOL_MAX": "16"})
    worker = spawn("worker", _pinned("1", [sys.executable, "-m", "celery", "-A", "portal", "worker",
                                            "-Q", "text-batch", "--pool", "threads", "--concurrency",
                                            "40", "--loglevel", "WARNING", "--without-gossip",
                                            "--without-mingle", "--without-heartbeat"]),
                   {**env, "SLUICE_DB_CONN_MAX_AGE": "60"})
    _wait_http(f"{engine_url}/health", 400)
    _wait_http(f"{web_url}/healthz", 60)
    return [engine, web, worker], engine_url, web_url


def _bench_key() -> str:
    import django

    django.setup()
    from django.core.management import call_command

    from portal.models import Tenant
    from portal.services import api_key_issue
    from tests.factories import tier

    call_command("migrate", verbosity=0)
    tenant, _ = Tenant.objects.get_or_create(
        slug="bench-text", defaults={"name": "bench text", "tier": tier("enterprise")})
    Tenant.objects.filter(pk=tenant.pk).update(
        unlimited_budget=True, cu_per_minute_override=100_000_000, burst_cu_override=100_000_000,
        max_concurrent_jobs_override=100_000)
    tenant = Tenant.objects.get(pk=tenant.pk)
    _bench_policy(tenant)
    return api_key_issue(tenant=tenant, name="bench").full_key


def _bench_policy(tenant) -> None:
    """The tier's safety policy, or with BENCH_FIRST_WINDOW_CHARS a copy of it whose first
    output window is that long (to measure the time-to-first-token trade of that setting)."""
    from moderation.models import SafetyPolicy, SafetyPolicyAssignment
    from moderation.selectors import safety_policy_for_tenant

    SafetyPolicyAssignment.objects.filter(tenant=tenant).delete()
    if not FIRST_WINDOW_CHARS:
        return
    base = safety_policy_for_tenant(tenant=tenant)
    policy, _ = SafetyPolicy.objects.update_or_create(
        slug=f"bench-first-{FIRST_WINDOW_CHARS}",
        defaults={"name": f"bench, first window {FIRST_WINDOW_CHARS}", "block_fpr": base.block_fpr,
                  "review_fpr": base.review_fpr, "output_window_chars": base.output_window_chars,
                  "output_first_window_chars": FIRST_WINDOW_CHARS})
    SafetyPolicyAssignment.objects.create(tenant=tenant, policy=policy)


async def _one_stream(session: aiohttp.ClientSession, url: str, headers: dict, prompt: str,
                      model: str) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": 32, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = None
    tokens = 0
    async with session.post(f"{url}/v1/completions", json=body, headers=headers) as response:
        assert response.status == 200, await response.read()
        async for line in response.content:  # one SSE line at a time
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            # Count tokens from usage: Sluice sends moderated windows, not one chunk per token.
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice.get("text") and first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft": (first or end) - started, "total": end - started, "chunks": tokens}


async def _round(url: str, headers: dict, concurrency: int, offset: int, model: str) -> dict:
    """`concurrency` streams at once; at 1, SEQUENTIAL_AT_1 streams one after another, so the
    single-stream percentiles rest on as many samples as the others'."""
    # aiohttp, not httpx: the client shares Sluice's core, and httpx's pure-Python HTTP costs
    # about 4.4 ms of CPU per 32-chunk stream there against aiohttp's 1.3 (measured side by side).
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64),
                                     timeout=aiohttp.ClientTimeout(total=120)) as client:
        started = time.perf_counter()
        streams = SEQUENTIAL_AT_1 if concurrency == 1 else concurrency
        prompts = [PROMPTS[(offset + i) % len(PROMPTS)] for i in range(streams)]
        if concurrency == 1:
            results = [await _one_stream(client, url, headers, prompt, model) for prompt in prompts]
        else:
            results = await asyncio.gather(*[_one_stream(client, url, headers, prompt, model)
                                             for prompt in prompts])
        wall = time.perf_counter() - started
    return {"results": results, "wall": wall}


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        for member in [process, *process.children(recursive=True)]:
            try:
                times = member.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
    return total


def _own_cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()  # not its children: they are the engine and Sluice
    return times.user + times.system


def main() -> None:
    from bench.common import listening_processes, percentile, print_table
    from portal.launcher import process_tree_pin, process_tree_unpin

    os.environ["REDIS_URL"] = _redis_url()
    env = dict(os.environ, PYTHONUNBUFFERED="1", SLUICE_POOL_SLOTS="text-batch=256",
               SLUICE_POOL_CAPACITY_CU="text-batch=1000000")
    os.environ.update({"SLUICE_POOL_SLOTS": env["SLUICE_POOL_SLOTS"],
                       "SLUICE_POOL_CAPACITY_CU": env["SLUICE_POOL_CAPACITY_CU"]})
    os.sched_setaffinity(0, {1})
    key = _bench_key()
    processes, engine_url, web_url = _start_stack(env)
    sluice_processes = [psutil.Process(p.pid) for p in processes[1:]]
    data_services = listening_processes([os.environ["REDIS_URL"], os.environ["DATABASE_URL"]])
    data_affinity = process_tree_pin(data_services, {1})
    client = psutil.Process()  # this process: the load generator, on Sluice's core too
    rows, figures = [], {}
    try:
        # Warm both paths (engine graphs, worker imports, classifier loads) at the largest
        # concurrency measured: Sluice's connection pools (a PostgreSQL connection per worker
        # thread, the API's Redis, broker and database pools) grow to it once, and that growth
        # (new PostgreSQL backends, redis-py's per-connection set-up) is start-up, not a cost of
        # each stream. Warmed at 4, the first rounds at 8 and 32 paid for it: about 6 ms of
        # CPU per stream more at 8 streams (29.8 vs 23.3 in consecutive runs).
        for target in (engine_url, web_url):
            asyncio.run(_round(target, {"Authorization": f"Bearer {key}"}, max(CONCURRENCY), 0,
                               "sluice-code-tiny"))
        for concurrency in CONCURRENCY:
            samples = {"direct": [], "sluice": []}
            walls = {"direct": 0.0, "sluice": 0.0}
            tokens = {"direct": 0, "sluice": 0}
            cpu = data_cpu = 0.0
            client_cpu = {"direct": 0.0, "sluice": 0.0}
            for round_index in range(ROUNDS):
                for target in ("direct", "sluice") if round_index % 2 == 0 else ("sluice", "direct"):
                    url = engine_url if target == "direct" else web_url
                    before = _cpu_seconds(sluice_processes) if target == "sluice" else 0
                    data_before = _cpu_seconds(data_services) if target == "sluice" else 0
                    client_before = _own_cpu_seconds(client)
                    outcome = asyncio.run(_round(url, {"Authorization": f"Bearer {key}"}, concurrency,
                                                 round_index, "sluice-code-tiny"))
                    if target == "sluice":
                        cpu += _cpu_seconds(sluice_processes) - before
                        data_cpu += _cpu_seconds(data_services) - data_before
                    client_cpu[target] += _own_cpu_seconds(client) - client_before
                    samples[target].extend(outcome["results"])
                    walls[target] += outcome["wall"]
                    tokens[target] += sum(r["chunks"] for r in outcome["results"])
            streams = len(samples["sluice"])
            figure = {}
            for target in ("direct", "sluice"):
                ttft = [r["ttft"] * 1000 for r in samples[target]]
                total = [r["total"] * 1000 for r in samples[target]]
                figure[target] = {"ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
                                  "total_p50": percentile(total, 50), "total_p99": percentile(total, 99),
                                  "tokens_per_s": tokens[target] / walls[target]}
            figure["cpu_ms_per_stream"] = cpu * 1000 / streams
            figure["data_cpu_ms_per_stream"] = data_cpu * 1000 / streams
            figure["client_cpu_ms_per_stream"] = {t: client_cpu[t] * 1000 / streams for t in client_cpu}
            figures[concurrency] = figure
            for target in ("direct", "sluice"):
                f = figure[target]
                rows.append([concurrency, target, f["ttft_p50"], f["ttft_p99"], f["total_p50"],
                             f["total_p99"], f["tokens_per_s"]])
    finally:
        process_tree_unpin(data_affinity)
        for process in processes:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(process.pid, signal.SIGKILL)
    print(f"Text generation, tiny code model, max_tokens 32, {ROUNDS} rounds per cell, engine on CPU 0, "
          "Sluice and the client on CPU 1, first output window "
          f"{FIRST_WINDOW_CHARS or 'of the tier policy'}; local data services pinned to CPU 1 and "
          f"counted: {', '.join(p.name() for p in data_services) or 'none found'} "
          f"({len(data_affinity)} threads pinned)")
    print_table(["streams", "target", "TTFT p50 ms", "TTFT p99 ms", "total p50 ms", "total p99 ms",
                 "tokens/s"], rows)
    overhead_rows = []
    for concurrency, figure in figures.items():
        overhead_rows.append([
            concurrency, figure["sluice"]["ttft_p50"] - figure["direct"]["ttft_p50"],
            figure["sluice"]["ttft_p99"] - figure["direct"]["ttft_p99"],
            figure["sluice"]["tokens_per_s"] / figure["direct"]["tokens_per_s"],
            figure["cpu_ms_per_stream"], figure["data_cpu_ms_per_stream"],
            f'{figure["client_cpu_ms_per_stream"]["direct"]:.2f} / '
            f'{figure["client_cpu_ms_per_stream"]["sluice"]:.2f}'])
    print_table(["streams", "added TTFT p50 ms", "added TTFT p99 ms", "throughput Sluice/direct",
                 "Sluice CPU ms/stream", "Redis+PostgreSQL CPU ms/stream",
                 "client CPU ms/stream direct / Sluice"], overhead_rows)
    print(json.dumps({
        "ttft_overhead_p50_ms": round(overhead_rows[0][1], 2),
        "ttft_overhead_p99_ms": round(overhead_rows[0][2], 2),
        "ttft_overhead_p50_ms_c8": round(overhead_rows[1][1], 2),
        "ttft_overhead_p50_ms_c32": round(overhead_rows[2][1], 2),
        "throughput_ratio_c1": round(overhead_rows[0][3], 3),
        "throughput_ratio_c8": round(overhead_rows[1][3], 3),
        "throughput_ratio_c32": round(overhead_rows[2][3], 3),
        "cpu_ms_per_stream": round(sum(r[4] for r in overhead_rows) / len(overhead_rows), 2),
        "data_services_cpu_ms_per_stream": round(sum(r[5] for r in overhead_rows) / len(overhead_rows), 2),
        "client_cpu_ms_per_stream_c8": {t: round(v, 2) for t, v in
                                         figures[8]["client_cpu_ms_per_stream"].items()},
        "first_window_chars": FIRST_WINDOW_CHARS or None,
    }))


if __name__ == "__main__":
    main()

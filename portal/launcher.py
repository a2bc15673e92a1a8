"""`make run`: one supervisor process for the whole platform on one machine.

It picks a Redis (the configured one if it answers, else an embedded redis-server), migrates,
seeds the demo, starts the ASGI server and one Celery worker per queue, prints the three
lines a script can read, and on Ctrl-C / SIGTERM stops every process it started.
Each child runs in its own process group so the whole tree under it (prefork children,
engine processes) can be signalled together.

Once the platform is up, the first Ctrl-C / SIGTERM drains: the Celery workers' main processes
alone get SIGTERM (Celery's warm shutdown: take no new task, finish the running ones), and
everything else waits for them. The next one, or SLUICE_STOP_DRAIN_S, stops every group now.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from portal.embedded_redis import EmbeddedRedis, embedded_redis_start, redis_answers
from portal.logs import secrets_redact

# After SIGTERM to every process group, how long before SIGKILL.
STOP_GRACE_S = 15.0
WORKER_PREFIX = "worker:"
# uvicorn's --timeout-graceful-shutdown: on SIGTERM it ends the SSE streams still open after this
# long and exits. Without it, it waited for them, and an open stream had the web server killed
# at STOP_GRACE_S.
WEB_GRACEFUL_SHUTDOWN_S = 10
# The web server answers /healthz once it has imported the project and loaded the safety
# classifier, while four workers and the engines import torch beside it: 50-55 s on the idle
# 2-core machine, more with anything else running (60 s here made make run give up).
WEB_START_TIMEOUT_S = 300.0


@dataclass
class Supervisor:
    children: dict[str, subprocess.Popen] = field(default_factory=dict)
    embedded_redis: EmbeddedRedis | None = None
    # Ctrl-C / SIGTERM received so far (request_stop): each one hurries the stop a step further.
    stop_requests: int = 0

    @property
    def stopping(self) -> bool:
        return self.stop_requests > 0

    def request_stop(self, signum=None, frame=None) -> None:
        self.stop_requests += 1

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.children[name] = subprocess.Popen(argv, env=env, start_new_session=True)

    def _signal_groups(self, sig: int) -> None:
        for child in self.children.values():
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, sig)

    def _running(self, prefix: str = "") -> list[subprocess.Popen]:
        return [child for name, child in self.children.items()
                if name.startswith(prefix) and child.poll() is None]

    def _wait(self, prefix: str, *, timeout_s: float, hurried_at: int) -> bool:
        """Wait until no child named `prefix`... runs (True), or the timeout passes or the
        `hurried_at`th stop request arrives (False)."""
        deadline = time.monotonic() + timeout_s
        while self._running(prefix):
            if self.stop_requests >= hurried_at or time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def workers_drain(self, *, timeout_s: float) -> bool:
        """Celery's warm shutdown, as Ctrl-C gives it in a worker's own terminal: SIGTERM to each
        worker's main process alone, which takes no new task and waits for its running ones.
        (Sent to the group, it reached the prefork children too, which died mid-job: the job
        was recovered later as worker_lost.) Returns whether every worker exited in time,
        before a stop request after the one that began the stop (none began it when a child
        exited; two pressed at once skip the drain).

        Everything else stays up meanwhile. The text workers' jobs stream from the engines.
        The web server relays the jobs to their clients (a blocking completion, an SSE or
        websocket follower): stopped first, it would cut the very streams the drain lets
        finish. What it admits meanwhile stays queued for the next start."""
        for child in self._running(WORKER_PREFIX):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
        return self._wait(WORKER_PREFIX, timeout_s=timeout_s,
                          hurried_at=min(self.stop_requests, 1) + 1)

    def stop(self, *, drain_s: float = 0.0) -> None:
        """Stop every child: first drain the workers for up to `drain_s`, then SIGTERM to every
        group and SIGKILL STOP_GRACE_S later, or at the next stop request; Redis last."""
        if drain_s > 0:
            self.workers_drain(timeout_s=drain_s)
        self._signal_groups(signal.SIGTERM)
        self._wait("", timeout_s=STOP_GRACE_S, hurried_at=self.stop_requests + 1)
        # Anything left in a child's group (including orphaned grandchildren) is killed.
        for child in self.children.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        if self.embedded_redis is not None:
            self.embedded_redis.stop()

    def first_exited(self) -> tuple[str, int] | None:
        for name, child in self.children.items():
            code = child.poll()
            if code is not None:
                return name, code
        return None


class StartupInterrupted(Exception):
    """Ctrl-C or SIGTERM arrived before the platform was up."""


def _wait_for_http(url: str, supervisor: Supervisor, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if supervisor.stopping:
            raise StartupInterrupted
        exited = supervisor.first_exited()
        if exited:
            raise RuntimeError(f"{exited[0]} exited with code {exited[1]} during start-up")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s (the web server loads the "
                       "safety classifier before it answers, beside the workers' and engines' "
                       "start-up: is the machine busy?)")


def web_server_argv(*, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "portal.asgi:application", "--host", host,
            "--port", str(port), "--log-level", "warning", "--no-access-log",
            "--timeout-graceful-shutdown", str(WEB_GRACEFUL_SHUTDOWN_S)]


# A job's process is killed this many heartbeat TTLs after its pool's SLUICE_JOB_MAX_RUN_S.
# By then the engine was asked to stop (the watcher, at the limit), and one that did not - a hung
# CUDA call - has been failed by the reaper as overdue (it stops beating when stopped, and is
# taken for lost two TTLs later): the kill only gives its worker slot back.
JOB_KILL_AFTER_TTLS = 4


def job_hard_time_limit_s(pool: str) -> int:
    from django.conf import settings

    from inference.services import job_max_run_s

    return job_max_run_s(pool) + JOB_KILL_AFTER_TTLS * settings.SLUICE_JOB_HEARTBEAT_TTL_S


def worker_pool_args(queue: str) -> list[str]:
    from django.conf import settings

    pool = settings.SLUICE_WORKER_POOLS.get(queue, "prefork")
    if pool == "threads":
        # Text workers only relay streams from the engine: many jobs per process. Celery's time
        # limits do not apply to threads; a stream the engine stops answering ends at its read
        # timeout (SLUICE_VLLM_READ_TIMEOUT_S) instead.
        return ["--pool", "threads", "--concurrency", str(settings.SLUICE_POOL_SLOTS.get(queue, 8))]
    args = ["--pool", pool, "--concurrency", "1"]
    if queue in settings.SLUICE_POOL_SLOTS:
        # A GPU pool's job that outlives its limit has its child process killed and replaced
        # (Celery's hard time limit, enforced by prefork); without it a hung engine held the
        # pool's worker for ever.
        args += ["--time-limit", str(job_hard_time_limit_s(queue))]
    return args


def _spawn_text_engines(supervisor: Supervisor, env: dict[str, str]) -> list:
    """A vLLM server for each text variant whose configured URL is on this machine and does
    not answer yet. They load in the background; text jobs wait for them. Returns the variants
    started, with their process names."""
    from urllib.parse import urlsplit

    from django.conf import settings

    from inference.engines.vllm import engine_ready, vllm_server_argv, vllm_server_env
    from inference.registry import text_variants

    if not settings.SLUICE_VLLM_START:
        return []
    started = []
    for spec, variant in text_variants():
        url = urlsplit(settings.SLUICE_VLLM_URLS.get(variant.served_name, ""))
        if url.hostname not in ("127.0.0.1", "localhost") or engine_ready(variant):
            continue
        name = f"engine:{variant.served_name}"
        supervisor.spawn(name, vllm_server_argv(spec=spec, variant=variant, port=url.port or 80),
                         vllm_server_env(env))
        started.append((name, variant))
        print(f"Engine: {variant.served_name} loading at {url.geturl()}", flush=True)
    return started


def process_tree_pin(processes: list, cpus: set[int]) -> dict[int, set[int]]:
    """Pin every thread of these psutil processes and of their children to `cpus` (threads
    made later inherit it); returns what each thread had, for process_tree_unpin."""
    import psutil

    before: dict[int, set[int]] = {}
    for process in processes:
        try:
            members = [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for member in members:
            try:
                thread_ids = [thread.id for thread in member.threads()]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for thread_id in thread_ids:
                try:
                    before[thread_id] = os.sched_getaffinity(thread_id)
                    os.sched_setaffinity(thread_id, cpus)
                except OSError:  # gone, or not ours to pin
                    before.pop(thread_id, None)
    return before


def process_tree_unpin(before: dict[int, set[int]]) -> None:
    for thread_id, cpus in before.items():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(thread_id, cpus)


def engine_cpus(setting: str | frozenset[int], *, available: set[int], has_gpu: bool) -> set[int] | None:
    """The CPUs loaded engines are pinned to (settings.SLUICE_ENGINE_CPUS), None: not pinned."""
    if setting == "none":
        return None
    if setting == "auto":
        if has_gpu or len(available) < 2:
            return None
        return available - {max(available)}
    chosen = set(setting) & available
    return chosen or None


def _engines_pin_when_loaded(supervisor: Supervisor, engines: list, cpus: set[int]) -> None:
    """Each engine loads on every core (loading is the slow part), then goes onto `cpus`."""
    import psutil

    from inference.engines.vllm import engine_ready

    waiting = list(engines)
    while waiting and not supervisor.stopping:
        for name, variant in list(waiting):
            child = supervisor.children[name]
            if child.poll() is not None:
                waiting.remove((name, variant))
            elif engine_ready(variant):
                pinned = process_tree_pin([psutil.Process(child.pid)], cpus)
                waiting.remove((name, variant))
                print(f"Engine: {variant.served_name} ready; {len(pinned)} threads pinned to "
                      f"CPU {','.join(map(str, sorted(cpus)))} (SLUICE_ENGINE_CPUS)", flush=True)
        time.sleep(1.0)


def metrics_dir_reset(var_dir: Path) -> Path:
    """Every process of this run writes its metric samples here and the web server's /metrics
    adds them up (portal/metrics.py); files of an earlier run would count twice."""
    metrics_dir = var_dir / "prometheus"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    return metrics_dir


def run_platform(*, host: str, port: int, var_dir: Path, queues: list[str], configured_redis_url: str) -> int:
    from django.conf import settings
    from django.core.management import call_command

    from inference.engines.vllm import has_gpu as vllm_has_gpu
    from portal.demo import DEMO_PRINTED_TIER, demo_seed

    supervisor = Supervisor()
    signal.signal(signal.SIGINT, supervisor.request_stop)
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    drain_s = 0.0  # until the platform is up a stop does not wait for jobs (none ran yet)

    try:
        # REDIS_URL may carry Redis's password: the lines say where, never that.
        if redis_answers(configured_redis_url):
            redis_url = configured_redis_url
            print(f"Redis: {secrets_redact(redis_url)} (configured)", flush=True)
        else:
            supervisor.embedded_redis = embedded_redis_start(
                data_dir=var_dir / "redis", new_session=True
            )
            redis_url = supervisor.embedded_redis.url
            print(f"Redis: {redis_url} (embedded; {secrets_redact(configured_redis_url)} did not "
                  "answer)", flush=True)

        call_command("migrate", interactive=False, verbosity=0)
        credentials = demo_seed()
        if supervisor.stopping:
            raise StartupInterrupted
        # So README examples work as pasted: curl -H "Authorization: Bearer $(cat var/demo_api_key)"
        key_file = var_dir / "demo_api_key"
        key_file.touch(mode=0o600)
        key_file.write_text(credentials.keys_by_tier[DEMO_PRINTED_TIER] + "\n")

        env = dict(os.environ, REDIS_URL=redis_url, PYTHONUNBUFFERED="1",
                   PROMETHEUS_MULTIPROC_DIR=str(metrics_dir_reset(var_dir)))
        env.setdefault("SLUICE_DEBUG", "true")
        env.setdefault("SLUICE_LOG_FORMAT", "plain")  # a person reads this terminal
        supervisor.spawn(
            "web", web_server_argv(host=host, port=port),
            {"SLUICE_DB_POOL_MAX": "16", **env},  # PostgreSQL only (settings.DB_POOL_MAX)
        )
        engines = _spawn_text_engines(supervisor, env)
        for queue in queues:
            argv = [sys.executable, "-m", "celery", "-A", "portal", "--quiet", "worker", "-Q", queue,
                    "-n", f"{queue}@%h", "--loglevel", "WARNING", *worker_pool_args(queue)]
            if queue == queues[0]:
                # One machine: the first worker also runs the periodic tasks (celery beat).
                argv += ["--beat", "--schedule", str(var_dir / "celerybeat-schedule")]
            supervisor.spawn(f"{WORKER_PREFIX}{queue}", argv, {"SLUICE_DB_CONN_MAX_AGE": "60", **env})
        _wait_for_http(f"http://{host}:{port}/healthz", supervisor, timeout_s=WEB_START_TIMEOUT_S)
        cpus = engine_cpus(settings.SLUICE_ENGINE_CPUS, available=os.sched_getaffinity(0),
                           has_gpu=vllm_has_gpu())
        if engines and cpus:
            threading.Thread(target=_engines_pin_when_loaded, args=(supervisor, engines, cpus),
                             name="engine-pinner", daemon=True).start()

        print(f"Dashboard: http://{host}:{port}/", flush=True)
        print(f"Admin login: {credentials.username} / {credentials.password}", flush=True)
        print(f"Demo API key: {credentials.keys_by_tier[DEMO_PRINTED_TIER]}", flush=True)
        for tier_slug, key in credentials.keys_by_tier.items():
            if tier_slug != "pro":
                print(f"Other demo keys: {tier_slug}={key}", flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        drain_s = settings.SLUICE_STOP_DRAIN_S

        while not supervisor.stopping:
            exited = supervisor.first_exited()
            if exited:
                print(f"{exited[0]} exited with code {exited[1]}; stopping.", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    except StartupInterrupted:
        # Stop now: Ctrl-C during start-up went unheeded until the web server answered (up to
        # WEB_START_TIMEOUT_S), after which it still printed the credentials and only then
        # stopped; a supervisor that gave up waiting and killed the launcher left its children
        # (each in a session of its own) running.
        return 0
    except RuntimeError as exc:
        print(f"make run failed: {exc}", file=sys.stderr)
        return 1
    finally:
        print("Stopping…", flush=True)
        if drain_s > 0:
            print(_drain_line(queues, drain_s), flush=True)
        supervisor.stop(drain_s=drain_s)
        print("Stopped.", flush=True)


def _drain_line(queues: list[str], drain_s: float) -> str:
    """What the stop waits for, and how to stop now."""
    from django.db import DatabaseError

    from inference.selectors import jobs_running_by_pool

    try:
        running_by_pool = jobs_running_by_pool()
        running = sum(running_by_pool.get(queue, 0) for queue in queues)
        if running == 0:
            return "Stopping: no job is running."
        jobs = f"{running} job{'' if running == 1 else 's'} still running"
    except DatabaseError:  # a stop must not fail for a count
        jobs = "jobs still running (the database did not answer)"
    return (f"Stopping: {jobs}; the workers finish them first (at most {drain_s:.0f} s, "
            "SLUICE_STOP_DRAIN_S). Press Ctrl-C again to stop now.")

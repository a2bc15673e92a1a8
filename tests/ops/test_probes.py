"""The liveness probes the manifests exec (portal/probes.py) tell a busy worker or beat from a
stuck one."""

from __future__ import annotations

import os
import shelve
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.inference.test_worker import create_video, event_types, wait_for


def _k8s_documents(file_name: str, *, kind: str) -> list[dict]:
    import yaml

    text = (Path(__file__).resolve().parents[2] / "deploy" / "k8s" / file_name).read_text()
    return [doc for doc in yaml.safe_load_all(text) if doc and doc["kind"] == kind]


def _web_deployment() -> dict:
    (web,) = [doc for doc in _k8s_documents("web.yaml", kind="Deployment")
              if doc["metadata"]["name"] == "sluice-web"]
    return web


def probe(*args: str) -> subprocess.CompletedProcess:
    """As the kubelet execs it: a fresh interpreter in the worker's environment."""
    return subprocess.run([sys.executable, "-m", "portal.probes", *args], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_worker_probe_passes_mid_job_and_fails_once_the_consumer_is_stuck(cast, api, start_worker):
    worker = start_worker("video-hbm")
    args = worker.process.args
    node_pattern = args[args.index("-n") + 1]
    job_id = create_video(api, cast.owner_key, num_inference_steps=40)["id"]
    wait_for(lambda: "job.progress" in event_types(job_id), 120, worker, "the first step")

    # Prefetch 1, the one prefork child busy with the video: the main process still answers.
    answered = probe("worker", node_pattern)
    assert answered.returncode == 0, answered.stderr + worker.output()[-2000:]
    assert "job.completed" not in event_types(job_id)  # it answered mid-job

    os.kill(worker.process.pid, signal.SIGSTOP)  # a consumer that no longer runs
    try:
        stuck = probe("worker", node_pattern)
    finally:
        os.kill(worker.process.pid, signal.SIGCONT)
    assert stuck.returncode == 1 and "did not answer" in stuck.stderr


def test_beat_probe_fails_once_the_schedule_stops_being_saved(tmp_path):
    schedule = tmp_path / "celerybeat-schedule"
    assert probe("beat", str(schedule), "360").returncode == 1  # never saved

    # As celery beat saves it: whichever files this Python's dbm writes (schedule.dat, .dir...).
    with shelve.open(str(schedule), writeback=True) as store:  # noqa: S301 - our own file
        store["entries"] = {}
    assert probe("beat", str(schedule), "360").returncode == 0

    stale = time.time() - 400
    for path in tmp_path.iterdir():
        os.utime(path, (stale, stale))
    failed = probe("beat", str(schedule), "360")
    assert failed.returncode == 1 and "last saved" in failed.stderr


@pytest.mark.django_db
def test_web_probes_and_scrapes_answer_a_pod_ip_host_the_allowed_hosts_do_not_list(client, settings):
    """The kubelet probes a pod at its IP, and Prometheus scrapes it there: `Host: <pod IP>:8000`.
    deploy/k8s/config.yaml allows only the public host, so Django's host check answered every
    probe and scrape 400 (web pods never became ready, and liveness restarted them). Only those
    paths are exempt: they build nothing from the Host header."""
    (config,) = _k8s_documents("config.yaml", kind="ConfigMap")
    settings.ALLOWED_HOSTS = config["data"]["SLUICE_ALLOWED_HOSTS"].split(",")
    settings.SLUICE_METRICS_TOKEN = "scrape-token-1"
    settings.SLUICE_METRICS_PROBE_ENGINES = False
    pod = _web_deployment()["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    pod_host = {"HTTP_HOST": f"10.1.2.3:{container['ports'][0]['containerPort']}",
                "REMOTE_ADDR": "10.1.0.7"}

    probed = {container[probe]["httpGet"]["path"] for probe in ("readinessProbe", "livenessProbe")}
    for path in probed | {"/readyz"}:  # /readyz: what an operator or a blackbox check asks
        assert client.get(path, **pod_host).status_code == 200, path
    scraped = client.get(pod["metadata"]["annotations"]["prometheus.io/path"],
                         HTTP_AUTHORIZATION="Bearer scrape-token-1", **pod_host)
    assert scraped.status_code == 200 and b"sluice_jobs_running" in scraped.content
    # Everything else still refuses a host it does not serve.
    assert client.get("/accounts/login/", **pod_host).status_code == 400
    assert client.get("/v1/models", **pod_host).status_code == 400


@pytest.mark.django_db
def test_web_pods_stay_in_rotation_while_redis_is_down(client, settings, tmp_path):
    """With Redis down the web pods still serve: fail-open tiers are admitted, the others get
    503 system_overloaded with Retry-After (README "Compute units"). A readiness probe on /readyz
    failed on every pod at once, the Service had no endpoint left, and every client got
    connection errors instead. /readyz still tells an operator which dependency is down."""
    from portal.embedded_redis import embedded_redis_start

    redis_server = embedded_redis_start(data_dir=tmp_path)
    settings.REDIS_URL = redis_server.url
    settings.READINESS_TIMEOUT_S = 0.5
    redis_server.stop()
    (container,) = _web_deployment()["spec"]["template"]["spec"]["containers"]
    readiness = container["readinessProbe"]["httpGet"]["path"]
    assert client.get(readiness).status_code == 200
    diagnosis = client.get("/readyz")
    assert diagnosis.status_code == 503 and diagnosis.json()["checks"]["redis"].startswith("error")

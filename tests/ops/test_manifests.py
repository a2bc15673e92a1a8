"""deploy/k8s validates against the Kubernetes schemas, and its GPU pools match the registry."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from unittest import mock

import jsonschema
import kubernetes_validate
import pytest
import yaml

from inference.engines import vllm
from inference.registry import model_list, text_variants
from portal.launcher import worker_pool_args

K8S_DIR = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
K8S_VERSION = "1.33.0"
# The node labels each kind of model needs (DESIGN.md: video -> HBM/NVLink, text -> batching).
GPU_CLASS_FOR_KIND = {"video": "hbm-nvlink", "text": "batching"}

# kubernetes-validate ships the built-in kinds' schemas only. For the two CRDs the manifests
# use, these are the fields KEDA and the Prometheus Operator require (their CRDs' `required`
# lists) plus the ones Sluice relies on; unknown fields are refused so typos fail.
_CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {}, "kind": {},
            "metadata": {"type": "object", "required": ["name", "namespace"]},
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "additionalProperties": False,
                "properties": {
                    "scaleTargetRef": {"type": "object", "required": ["name"],
                                       "properties": {"name": {"type": "string"}}},
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "pollingInterval": {"type": "integer"},
                    "cooldownPeriod": {"type": "integer"},
                    "advanced": {"type": "object"},
                    "triggers": {
                        "type": "array", "minItems": 1,
                        "items": {
                            "type": "object", "required": ["type", "metadata"],
                            "properties": {
                                "type": {"type": "string"},
                                "metadata": {"type": "object",
                                             "additionalProperties": {"type": "string"}},
                            },
                        },
                    },
                },
            },
        },
    },
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "spec": {
                "type": "object", "required": ["groups"], "additionalProperties": False,
                "properties": {"groups": {"type": "array", "items": {
                    "type": "object", "required": ["name", "rules"],
                    "properties": {"rules": {"type": "array", "items": {
                        "type": "object", "required": ["alert", "expr"],
                        "additionalProperties": False,
                        "properties": {"alert": {"type": "string"}, "expr": {"type": "string"},
                                       "for": {"type": "string"}, "labels": {"type": "object"},
                                       "annotations": {"type": "object"}},
                    }}},
                }}},
            },
        },
    },
}


def _documents() -> list[dict]:
    documents = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


DOCUMENTS = _documents()


def _of_kind(kind: str) -> list[dict]:
    return [doc for doc in DOCUMENTS if doc["kind"] == kind]


def _keda_query(pool: str) -> str:
    (scaled,) = [doc for doc in _of_kind("ScaledObject")
                 if doc["spec"]["scaleTargetRef"]["name"] == f"sluice-pool-{pool}"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    return trigger["metadata"]["query"]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_validates(document):
    crd_schema = _CRD_SCHEMAS.get((document["apiVersion"], document["kind"]))
    if crd_schema is not None:
        jsonschema.validate(document, crd_schema)
    else:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    if document["kind"] != "Namespace":
        assert document["metadata"]["namespace"] == "sluice"


def _pool_deployment(pool: str) -> dict:
    found = [doc for doc in _of_kind("Deployment")
             if any(c["command"][:6] == ["celery", "-A", "portal", "worker", "-Q", pool]
                    for c in doc["spec"]["template"]["spec"]["containers"])]
    assert len(found) == 1, f"one Deployment must consume the {pool} queue"
    return found[0]


@pytest.mark.parametrize("spec", model_list(), ids=lambda spec: spec.id)
def test_each_models_pool_runs_on_its_gpu_nodes(spec):
    deployment = _pool_deployment(spec.pool)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"sluice.dev/gpu-pool": spec.pool}
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    assert term["matchExpressions"] == [
        {"key": "sluice.dev/gpu-class", "operator": "In", "values": [GPU_CLASS_FOR_KIND[spec.kind]]}]
    assert {"key": "sluice.dev/gpu-pool", "operator": "Equal", "value": spec.pool,
            "effect": "NoSchedule"} in pod["tolerations"]
    gpus = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
               for c in pod["containers"] + pod.get("initContainers", []))
    assert gpus >= 1
    (worker,) = [c for c in pod["containers"] if c["name"] == "worker"]
    assert " ".join(worker_pool_args(spec.pool)) in " ".join(worker["command"])
    assert f'pool="{spec.pool}"' in _keda_query(spec.pool)
    assert any(pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
               for pdb in _of_kind("PodDisruptionBudget"))


def test_text_engines_are_sidecars_started_as_vllm_server_argv_says_on_gpus():
    config = next(doc for doc in _of_kind("ConfigMap") if doc["metadata"]["name"] == "sluice-config")
    urls = dict(item.split("=", 1) for item in config["data"]["SLUICE_VLLM_URLS"].split(","))
    for spec, variant in text_variants():
        pod = _pool_deployment(spec.pool)["spec"]["template"]["spec"]
        (sidecar,) = [c for c in pod.get("initContainers", [])
                      if c["name"] == f"vllm-{variant.served_name}"]
        port = int(urls[variant.served_name].rsplit(":", 1)[1])
        on_node = replace(variant, checkpoint=Path("/models") / variant.served_name)
        with mock.patch.object(vllm, "has_gpu", return_value=True):
            expected = vllm.vllm_server_argv(spec=spec, variant=on_node, port=port)
        # The image's python instead of this machine's interpreter; every flag as in the code.
        assert sidecar["command"] == ["python", *expected[1:]]
        assert "--enforce-eager" not in sidecar["command"]
        assert sidecar["readinessProbe"]["httpGet"] == {"path": "/health", "port": port}
        assert sidecar["startupProbe"]["httpGet"] == {"path": "/health", "port": port}


# After its warm shutdown (open streams finishing) the worker exits; the engines then stop.
ENGINES_STOP_S = 30


@pytest.mark.parametrize("spec", {spec.pool: spec for spec, _variant in text_variants()}.values(),
                         ids=lambda spec: spec.pool)
def test_text_engines_outlive_the_workers_warm_shutdown(spec, settings):
    """A scale-down, drain or rollout SIGTERMs a pod's ordinary containers together: vLLM
    servers among them cancel their requests at once and every open stream fails with
    engine_error. Native sidecars (restartable init containers) are stopped only after the
    worker, and the grace period covers the longest stream plus their own stop."""
    pod = _pool_deployment(spec.pool)["spec"]["template"]["spec"]
    assert not [c["name"] for c in pod["containers"] if c["name"].startswith("vllm-")]
    engines = [c for c in pod.get("initContainers", []) if c["name"].startswith("vllm-")]
    assert engines and all(c["restartPolicy"] == "Always" for c in engines)
    longest_stream_s = max(settings.SLUICE_POOL_LEASE_S[spec.pool],
                           settings.SLUICE_VLLM_READ_TIMEOUT_S)
    assert pod["terminationGracePeriodSeconds"] >= longest_stream_s + ENGINES_STOP_S


def test_every_queue_has_workers_and_beat_runs_alone():
    for queue in ("default", "webhooks"):
        assert _pool_deployment(queue)["spec"]["replicas"] >= 1
    (beat,) = [doc for doc in _of_kind("Deployment") if doc["metadata"]["name"] == "sluice-beat"]
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"]["type"] == "Recreate"


def test_web_probes_and_autoscaling():
    (web,) = [doc for doc in _of_kind("Deployment") if doc["metadata"]["name"] == "sluice-web"]
    (container,) = web["spec"]["template"]["spec"]["containers"]
    # Readiness too: a shared dependency down must not empty the Service (test_probes.py).
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    (hpa,) = _of_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "sluice-web"
    secret_refs = {ref["secretRef"]["name"] for ref in container["envFrom"] if "secretRef" in ref}
    assert secret_refs == {"sluice-secrets"}


def test_web_pods_drain_before_their_grace_period_ends():
    """Without a preStop sleep a stopping pod closed its listener at once, while the Service's
    proxies and the ingress still sent it new connections for a few seconds (refused); without
    --timeout-graceful-shutdown uvicorn waited for every open SSE stream, and the kubelet
    SIGKILLed it at the grace period's end. The sleep runs first, then uvicorn's shutdown, and
    both must end before the grace period does."""
    (web,) = [doc for doc in _of_kind("Deployment") if doc["metadata"]["name"] == "sluice-web"]
    pod = web["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    sleep_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    command = container["command"]
    graceful_s = int(command[command.index("--timeout-graceful-shutdown") + 1])
    assert sleep_s >= 3 and graceful_s >= 10
    assert sleep_s + graceful_s < pod["terminationGracePeriodSeconds"]


def _worker_containers() -> list[dict]:
    return [c for doc in _of_kind("Deployment") for c in doc["spec"]["template"]["spec"]["containers"]
            if c["command"][:4] == ["celery", "-A", "portal", "worker"]]


@pytest.mark.parametrize("container", _worker_containers(), ids=lambda c: c["command"][5])
def test_worker_liveness_pings_its_own_consumer(container):
    """A TCP check on the metrics thread passed while the consumer was stuck. The probe pings
    the node this container runs (its -n) and gives a busy worker minutes, not seconds."""
    from portal.probes import WORKER_PING_TIMEOUT_S

    command = container["command"]
    node_pattern = command[command.index("-n") + 1]
    probe = container["livenessProbe"]
    assert probe["exec"]["command"] == ["python", "-m", "portal.probes", "worker", node_pattern]
    assert probe["timeoutSeconds"] >= WORKER_PING_TIMEOUT_S + 15  # interpreter start + the ping
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 300
    assert probe["initialDelaySeconds"] >= 30


def test_beat_liveness_reads_how_old_its_schedule_is():
    from celery.beat import PersistentScheduler

    (beat,) = [doc for doc in _of_kind("Deployment") if doc["metadata"]["name"] == "sluice-beat"]
    (container,) = beat["spec"]["template"]["spec"]["containers"]
    schedule = container["command"][container["command"].index("--schedule") + 1]
    *probe, max_age_s = container["livenessProbe"]["exec"]["command"]
    assert probe == ["python", "-m", "portal.probes", "beat", schedule]
    # Saved every sync_every seconds: two missed saves, not one late one, mean a stalled beat.
    assert float(max_age_s) >= 2 * PersistentScheduler.sync_every


# Periodic tasks that delete job outputs from the media volume: the reaper (outputs of deleted
# jobs, and of superseded attempts) and retention (SLUICE_MEDIA_RETENTION_DAYS).
MEDIA_REMOVING_TASKS = ("inference.jobs_reap", "inference.jobs_content_expire")


def _media_mount(container: dict, pod: dict) -> dict | None:
    claims = {volume["name"]: volume.get("persistentVolumeClaim", {}).get("claimName")
              for volume in pod.get("volumes", [])}
    config = next(doc for doc in _of_kind("ConfigMap") if doc["metadata"]["name"] == "sluice-config")
    return next((mount for mount in container.get("volumeMounts", [])
                 if claims.get(mount["name"]) == "sluice-media"
                 and mount["mountPath"] == config["data"]["SLUICE_MEDIA_ROOT"]), None)


@pytest.mark.parametrize("task", MEDIA_REMOVING_TASKS)
def test_the_workers_that_remove_media_can_write_the_media_volume(task, settings):
    """A worker without the volume "removes" a file that is not there (a missing file is no
    error to the storage), then clears the row's pointers: a deleted or expired video stayed on
    the volume for ever, with nothing left pointing at it."""
    (entry,) = [entry for entry in settings.CELERY_BEAT_SCHEDULE.values() if entry["task"] == task]
    queue = entry.get("options", {}).get("queue", settings.CELERY_TASK_DEFAULT_QUEUE)
    pod = _pool_deployment(queue)["spec"]["template"]["spec"]
    (worker,) = [c for c in pod["containers"] if c["command"][:4] == ["celery", "-A", "portal", "worker"]]
    mount = _media_mount(worker, pod)
    assert mount is not None, f"{task} runs on the {queue} workers, which do not mount the media volume"
    assert not mount.get("readOnly", False)


def _sluice_processes() -> list[tuple[str, dict, dict]]:
    """(id, container, pod) of every Deployment container that runs Sluice's Django code: its web
    server and its Celery workers (not the vLLM sidecars, nor beat, which runs no task)."""
    found = []
    for deployment in _of_kind("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"]:
            command = container.get("command", [])
            if (command[:1] == ["celery"] and "worker" in command) or "uvicorn" in command:
                found.append((f"{deployment['metadata']['name']}/{container['name']}", container, pod))
    return found


@pytest.mark.parametrize(("container", "pod"), [(c, p) for _id, c, p in _sluice_processes()],
                         ids=[process_id for process_id, _c, _p in _sluice_processes()])
def test_every_sluice_process_reads_the_text_checkpoints(container, pod):
    """Admission tokenises a prompt with the model's tokenizer, and every registry lookup reads
    each text checkpoint's config.json (its context length): the web pods, the reaper's billing
    (default workers), a text job's run (the text-batch pool's worker, besides its engines) and
    every worker's start (the classifier preload asks the registry for the text pools). Without
    the models volume each of those failed (ImproperlyConfigured)."""
    claims = {volume["name"]: volume.get("persistentVolumeClaim", {}).get("claimName")
              for volume in pod.get("volumes", [])}
    config = next(doc for doc in _of_kind("ConfigMap") if doc["metadata"]["name"] == "sluice-config")
    mounts = [mount["mountPath"] for mount in container.get("volumeMounts", [])
              if claims.get(mount["name"]) == "sluice-models" and mount.get("readOnly")]
    for setting in ("SLUICE_CODE_MODEL_PATH", "SLUICE_CODE_MODEL_INT8_PATH"):
        checkpoint = Path(config["data"][setting])
        assert any(checkpoint.is_relative_to(path) for path in mounts), setting


def test_the_sluice_processes_are_found():
    assert {process_id.split("/")[0] for process_id, _c, _p in _sluice_processes()} == {
        "sluice-web", "sluice-worker-default", "sluice-worker-webhooks",
        "sluice-pool-text-batch", "sluice-pool-video-hbm"}

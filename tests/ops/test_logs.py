"""JSON log lines carry the request, tenant, job and pool ids where known, and no secrets."""

from __future__ import annotations

import io
import json
import logging

import pytest

from inference.registry import model_get
from inference.runner import job_run
from inference.services import job_submit
from portal.logs import JsonLogFormatter, LogContextFilter, PlainLogFormatter, log_context
from quotas.cost import CostEstimate
from tests.factories import api_key_obj, tenant_with_limits

pytestmark = pytest.mark.django_db
PROMPT = "a heron folding origami at dawn, secret sauce 8841"


@pytest.fixture
def json_lines():
    """Every record of the test, formatted as production formats it (SLUICE_LOG_FORMAT=json)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLogFormatter())
    handler.addFilter(LogContextFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    previous_level, root.level = root.level, logging.INFO
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.removeHandler(handler)
    root.level = previous_level


def test_request_lines_carry_request_and_tenant_ids_and_never_the_prompt_or_key(
        cast, api, sent_tasks, json_lines):
    response = api.bearer(cast.owner_key).post(
        "/v1/videos", {"model": "sluice-video-tiny", "prompt": PROMPT, "size": "64x64",
                       "seconds": 0.5, "num_inference_steps": 2}, format="json")
    assert response.status_code == 201, response.json()
    lines = json_lines()
    # The first admission of a period rebuilds the tenant's counters, and says so.
    (rebuilt,) = [line for line in lines if line["logger"] == "quotas.ledger"]
    assert rebuilt["request_id"] == response["x-request-id"]
    assert rebuilt["tenant_id"] == cast.tenant.pk
    assert {"time", "level", "message"} <= set(rebuilt)
    raw = json.dumps(lines)
    assert PROMPT not in raw and cast.owner_key not in raw


def test_job_lines_carry_job_tenant_and_pool(sent_tasks, json_lines):
    api_key = api_key_obj(tenant_with_limits(budget_cu=100))
    spec = model_get("sluice-video-tiny")
    # The real engine refuses a job without its step count: a failure logged mid-job.
    job = job_submit(api_key=api_key, spec=spec, variant=spec.variant("full"),
                     params={"prompt": PROMPT}, estimate=CostEstimate(mcu=1000), mode="async").job
    assert job_run(job_id=job.pk, attempt=1) == "failed"
    (failure,) = [line for line in json_lines() if line["logger"] == "inference.runner"]
    assert failure["level"] == "ERROR" and "KeyError" in failure["exception"]
    assert (failure["job_id"], failure["tenant_id"], failure["pool"]) == (
        job.pk, api_key.tenant_id, "video-hbm")
    assert PROMPT not in json.dumps(json_lines())


def test_context_ends_with_its_block_and_secrets_are_redacted():
    record = logging.LogRecord("sluice.test", logging.INFO, __file__, 1,
                               "issued %s and whsec_QUJDREVGR0hJSktMTU5PUA==", (
                                   "sk-abcdefghijkl" + "S3cr3tS3cr3tS3cr3tS3cr3tS3cr3tS3cr3tS3cr",),
                               None)
    with log_context(job_id="job_1", pool="video-hbm"):
        LogContextFilter().filter(record)
    line = json.loads(JsonLogFormatter().format(record))
    assert line["message"] == "issued sk-abcdefghijkl[redacted] and whsec_[redacted]"
    assert (line["job_id"], line["pool"]) == ("job_1", "video-hbm") and "request_id" not in line

    outside = logging.LogRecord("sluice.test", logging.INFO, __file__, 1, "later", (), None)
    LogContextFilter().filter(outside)
    assert outside.job_id is None and outside.log_context == "-"
    plain = PlainLogFormatter("[%(log_context)s] %(message)s")
    assert plain.format(record) == (
        "[job_id=job_1 pool=video-hbm] issued sk-abcdefghijkl[redacted] and whsec_[redacted]")


def test_database_and_redis_passwords_and_bearer_tokens_are_redacted():
    """The URLs in sluice-secrets carry passwords, and a scrape or API call an Authorization
    header: an exception or message that quotes one must not put it in the logs."""
    record = logging.LogRecord(
        "sluice.test", logging.ERROR, __file__, 1, "could not reach %s or %s; sent %r", (
            "redis://:r3dis-pw@redis.internal:6379/0", "postgres://sluice:pg-pw@db.internal:5432/sluice",
            {"Authorization": "Bearer scrape-token-1"}), None)
    for formatter in (JsonLogFormatter(), PlainLogFormatter("%(message)s")):
        line = formatter.format(record)
        assert "r3dis-pw" not in line and "pg-pw" not in line and "scrape-token-1" not in line
        assert "redis://:[redacted]@redis.internal:6379/0" in line
        assert "postgres://sluice:[redacted]@db.internal" in line  # which account, not its password
    # A URL without a password, and an API key's public prefix, stay readable.
    plain = PlainLogFormatter("%(message)s").format(logging.LogRecord(
        "sluice.test", logging.INFO, __file__, 1, "%s; Bearer %s", (
            "redis://127.0.0.1:6379/0", "sk-abcdefghijkl" + "S3cr3t" * 7), None))
    assert plain == "redis://127.0.0.1:6379/0; Bearer sk-abcdefghijkl[redacted]"


@pytest.mark.slow
def test_the_web_servers_own_lines_are_json_too(tmp_path):
    """uvicorn gives its loggers a plain-text handler of its own before it loads the project:
    started as deploy/k8s/web.yaml starts it, its lines (start-up, shutdown, websocket
    handshakes, an "Exception in ASGI application" traceback) bypassed the JSON formatter and
    its redaction, and a log pipeline parsing JSON lines got `INFO:     Started server process`."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx
    import yaml

    from portal.embedded_redis import free_port

    repo = Path(__file__).resolve().parents[2]
    (web,) = [doc for doc in yaml.safe_load_all((repo / "deploy" / "k8s" / "web.yaml").read_text())
              if doc and doc["kind"] == "Deployment" and doc["metadata"]["name"] == "sluice-web"]
    command = list(web["spec"]["template"]["spec"]["containers"][0]["command"])
    port = free_port()
    command[0] = sys.executable
    command[command.index("--host") + 1] = "127.0.0.1"
    command[command.index("--port") + 1] = str(port)
    env = {key: value for key, value in os.environ.items() if key != "SLUICE_DEBUG"}
    env.update(SLUICE_LOG_FORMAT="json", SLUICE_VAR_DIR=str(tmp_path / "var"))
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("w") as stderr:
        server = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None and time.monotonic() < deadline, stderr_path.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    lines = stderr_path.read_text().splitlines()
    assert not [line for line in lines if line.startswith(("INFO:", "WARNING:", "ERROR:"))], lines
    uvicorn = [entry for entry in (json.loads(line) for line in lines if line.startswith("{"))
               if entry["logger"].startswith("uvicorn")]
    messages = " | ".join(entry["message"] for entry in uvicorn)
    assert "Started server process" in messages and "Shutting down" in messages
    # --no-access-log still holds: a probe is not a log line.
    assert not [entry for entry in uvicorn if entry["logger"] == "uvicorn.access"]


@pytest.mark.parametrize(("level", "outcome"), [("debug", "DEBUG"), ("WARNING", "WARNING"),
                                                ("loud", "SLUICE_LOG_LEVEL='loud' is not one of")])
def test_log_level_is_read_in_any_case_and_a_wrong_one_is_named(level, outcome):
    """`SLUICE_LOG_LEVEL=debug` stopped every process with logging's "Unable to configure root
    logger", which names neither the variable nor its value."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, SLUICE_LOG_LEVEL=level, DJANGO_SETTINGS_MODULE="portal.settings")
    started = subprocess.run(
        [sys.executable, "-c", "import django, logging; django.setup(); "
                               "print(logging.getLevelName(logging.getLogger().level))"],
        cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=120)
    assert outcome in started.stdout + started.stderr, started.stderr[-2000:]


@pytest.mark.slow
def test_loading_the_safety_classifier_writes_only_json_lines(fresh_asgi_process):
    """transformers gives its logger a stderr handler of its own and draws a tqdm bar while it
    loads weights: every web and worker pod's log began with `Loading weights: 100%|####| ...`
    and `[transformers] ...` lines that a pipeline parsing JSON lines could not read. (The
    process loads it as the web server does, logging JSON.)"""
    loaded = fresh_asgi_process
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    entries = []
    for line in loaded.stderr.splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r} in\n{loaded.stderr[:2000]}") from None
    assert "safety classifier loaded" in " ".join(entry["message"] for entry in entries)

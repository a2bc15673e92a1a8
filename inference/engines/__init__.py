"""Engines behind one small interface (inference.engines.base.Engine).

`engine_for(spec)` returns the process-wide engine of a model, loading it once per worker
process. Production code never branches on tests: tests run the same engines on the tiny
models the repo ships.
"""

from __future__ import annotations

import functools

from inference.engines.base import Engine
from inference.registry import ModelSpec


@functools.cache
def _engine(engine_name: str, model_id: str) -> Engine:
    from inference.registry import model_get

    spec = model_get(model_id)
    if engine_name == "diffusers":
        from inference.engines.diffusers import DiffusersVideoEngine

        return DiffusersVideoEngine(spec)
    if engine_name == "vllm":
        from inference.engines.vllm import VllmTextEngine

        return VllmTextEngine(spec)
    raise ValueError(f"unknown engine {engine_name!r}")


def engine_for(spec: ModelSpec) -> Engine:
    return _engine(spec.engine, spec.id)

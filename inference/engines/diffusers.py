"""Video engine: a diffusers text-to-video pipeline, loaded once per worker process.

One job at a time per GPU (the video-hbm pool has one slot per worker). Each denoising
step reports progress and checks for a cancel; a cancelled job stops within one step and
is charged for the steps it ran. Output: H.264 mp4 + JPEG thumbnail through Django's storage.
"""

from __future__ import annotations

import io
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage

from inference.engines.base import RunContext, RunResult, StopRequested
from inference.registry import ModelSpec
from quotas.cost import video_cost

MAX_PROMPT_TOKENS = 128


class DiffusersVideoEngine:
    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self._pipeline = None
        self._lock = threading.Lock()

    def pipeline(self):
        with self._lock:
            if self._pipeline is None:
                from inference.tinymodels.video_model import load_video_pipeline

                self._pipeline = load_video_pipeline(Path(self.spec.variant("full").checkpoint))
            return self._pipeline

    def run(self, context: RunContext) -> RunResult:
        params = context.params
        steps = int(params["steps"])
        started = time.monotonic()
        steps_done = [0]

        def on_step_end(_pipeline, step_index: int, _timestep, callback_kwargs: dict) -> dict:
            steps_done[0] = step_index + 1
            elapsed = time.monotonic() - started
            per_step = elapsed / steps_done[0]
            context.emit_progress(
                round(100 * steps_done[0] / steps, 1),
                {"step": steps_done[0], "steps": steps, "elapsed_s": round(elapsed, 3),
                 "eta_s": round(per_step * (steps - steps_done[0]), 3)},
            )
            if context.should_stop():
                raise StopRequested()
            return callback_kwargs

        generator = torch.Generator().manual_seed(int(params["seed"])) if params.get("seed") is not None else None
        try:
            output = self.pipeline()(
                prompt=params["prompt"],
                negative_prompt=params.get("negative_prompt") or None,
                num_frames=int(params["frames"]),
                height=int(params["height"]),
                width=int(params["width"]),
                num_inference_steps=steps,
                guidance_scale=1.0,
                generator=generator,
                output_type="np",
                callback_on_step_end=on_step_end,
                max_sequence_length=MAX_PROMPT_TOKENS,
            )
        except StopRequested:
            return RunResult(actual_mcu=self._cost(params, steps_done[0]), stopped=True,
                             usage={"steps": steps_done[0], "frames": 0})
        frames = output.frames[0]
        video_path, thumbnail_path = self._store(context.job_id, frames)
        return RunResult(
            actual_mcu=self._cost(params, steps),
            result={"video": video_path, "thumbnail": thumbnail_path, "frames": int(frames.shape[0]),
                    "width": int(frames.shape[2]), "height": int(frames.shape[1]),
                    "fps": self.spec.video.fps},
            usage={"steps": steps, "frames": int(frames.shape[0]),
                   "seconds": round(time.monotonic() - started, 3)},
        )

    def _cost(self, params: dict, steps_run: int) -> int:
        if steps_run == 0:
            return 0
        return video_cost(spec=self.spec, width=int(params["width"]), height=int(params["height"]),
                          frames=int(params["frames"]), steps=steps_run).mcu

    def _store(self, job_id: str, frames: np.ndarray) -> tuple[str, str]:
        """Outputs are keyed by job id, so a redelivered job overwrites, never duplicates."""
        from PIL import Image

        from inference.tinymodels.video_model import write_mp4

        with tempfile.TemporaryDirectory() as scratch:
            local = Path(scratch) / f"{job_id}.mp4"
            write_mp4(frames, local, fps=self.spec.video.fps)
            video_path = _save(f"videos/{job_id}.mp4", local.read_bytes())
        middle = (np.clip(frames[len(frames) // 2], 0, 1) * 255).round().astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(middle).save(buffer, format="JPEG", quality=85)
        thumbnail_path = _save(f"videos/{job_id}.jpg", buffer.getvalue())
        return video_path, thumbnail_path


def _save(name: str, content: bytes) -> str:
    if default_storage.exists(name):
        default_storage.delete(name)
    return default_storage.save(name, ContentFile(content))

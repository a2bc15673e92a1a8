"""Video engine: a diffusers text-to-video pipeline, loaded once per worker process.

One job at a time per GPU (the video-hbm pool has one slot per worker). Each denoising
step reports progress and checks for a cancel; a cancelled job stops within one step and
is charged for the steps it ran. Every SLUICE_VIDEO_PREVIEW_EVERY steps a small JPEG,
projected linearly from the latents (no VAE decode), goes out as a job.preview event.
Memory settings (dtype, VAE tiling/slicing) come from the model's VideoSpec.
Output: H.264 mp4 + JPEG thumbnail through Django's storage, under names of the job's attempt.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage

from inference.engines.base import RunContext, RunResult, StopRequested
from inference.media import video_output_names
from inference.registry import ModelSpec, VideoSpec
from portal.metrics import video_generation_observe
from quotas.cost import video_run_cost_mcu

logger = logging.getLogger(__name__)

MAX_PROMPT_TOKENS = 128
PREVIEW_JPEG_QUALITY = 70


def runtime_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pipeline_memory_configure(pipeline, *, video: VideoSpec, width: int, height: int) -> None:
    """Tile the VAE decode for large frames (bounded activation memory), decode batches one
    video at a time. Guarded: not every VAE class offers both switches."""
    vae = pipeline.vae
    if video.vae_tiling_for(width=width, height=height):
        if hasattr(vae, "enable_tiling"):
            vae.enable_tiling()
    elif hasattr(vae, "disable_tiling"):
        vae.disable_tiling()  # small clips decode faster, and seamlessly, in one piece
    if video.vae_slicing and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()


def latent_preview_jpeg(latents: torch.Tensor, *, video: VideoSpec, width: int, height: int) -> dict:
    """The middle latent frame as a small JPEG: channels -> RGB by the model's fixed linear
    map, upsampled to at most `preview_max_side` px. Costs a 16x3 matmul, not a VAE decode."""
    from PIL import Image

    frame_index = latents.shape[2] // 2
    channels = latents[0, :, frame_index].detach().float().cpu()  # (C, h, w)
    if video.preview_rgb_factors is not None:
        factors = torch.tensor(video.preview_rgb_factors, dtype=torch.float32)
        rgb = torch.einsum("chw,cr->hwr", channels, factors) + torch.tensor(video.preview_rgb_bias)
    else:
        rgb = channels[:3].permute(1, 2, 0)
    pixels = ((rgb.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).numpy()
    longest = min(video.preview_max_side, max(width, height))
    scale = longest / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=PREVIEW_JPEG_QUALITY)
    return {"frame": frame_index * video.frame_step, "width": size[0], "height": size[1],
            "content_type": "image/jpeg", "image_base64": base64.b64encode(buffer.getvalue()).decode()}


class DiffusersVideoEngine:
    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self._pipeline = None
        self._lock = threading.Lock()

    def pipeline(self):
        with self._lock:
            if self._pipeline is None:
                from inference.tinymodels.video_model import load_video_pipeline

                device = runtime_device()
                dtype = getattr(torch, self.spec.video.dtype_name(device.type))
                self._pipeline = load_video_pipeline(
                    Path(self.spec.variant("full").checkpoint), dtype=dtype
                ).to(device)
            return self._pipeline

    def run(self, context: RunContext) -> RunResult:
        context.started()
        params = context.params
        steps = int(params["steps"])
        width, height = int(params["width"]), int(params["height"])
        preview_every = settings.SLUICE_VIDEO_PREVIEW_EVERY
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
            if preview_every and steps_done[0] % preview_every == 0:
                self._preview(context, callback_kwargs["latents"], step=steps_done[0], steps=steps,
                              width=width, height=height)
            if context.should_stop():
                raise StopRequested()
            return callback_kwargs

        # A CPU generator: one seed gives the same noise, hence the same video, on any device.
        generator = torch.Generator().manual_seed(int(params["seed"])) if params.get("seed") is not None else None
        pipeline = self.pipeline()
        pipeline_memory_configure(pipeline, video=self.spec.video, width=width, height=height)
        try:
            output = pipeline(
                prompt=params["prompt"],
                negative_prompt=params.get("negative_prompt") or None,
                num_frames=int(params["frames"]),
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=1.0,
                generator=generator,
                output_type="np",
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=["latents"],
                max_sequence_length=MAX_PROMPT_TOKENS,
            )
        except StopRequested:
            video_generation_observe(model=self.spec.id, steps=steps_done[0],
                                     seconds=time.monotonic() - started)
            return RunResult(
                actual_mcu=video_run_cost_mcu(spec=self.spec, params=params, steps_run=steps_done[0]),
                stopped=True, usage={"steps": steps_done[0], "frames": 0})
        video_generation_observe(model=self.spec.id, steps=steps, seconds=time.monotonic() - started)
        frames = output.frames[0]
        video_path, thumbnail_path = self._store(context.job_id, context.attempt, frames)
        return RunResult(
            actual_mcu=video_run_cost_mcu(spec=self.spec, params=params, steps_run=steps),
            result={"video": video_path, "thumbnail": thumbnail_path, "frames": int(frames.shape[0]),
                    "width": int(frames.shape[2]), "height": int(frames.shape[1]),
                    "fps": self.spec.video.fps},
            usage={"steps": steps, "frames": int(frames.shape[0]),
                   "seconds": round(time.monotonic() - started, 3)},
        )

    def _preview(self, context: RunContext, latents: torch.Tensor, *, step: int, steps: int,
                 width: int, height: int) -> None:
        try:
            preview = latent_preview_jpeg(latents, video=self.spec.video, width=width, height=height)
        except Exception:  # a preview is a courtesy: it must never fail the job
            logger.exception("preview of %s at step %s failed", context.job_id, step)
            return
        context.emit_preview({"step": step, "steps": steps, **preview})

    def _store(self, job_id: str, attempt: int, frames: np.ndarray) -> tuple[str, str]:
        """Each attempt writes names of its own, once (video_output_names): an attempt the
        reaper took for lost may run on and store after the attempt that replaced it published
        its video. A store that fails half-way removes what it wrote: the job fails, and no row
        would ever point at it."""
        from PIL import Image

        from inference.tinymodels.video_model import write_mp4

        names = video_output_names(job_id=job_id, attempt=attempt)
        saved: list[str] = []
        try:
            with tempfile.TemporaryDirectory() as scratch:
                local = Path(scratch) / f"{job_id}.mp4"
                write_mp4(frames, local, fps=self.spec.video.fps)
                # save() never replaces a file: a name taken already gets a free one instead.
                saved.append(default_storage.save(names["video"], ContentFile(local.read_bytes())))
            middle = (np.clip(frames[len(frames) // 2], 0, 1) * 255).round().astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(middle).save(buffer, format="JPEG", quality=85)
            saved.append(default_storage.save(names["thumbnail"], ContentFile(buffer.getvalue())))
        except BaseException:
            with contextlib.suppress(OSError):
                for name in saved:
                    default_storage.delete(name)
            raise
        video_path, thumbnail_path = saved
        return video_path, thumbnail_path

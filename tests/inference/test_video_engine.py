"""The diffusers video engine in-process, on the tiny real pipeline: previews, memory settings."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from inference.engines import engine_for
from inference.engines.base import RunContext
from inference.engines.diffusers import (
    latent_preview_jpeg,
    pipeline_memory_configure,
    runtime_device,
)
from inference.registry import model_get
from inference.tinymodels.video_model import load_video_pipeline


@pytest.fixture
def video_spec():
    return model_get("sluice-video-tiny")


def decode_preview(preview: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(preview["image_base64"])))


@pytest.mark.parametrize(("width", "height", "latent_frames", "expected"), [
    (64, 64, 2, (64, 64)),  # never larger than the video itself
    (1280, 720, 9, (128, 72)),
    (720, 1280, 9, (72, 128)),
])
def test_latent_preview_is_a_small_jpeg_in_the_videos_aspect(video_spec, width, height, latent_frames,
                                                             expected):
    latents = torch.randn(1, 16, latent_frames, height // 8, width // 8)
    preview = latent_preview_jpeg(latents, video=video_spec.video, width=width, height=height)
    image = decode_preview(preview)
    assert image.format == "JPEG" and image.size == expected == (preview["width"], preview["height"])
    assert len(preview["image_base64"]) < 8_000  # an event of a few KB, even for 720p
    assert preview["frame"] == (latent_frames // 2) * 4


def test_memory_settings_follow_the_registry(video_spec, settings):
    pipeline = engine_for(video_spec).pipeline()
    assert runtime_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    expected_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    assert pipeline.transformer.dtype == expected_dtype
    pipeline_memory_configure(pipeline, video=video_spec.video, width=1280, height=720)
    assert pipeline.vae.use_tiling and pipeline.vae.use_slicing
    pipeline_memory_configure(pipeline, video=video_spec.video, width=64, height=64)
    assert not pipeline.vae.use_tiling
    assert video_spec.video.dtype_name("cuda") == "bfloat16"
    assert video_spec.video.dtype_name("cpu") == "float32"


def test_bf16_load_keeps_the_fp32_modules_wan_needs(video_spec):
    pipeline = load_video_pipeline(video_spec.variant("full").checkpoint, dtype=torch.bfloat16)
    transformer = pipeline.transformer
    keep = set(transformer._keep_in_fp32_modules)
    dtypes = {name: param.dtype for name, param in transformer.named_parameters()}
    kept = [name for name in dtypes if keep & set(name.split("."))]
    assert kept and all(dtypes[name] == torch.float32 for name in kept)
    assert all(dtype == torch.bfloat16 for name, dtype in dtypes.items() if name not in kept)


def test_engine_publishes_a_preview_every_k_steps(video_spec, settings, tmp_path):
    settings.SLUICE_VIDEO_PREVIEW_EVERY = 2
    settings.MEDIA_ROOT = tmp_path
    progress, previews = [], []
    context = RunContext(
        job_id="job_preview_test",
        params={"prompt": "a red square", "width": 64, "height": 64, "frames": 5, "steps": 5,
                "seed": 3},
        variant="full",
        emit_progress=lambda pct, data: progress.append(data["step"]),
        emit_output=lambda data: None,
        should_stop=lambda: False,
        emit_preview=previews.append,
    )
    result = engine_for(video_spec).run(context)
    assert not result.stopped and progress == [1, 2, 3, 4, 5]
    assert [p["step"] for p in previews] == [2, 4]
    assert all(decode_preview(p).size == (64, 64) for p in previews)

    settings.SLUICE_VIDEO_PREVIEW_EVERY = 0  # disabled
    previews.clear()
    engine_for(video_spec).run(context)
    assert previews == []


def test_each_attempt_stores_under_names_of_its_own_and_replaces_no_file(video_spec, settings,
                                                                         tmp_path):
    """A job's first attempt, taken for lost while it ran on, may store its video after the
    second attempt published its own: the published files keep their bytes (they were deleted
    and written again under the job's one name, with the late attempt's bytes in the end)."""
    settings.MEDIA_ROOT = tmp_path

    def store(attempt: int, seed: int) -> dict:
        context = RunContext(
            job_id="job_attempts_test", attempt=attempt,
            params={"prompt": "a red square", "width": 64, "height": 64, "frames": 5, "steps": 2,
                    "seed": seed},
            variant="full", emit_progress=lambda pct, data: None, emit_output=lambda data: None,
            should_stop=lambda: False,
        )
        result = engine_for(video_spec).run(context).result
        return {result["video"]: (tmp_path / result["video"]).read_bytes(),
                result["thumbnail"]: (tmp_path / result["thumbnail"]).read_bytes()}

    published = store(attempt=2, seed=3)
    assert sorted(published) == ["videos/job_attempts_test-2.jpg", "videos/job_attempts_test-2.mp4"]
    late = store(attempt=1, seed=4)
    assert sorted(late) == ["videos/job_attempts_test-1.jpg", "videos/job_attempts_test-1.mp4"]
    again = store(attempt=2, seed=5)  # a name taken already: another one, never the same file
    assert set(again).isdisjoint(published)
    assert {name: (tmp_path / name).read_bytes() for name in published} == published

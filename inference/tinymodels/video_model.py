"""The tiny text-to-video model: a real diffusers WanPipeline with toy sizes.

Every component is the class a production Wan checkpoint uses (WanTransformer3DModel,
AutoencoderKLWan, a UMT5 text encoder, the flow-matching Euler scheduler), so the
platform's diffusers engine runs the same code path here as on a GPU node. The weights
are random: the video is noise-shaped, but its frames, steps and callbacks are real.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from safetensors.torch import load_file
from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

TEXT_EMBEDDING_DIM = 64
# ByT5 ids: 3 specials + 256 bytes + 125 sentinel ids; the text encoder must cover them all.
BYT5_VOCAB_SIZE = 384
# Short prompts are the norm here; Wan's default of 512 text tokens would be mostly padding.
MAX_PROMPT_TOKENS = 128


def build_text_encoder() -> UMT5EncoderModel:
    config = UMT5Config(
        vocab_size=BYT5_VOCAB_SIZE,
        d_model=TEXT_EMBEDDING_DIM,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    return UMT5EncoderModel(config)


def build_transformer() -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=TEXT_EMBEDDING_DIM,
        freq_dim=64,
        ffn_dim=128,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,
    )


def build_vae() -> AutoencoderKLWan:
    # Four levels keep Wan's 8x spatial / 4x temporal compression, which the pipeline
    # derives from this config; only the channel widths are tiny.
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )


def build_video_pipeline(seed: int) -> WanPipeline:
    torch.manual_seed(seed)
    return WanPipeline(
        tokenizer=ByT5Tokenizer(),  # byte-level: needs no vocabulary file
        text_encoder=build_text_encoder(),
        vae=build_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        transformer=build_transformer(),
    )


def load_video_pipeline(path: Path) -> WanPipeline:
    path = Path(path)
    components = {}
    if importlib.util.find_spec("accelerate") is None:
        components["transformer"] = _load_transformer_without_accelerate(path / "transformer")
    pipeline = WanPipeline.from_pretrained(path, local_files_only=True, **components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _load_transformer_without_accelerate(folder: Path) -> WanTransformer3DModel:
    """diffusers only loads a model with `_keep_in_fp32_modules` (Wan's transformer has
    them) through accelerate's low-memory path, and raises "`low_cpu_mem_usage` cannot be
    False when `keep_in_fp32_modules` is True" without it. The checkpoint is float32
    throughout, so building from the config and loading the state dict is equivalent."""
    transformer = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(folder))
    state_dict = load_file(folder / "diffusion_pytorch_model.safetensors")
    transformer.load_state_dict(state_dict, strict=True)
    return transformer.eval()


StepCallback = Callable[[int, int], None]


def generate_frames(
    pipeline: WanPipeline,
    prompt: str,
    *,
    num_frames: int = 17,
    height: int = 64,
    width: int = 64,
    num_inference_steps: int = 4,
    guidance_scale: float = 1.0,
    seed: int = 0,
    on_step: StepCallback | None = None,
) -> np.ndarray:
    """Frames as a float array (frames, height, width, 3) in [0, 1].

    `on_step(step_index, num_inference_steps)` runs after every denoising step: the
    platform publishes progress events from it.
    """

    def step_end(_pipeline, step_index: int, _timestep, callback_kwargs: dict) -> dict:
        if on_step is not None:
            on_step(step_index, num_inference_steps)
        return callback_kwargs

    output = pipeline(
        prompt=prompt,
        num_frames=num_frames,
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        callback_on_step_end=step_end,
        max_sequence_length=MAX_PROMPT_TOKENS,
    )
    return output.frames[0]


def write_mp4(frames: np.ndarray, path: Path, fps: int = 8) -> Path:
    """H.264 / yuv420p mp4 (what browsers play) via imageio-ffmpeg's bundled ffmpeg.

    Not diffusers' `export_to_video`: it needs the `imageio` package, which is not
    installed, and silently falls back to OpenCV's mp4v codec that browsers do not play.
    """
    frame_count, height, width, _channels = frames.shape
    pixels = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (width, height),
        fps=fps,
        codec="libx264",
        pix_fmt_out="yuv420p",
        macro_block_size=16,
        ffmpeg_log_level="error",
    )
    writer.send(None)  # the generator must be primed before it accepts frames
    for index in range(frame_count):
        writer.send(np.ascontiguousarray(pixels[index]))
    writer.close()
    return path


def timed_load(path: Path) -> tuple[WanPipeline, float]:
    started = time.monotonic()
    pipeline = load_video_pipeline(path)
    return pipeline, time.monotonic() - started

"""Build sluice-video-tiny: save the pipeline, reload it, time a generation, write a card.

python -m inference.tinymodels.build_video --out inference/artifacts/sluice-video-tiny
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import imageio_ffmpeg
import torch

from inference.tinymodels import video_model


def parameter_counts(pipeline) -> dict[str, int]:
    return {
        name: sum(p.numel() for p in component.parameters())
        for name, component in (
            ("transformer", pipeline.transformer),
            ("vae", pipeline.vae),
            ("text_encoder", pipeline.text_encoder),
        )
    }


def probe_mp4_frames(path: Path) -> int:
    """Decode the file with ffmpeg and count its frames: proof the mp4 plays."""
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "null", "-"]
    subprocess.run(command, check=True, capture_output=True)
    frame_count, _seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    return frame_count


def measure(out: Path, seed: int) -> dict:
    pipeline, load_seconds = video_model.timed_load(out)
    step_times: list[float] = []
    last_step_end = time.monotonic()

    def on_step(step_index: int, total_steps: int) -> None:
        nonlocal last_step_end
        now = time.monotonic()
        step_times.append(now - last_step_end)
        last_step_end = now

    started = time.monotonic()
    last_step_end = started
    frames = video_model.generate_frames(
        pipeline,
        "a red square moving left",
        num_frames=17,
        height=64,
        width=64,
        num_inference_steps=4,
        seed=seed,
        on_step=on_step,
    )
    generate_seconds = time.monotonic() - started
    with tempfile.TemporaryDirectory() as scratch:
        mp4_path = video_model.write_mp4(frames, Path(scratch) / "sample.mp4")
        mp4_bytes = mp4_path.stat().st_size
        decoded_frames = probe_mp4_frames(mp4_path)
    return {
        "parameters": parameter_counts(pipeline),
        "load_seconds": round(load_seconds, 3),
        "request": {"num_frames": 17, "height": 64, "width": 64, "num_inference_steps": 4},
        "frames_shape": list(frames.shape),
        "callback_steps": len(step_times),
        # The first step also carries prompt encoding; the last, nothing extra (the VAE
        # decode comes after the loop), so the median is the honest per-step figure.
        "step_seconds": [round(s, 3) for s in step_times],
        "generate_seconds": round(generate_seconds, 3),
        "mp4_bytes": mp4_bytes,
        "mp4_decoded_frames": decoded_frames,
        "threads": torch.get_num_threads(),
    }


def train_on_synthetic_clips(
    pipeline, *, vae_steps: int, transformer_steps: int, accuracy_seeds: int, seed: int
) -> dict:
    from inference.tinymodels import video_training

    pipeline.set_progress_bar_config(disable=True)
    untrained = video_training.prompt_accuracy(
        pipeline, seeds=accuracy_seeds, num_inference_steps=10
    )
    vae = video_training.train_vae(pipeline, steps=vae_steps, batch_size=4, seed=seed)
    print(f"vae: {vae}", flush=True)
    transformer = video_training.train_transformer(
        pipeline, steps=transformer_steps, batch_size=8, seed=seed + 1
    )
    print(f"transformer: {transformer}", flush=True)
    trained = video_training.prompt_accuracy(pipeline, seeds=accuracy_seeds, num_inference_steps=10)
    return {
        "vae": vae,
        "transformer": transformer,
        "untrained": {k: v for k, v in untrained.items() if k != "results"},
        "trained": trained,
    }


def write_card(out: Path, report: dict) -> None:
    parameters = report["parameters"]
    steps = sorted(report["step_seconds"])
    median_step = steps[len(steps) // 2]
    text = f"""# sluice-video-tiny

A diffusers `WanPipeline` with toy sizes and random weights, built from configs (no
download): `WanTransformer3DModel` ({parameters["transformer"]:,} params, 2 layers, 4 heads x 16),
`AutoencoderKLWan` ({parameters["vae"]:,} params, base_dim 8, Wan's 8x spatial / 4x temporal
compression), `UMT5EncoderModel` ({parameters["text_encoder"]:,} params, d_model 64) with a
`ByT5Tokenizer` (byte-level, no vocabulary file), `FlowMatchEulerDiscreteScheduler(shift=5)`.
It exists so the platform's real diffusers engine has a real pipeline to run offline: its
videos are structured noise, not pictures of the prompt.

Constraints of the Wan pipeline: `num_frames` = 4k+1, height and width multiples of 16.

## Measured at build time (`build_report.json`, {report["threads"]} CPU threads)
- `WanPipeline.from_pretrained(folder)`: {report["load_seconds"]} s
- 17 frames at 64x64, 4 steps: {report["generate_seconds"]} s in all, median step
  {median_step} s; `callback_on_step_end` fired {report["callback_steps"]} times
- `write_mp4` (imageio-ffmpeg, libx264 yuv420p) mp4: {report["mp4_bytes"]} bytes, ffmpeg
  decodes {report["mp4_decoded_frames"]} frames

## Use
```python
from inference.tinymodels.video_model import load_video_pipeline, generate_frames, write_mp4
pipeline = load_video_pipeline(folder)
frames = generate_frames(pipeline, "a red square moving left", num_frames=17, height=64,
                         width=64, num_inference_steps=4, on_step=lambda i, n: ...)
write_mp4(frames, "out.mp4")
```
`generate_frames` passes `max_sequence_length=128` (Wan's default is 512 text tokens).
"""
    (out / "MODEL_CARD.md").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--train-vae-steps",
        type=int,
        default=0,
        help="train on synthetic moving-square clips so the prompt controls the video",
    )
    parser.add_argument("--train-transformer-steps", type=int, default=0)
    parser.add_argument("--accuracy-seeds", type=int, default=2)
    parser.add_argument(
        "--skip-report", action="store_true", help="save only; no timing run, card or report"
    )
    arguments = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(arguments.threads)
    out: Path = arguments.out
    pipeline = video_model.build_video_pipeline(seed=arguments.seed)
    training: dict = {}
    if arguments.train_vae_steps or arguments.train_transformer_steps:
        training = train_on_synthetic_clips(
            pipeline,
            vae_steps=arguments.train_vae_steps,
            transformer_steps=arguments.train_transformer_steps,
            accuracy_seeds=arguments.accuracy_seeds,
            seed=arguments.seed,
        )
    pipeline.save_pretrained(out, safe_serialization=True)
    if not arguments.skip_report:
        report = measure(out, arguments.seed)
        report["synthetic_training"] = training
        (out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
        write_card(out, report)
        print(json.dumps(report, indent=2))
    return out


if __name__ == "__main__":
    main()

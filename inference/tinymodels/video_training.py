"""Teach the tiny WanPipeline one toy world: a coloured square moving in a direction.

Random weights make noise; a few minutes of training on synthetic clips make the prompt
visibly control the video, which is what a platform demo needs ("a red square moving
left" gives a red square moving left). Two stages, both on the same synthetic clips:
1. the VAE learns to reconstruct the clips (then the latent statistics go in its config,
   where the pipeline reads them to un-normalise latents);
2. the transformer learns flow matching on the normalised latents, conditioned on the
   frozen, random UMT5 encoding of the prompt (bytes differ, so the encodings differ).
Accuracy: generate each prompt, find the square by its bright pixels, and check its
colour and the direction its centre moved between the first and last frame.

Synthetic data only: `random` here is for sampling clips, never for anything secret.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import WanPipeline

from inference.tinymodels.video_model import MAX_PROMPT_TOKENS, generate_frames

COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
CLIP_FRAMES = 9
CLIP_SIZE = 32
SQUARE_SIZE = 10
PIXELS_PER_FRAME = 1.5


@dataclass(frozen=True)
class ClipLabel:
    colour: str
    direction: str

    @property
    def prompt(self) -> str:
        return f"a {self.colour} square moving {self.direction}"


ALL_LABELS = [ClipLabel(c, d) for c in COLOURS for d in DIRECTIONS]


def synthetic_clip(label: ClipLabel, rng: random.Random) -> torch.Tensor:
    """(3, frames, size, size) in [-1, 1]: black background, one moving square."""
    clip = -torch.ones(3, CLIP_FRAMES, CLIP_SIZE, CLIP_SIZE)
    travel = PIXELS_PER_FRAME * (CLIP_FRAMES - 1)
    row_step, column_step = DIRECTIONS[label.direction]
    # Start where the whole path stays inside the frame.
    low, high = 0.0, CLIP_SIZE - SQUARE_SIZE - travel
    start_row = (
        rng.uniform(low, high) if row_step >= 0 else rng.uniform(travel, CLIP_SIZE - SQUARE_SIZE)
    )
    start_column = (
        rng.uniform(low, high) if column_step >= 0 else rng.uniform(travel, CLIP_SIZE - SQUARE_SIZE)
    )
    if row_step == 0:
        start_row = rng.uniform(0, CLIP_SIZE - SQUARE_SIZE)
    if column_step == 0:
        start_column = rng.uniform(0, CLIP_SIZE - SQUARE_SIZE)
    colour = torch.tensor(COLOURS[label.colour]).view(3, 1, 1)
    for frame in range(CLIP_FRAMES):
        row = round(start_row + row_step * PIXELS_PER_FRAME * frame)
        column = round(start_column + column_step * PIXELS_PER_FRAME * frame)
        clip[:, frame, row : row + SQUARE_SIZE, column : column + SQUARE_SIZE] = colour
    return clip


def clip_batch(batch_size: int, rng: random.Random) -> tuple[torch.Tensor, list[ClipLabel]]:
    labels = [rng.choice(ALL_LABELS) for _ in range(batch_size)]
    return torch.stack([synthetic_clip(label, rng) for label in labels]), labels


def train_vae(pipeline: WanPipeline, steps: int, batch_size: int, seed: int) -> dict:
    vae = pipeline.vae
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    rng = random.Random(seed)  # noqa: S311
    started = time.monotonic()
    loss_value = float("nan")
    for _step in range(steps):
        clips, _labels = clip_batch(batch_size, rng)
        posterior = vae.encode(clips).latent_dist
        reconstruction = vae.decode(posterior.mode()).sample
        # A small KL keeps the latents bounded so the normalisation stats are meaningful.
        loss = torch.nn.functional.mse_loss(reconstruction, clips) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
    vae.eval()
    with torch.no_grad():
        clips, _labels = clip_batch(64, random.Random(seed + 1))  # noqa: S311
        latents = vae.encode(clips).latent_dist.mode()
        mean = latents.mean(dim=(0, 2, 3, 4))
        std = latents.std(dim=(0, 2, 3, 4)).clamp(min=1e-3)
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    return {
        "steps": steps,
        "final_loss": round(loss_value, 5),
        "seconds": round(time.monotonic() - started, 1),
    }


def normalised_latents(pipeline: WanPipeline, clips: torch.Tensor) -> torch.Tensor:
    config = pipeline.vae.config
    mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        latents = pipeline.vae.encode(clips).latent_dist.mode()
    return (latents - mean) / std


def train_transformer(
    pipeline: WanPipeline, steps: int, batch_size: int, seed: int, clips_per_label: int = 64
) -> dict:
    with torch.no_grad():
        prompt_embeddings = torch.stack(
            [
                pipeline.encode_prompt(
                    label.prompt,
                    do_classifier_free_guidance=False,
                    max_sequence_length=MAX_PROMPT_TOKENS,
                )[0][0]
                for label in ALL_LABELS
            ]
        )
    # Encode a fixed pool of clips once: the VAE is frozen now, and encoding every batch
    # anew would cost more CPU than the transformer's own training.
    rng = random.Random(seed)  # noqa: S311
    pool_labels = [index for index in range(len(ALL_LABELS)) for _ in range(clips_per_label)]
    pool_latents = torch.cat(
        [
            normalised_latents(
                pipeline,
                torch.stack(
                    [synthetic_clip(ALL_LABELS[i], rng) for i in pool_labels[start : start + 32]]
                ),
            )
            for start in range(0, len(pool_labels), 32)
        ]
    )
    pool_label_tensor = torch.tensor(pool_labels)
    transformer = pipeline.transformer
    transformer.train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    shift = pipeline.scheduler.config.shift
    started = time.monotonic()
    loss_value = float("nan")
    for _step in range(steps):
        picks = torch.randint(0, len(pool_labels), (batch_size,), generator=generator)
        clean = pool_latents[picks]
        noise = torch.randn(clean.shape, generator=generator)
        # The same shifted sigma distribution the scheduler samples at inference.
        uniform = torch.rand(batch_size, generator=generator)
        sigma = shift * uniform / (1 + (shift - 1) * uniform)
        sigma_view = sigma.view(-1, 1, 1, 1, 1)
        noisy = (1 - sigma_view) * clean + sigma_view * noise
        prediction = transformer(
            hidden_states=noisy,
            timestep=sigma * 1000,
            encoder_hidden_states=prompt_embeddings[pool_label_tensor[picks]],
            return_dict=False,
        )[0]
        # Flow matching: the Euler scheduler moves along d(latent)/d(sigma) = noise - clean.
        loss = torch.nn.functional.mse_loss(prediction, noise - clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        loss_value = loss.item()
    transformer.eval()
    return {
        "steps": steps,
        "pool_clips": len(pool_labels),
        "final_loss": round(loss_value, 5),
        "seconds": round(time.monotonic() - started, 1),
    }


def read_square(frames: np.ndarray) -> tuple[str, str] | None:
    """(colour, direction) of the bright blob in frames (F, H, W, 3) in [0, 1], or None."""
    brightness = frames.max(axis=-1)
    centres = []
    colour_sums = np.zeros(3)
    for frame, frame_brightness in zip(frames, brightness, strict=True):
        mask = frame_brightness > 0.5
        if mask.sum() < 4:
            return None
        rows, columns = np.nonzero(mask)
        centres.append((rows.mean(), columns.mean()))
        colour_sums += frame[mask].sum(axis=0)
    colour = list(COLOURS)[int(np.argmax(colour_sums))]
    row_move = centres[-1][0] - centres[0][0]
    column_move = centres[-1][1] - centres[0][1]
    if abs(column_move) >= abs(row_move):
        direction = "right" if column_move > 0 else "left"
    else:
        direction = "down" if row_move > 0 else "up"
    return colour, direction


def prompt_accuracy(pipeline: WanPipeline, seeds: int, num_inference_steps: int) -> dict:
    results = []
    for label in ALL_LABELS:
        for seed in range(seeds):
            frames = generate_frames(
                pipeline,
                label.prompt,
                num_frames=CLIP_FRAMES,
                height=CLIP_SIZE,
                width=CLIP_SIZE,
                num_inference_steps=num_inference_steps,
                seed=seed,
            )
            read = read_square(frames)
            results.append(
                {
                    "prompt": label.prompt,
                    "seed": seed,
                    "read": list(read) if read else None,
                    "colour_ok": bool(read) and read[0] == label.colour,
                    "direction_ok": bool(read) and read[1] == label.direction,
                }
            )
    total = len(results)
    return {
        "videos": total,
        "num_inference_steps": num_inference_steps,
        "colour_accuracy": sum(r["colour_ok"] for r in results) / total,
        "direction_accuracy": sum(r["direction_ok"] for r in results) / total,
        "both_accuracy": sum(r["colour_ok"] and r["direction_ok"] for r in results) / total,
        "chance_both": 1 / len(ALL_LABELS),
        "results": results,
    }

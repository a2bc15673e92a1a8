"""The cost model, table-driven (the same table is in README)."""

import pytest

from inference.registry import model_get
from quotas.cost import text_cost, video_cost

CODE = model_get("sluice-code-tiny")
VIDEO = model_get("sluice-video-tiny")


@pytest.mark.parametrize(
    ("variant", "prompt", "completion", "expected_mcu"),
    [
        ("full", 1000, 0, 1000),  # 1 CU per 1,000 tokens
        ("full", 12, 20, 32),  # a short completion costs 0.032 CU
        ("full", 500, 1500, 2000),
        ("quantized", 1000, 1000, 1000),  # free tier's variant: half price
        ("quantized", 1, 0, 1),  # never rounds a charge down to zero
    ],
)
def test_text_cost(variant, prompt, completion, expected_mcu):
    estimate = text_cost(spec=CODE, variant=CODE.variant(variant), prompt_tokens=prompt,
                         completion_tokens=completion)
    assert estimate.mcu == expected_mcu
    assert estimate.breakdown["prompt_tokens"] == prompt
    assert estimate.breakdown["variant"] == variant


@pytest.mark.parametrize(
    ("size", "seconds", "steps", "expected_cu"),
    [
        ((1280, 720), 60, 20, 500.0),  # DESIGN: 500 CU per minute of 720p at reference steps
        ((1280, 720), 6, 20, 50.0),  # linear in frames
        ((1280, 720), 6, 40, 100.0),  # linear in steps
        ((720, 1280), 6, 20, 50.0),  # portrait costs the same pixels
        ((256, 256), 2, 20, 500 * (2 / 60) * (256 * 256) / (1280 * 720)),
        ((64, 64), 2, 10, 500 * (2 / 60) * (64 * 64) / (1280 * 720) / 2),
    ],
)
def test_video_cost(size, seconds, steps, expected_cu):
    frames = seconds * VIDEO.video.fps
    estimate = video_cost(spec=VIDEO, width=size[0], height=size[1], frames=frames, steps=steps)
    assert estimate.mcu == pytest.approx(expected_cu * 1000, abs=1)
    assert estimate.breakdown["frames"] == frames

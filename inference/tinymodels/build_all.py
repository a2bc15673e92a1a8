"""Rebuild every tiny model artifact into inference/artifacts/ (about 25 minutes on 2 cores).

    python -m inference.tinymodels.build_all [--artifacts DIR] [--minutes N]

The code model trains first (nearly all of the time), then its int8 copy is derived from
it, then the video pipeline is built. Each step is also its own command; see
inference/artifacts/README.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from inference.tinymodels import build_video, quantize_code, train_code

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--artifacts", type=Path, default=ARTIFACTS)
    parser.add_argument("--minutes", type=float, default=24.0)
    parser.add_argument("--max-steps", type=int, default=1600)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args(argv)
    code_folder = arguments.artifacts / "sluice-code-tiny"
    train_code.main(
        [
            "--out",
            str(code_folder),
            "--minutes",
            str(arguments.minutes),
            "--max-steps",
            str(arguments.max_steps),
            "--seed",
            str(arguments.seed),
        ]
    )
    quantize_code.main(
        ["--src", str(code_folder), "--out", str(arguments.artifacts / "sluice-code-tiny-int8")]
    )
    build_video.main(
        ["--out", str(arguments.artifacts / "sluice-video-tiny"), "--seed", str(arguments.seed)]
    )


if __name__ == "__main__":
    main()

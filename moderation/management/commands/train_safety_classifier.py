"""Rebuild the committed safety head and thresholds from the dataset (train + dev only)."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

from moderation.classifier import HEAD_SEED, classifier_train

DEFAULT_DATA = settings.BASE_DIR.parent / "shared" / "data" / "safety"


class Command(BaseCommand):
    help = "Train the safety classifier head on train.jsonl, pick thresholds on dev.jsonl."

    def add_arguments(self, parser):
        parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
        parser.add_argument("--out", type=Path, default=settings.SLUICE_SAFETY_ARTIFACT_DIR)
        parser.add_argument("--seed", type=int, default=0, help="draws the augmented rows")
        parser.add_argument("--head-seed", type=int, default=HEAD_SEED,
                            help="the head's initial weights")

    def handle(self, *args, data: Path, out: Path, seed: int, head_seed: int, **options):
        classifier_train(
            train_path=data / "train.jsonl",
            dev_path=data / "dev.jsonl",
            out_dir=out,
            seed=seed,
            head_seed=head_seed,
            log=lambda line: self.stdout.write(line),
        )

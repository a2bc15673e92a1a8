"""Dashboard fixtures: a queued video job of acme (the scheduler's message captured) and a
staff user who belongs to no tenant."""

from __future__ import annotations

import pytest

from portal.services import playground_video_submit
from tests.factories import UserFactory

VIDEO = {"model": "sluice-video-tiny", "prompt": "a red square", "size": "64x64",
         "seconds": "0.5", "num_inference_steps": "4"}


@pytest.fixture
def video_job(cast, sent_tasks):
    return playground_video_submit(actor=cast.member, payload=dict(VIDEO)).job


@pytest.fixture
def staff(db):
    return UserFactory(username="operator", is_staff=True)

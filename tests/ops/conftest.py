"""The operations tests drive the job services and webhook delivery like tests/inference does."""

from __future__ import annotations

import pytest

from tests.inference.conftest import (  # noqa: F401 - fixtures (sent_tasks is in tests/conftest)
    pools,
    receiver,
    webhook_settings,
)


def sample(name: str, **labels: str) -> float:
    """A sample of this process's default registry (tests run without a multiprocess dir)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


class Counted:
    """How much a sample moved since the fixture started: `moved("name", label=...)`."""

    def __init__(self) -> None:
        from prometheus_client import REGISTRY

        self._before = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in REGISTRY.collect() for s in family.samples
        }

    def __call__(self, name: str, **labels: str) -> float:
        before = self._before.get((name, tuple(sorted(labels.items()))), 0.0)
        return round(sample(name, **labels) - before, 6)


@pytest.fixture
def moved() -> Counted:
    return Counted()

import pytest


@pytest.fixture(autouse=True)
def pools(settings):
    settings.SLUICE_POOL_CAPACITY_CU = {"text-batch": 1_000_000, "video-hbm": 1_000_000}
    settings.SLUICE_POOL_SLOTS = {"text-batch": 32, "video-hbm": 1}


@pytest.fixture
def sent_tasks(monkeypatch):
    """The Celery messages jobs would send (job id, attempt, queue), captured instead of sent.
    Workers are exercised for real in test_worker.py; here the scheduler's decisions are."""
    from inference import tasks

    sent: list[tuple[str, int, str]] = []
    monkeypatch.setattr(
        tasks.run_job, "apply_async",
        lambda args, queue: sent.append((args[0], args[1], queue)),
    )
    return sent

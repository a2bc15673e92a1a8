import pytest


@pytest.fixture(autouse=True)
def roomy_pools(settings):
    """Pools big enough not to interfere unless a test narrows them."""
    settings.SLUICE_POOL_CAPACITY_CU = {"text-batch": 1_000_000, "video-hbm": 1_000_000}
    settings.SLUICE_POOL_LEASE_S = {"text-batch": 300, "video-hbm": 3600}
    settings.SLUICE_POOL_SLOTS = {"text-batch": 1_000_000, "video-hbm": 1_000_000}

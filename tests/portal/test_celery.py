"""What a worker does at start-up (portal/celery.py)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_starting_worker_loads_the_urlconf_before_it_forks():
    """Job events carry API URLs; loading the URLconf imports every API module (~5 s). The
    worker does it at worker_init, in the parent, so no prefork child pays it on a job."""
    probe = (
        "import sys, django; django.setup(); import portal.celery\n"
        "from celery.signals import worker_init\n"
        "before = 'portal.urls' in sys.modules or 'inference.tokenization' in sys.modules\n"
        "worker_init.send(sender=None)\n"
        "print(before, 'portal.urls' in sys.modules, 'inference.tokenization' in sys.modules)\n"
    )
    output = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                            env={**os.environ, "SLUICE_METRICS_PORT": "0"},  # no scrape server
                            text=True, timeout=120, check=True).stdout
    assert output.strip().splitlines()[-1] == "False True True"


def test_beat_does_not_log_every_task_it_sends():
    """Workers log through settings.LOGGING (Celery's --loglevel does not apply): beat's INFO
    "Sending due task scheduler-tick" came every 2 s, a line a second on make run's terminal
    with the other ticks, and scrolled the printed demo credentials away."""
    import logging

    assert not logging.getLogger("celery.beat").isEnabledFor(logging.INFO)
    assert logging.getLogger("celery.beat").isEnabledFor(logging.WARNING)

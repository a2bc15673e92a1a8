import sys

from django.conf import settings
from django.core.management.base import BaseCommand

from portal.env import env_int, env_str
from portal.launcher import run_platform


class Command(BaseCommand):
    help = "Run the whole platform on this machine (web, workers, Redis if needed); Ctrl-C stops it."
    # The system checks load the URLconf, and with it torch and transformers (the text API's
    # tokenizers): about 8 s before anything starts, in a process that only migrates, seeds and
    # supervises. The processes it starts import the whole project anyway, and the test suite
    # runs the checks (tests/portal/test_checks.py).
    requires_system_checks = []

    def add_arguments(self, parser):
        parser.add_argument("--host", default=env_str("SLUICE_HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=env_int("SLUICE_PORT", 8000, minimum=1))

    def handle(self, *args, host: str, port: int, **options):
        sys.exit(
            run_platform(
                host=host,
                port=port,
                var_dir=settings.VAR_DIR,
                queues=settings.SLUICE_WORKER_QUEUES,
                configured_redis_url=settings.REDIS_URL,
            )
        )

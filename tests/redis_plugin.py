"""Loaded with `-p tests.redis_plugin`, before Django reads its settings.

Tests talk to a real Redis: the configured REDIS_URL's server on database 15 (so a developer's
data on database 0 is untouched), or an embedded redis-server when none answers. The database
is a temporary SQLite file unless DATABASE_URL is set (CI sets PostgreSQL).
"""

from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from portal.embedded_redis import embedded_redis_start, redis_answers

TEST_REDIS_DB = 15


def _with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def _resolve_test_redis() -> str:
    explicit = os.environ.get("SLUICE_TEST_REDIS_URL")
    if explicit:
        return explicit
    configured = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if redis_answers(configured):
        return _with_db(configured, TEST_REDIS_DB)
    embedded = embedded_redis_start(data_dir=Path(tempfile.mkdtemp(prefix="sluice-test-redis-")))
    atexit.register(embedded.stop)
    return embedded.url


os.environ["REDIS_URL"] = _resolve_test_redis()
os.environ.pop("CELERY_BROKER_URL", None)
os.environ.setdefault("SLUICE_VAR_DIR", tempfile.mkdtemp(prefix="sluice-test-var-"))
os.environ.setdefault("SLUICE_SECRET_KEY", "test-secret-key-not-for-production")

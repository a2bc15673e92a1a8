"""The process-wide Redis client for hot counters, streams and health checks."""

from __future__ import annotations

import functools

import redis
from django.conf import settings


@functools.cache
def _client_for(url: str, socket_timeout: float | None) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout or 2.0,
        health_check_interval=30,
    )


def redis_client(*, socket_timeout: float | None = 5.0) -> redis.Redis:
    # Keyed by URL so tests that point REDIS_URL elsewhere get a fresh pool.
    return _client_for(settings.REDIS_URL, socket_timeout)

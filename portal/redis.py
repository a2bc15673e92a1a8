"""The process-wide Redis client for hot counters, streams and health checks."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import redis
from django.conf import settings
from redis.commands.core import Script


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


# --- Lua scripts ------------------------------------------------------------------------------
# Every hot-path counter and queue step is one Lua script kept as a file (`<app>/lua/*.lua`),
# registered once per client (EVALSHA, reloaded on NOSCRIPT).

REPO_DIR = Path(__file__).resolve().parent.parent
_registered: dict[tuple[int, str, str], Script] = {}


INCLUDE = re.compile(r"^--! include (\w+)/(\w+)$", re.MULTILINE)


@functools.cache
def lua_source(package: str, name: str) -> str:
    """The script's text, each `--! include <package>/<name>` line replaced by that file
    (a shared Lua function lives in one file; Redis 6 has no script libraries)."""
    source = (REPO_DIR / package / "lua" / f"{name}.lua").read_text()
    return INCLUDE.sub(lambda match: lua_source(match[1], match[2]), source)


def lua_script(client: redis.Redis, name: str, *, package: str = "quotas") -> Script:
    """The script `<package>/lua/<name>.lua`, registered on `client`."""
    key = (id(client), package, name)
    script = _registered.get(key)
    if script is None:
        script = _registered[key] = client.register_script(lua_source(package, name))
    return script

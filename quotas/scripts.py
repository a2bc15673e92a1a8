"""The Lua scripts in quotas/lua/, registered once per Redis client (EVALSHA, reloaded on NOSCRIPT)."""

from __future__ import annotations

import functools
from pathlib import Path

import redis
from redis.commands.core import Script

LUA_DIR = Path(__file__).resolve().parent / "lua"


@functools.cache
def lua_source(name: str) -> str:
    return (LUA_DIR / f"{name}.lua").read_text()


_registered: dict[tuple[int, str], Script] = {}


def lua_script(client: redis.Redis, name: str) -> Script:
    key = (id(client), name)
    script = _registered.get(key)
    if script is None:
        script = _registered[key] = client.register_script(lua_source(name))
    return script

"""Typed environment readers: the only place settings come from.

Every helper fails loudly (ImproperlyConfigured) on a value it cannot parse, so a typo in a
deployment's environment stops the process at start-up instead of surfacing as odd behaviour.
django-environ does the parsing; this module fixes the defaults and the error messages.
"""

from __future__ import annotations

import re

import environ
from django.core.exceptions import ImproperlyConfigured

_env = environ.Env()
# A URL's scheme as urllib reads it (RFC 3986: a letter, then letters, digits, + - .).
_URL_SCHEME = re.compile(r"([a-z][a-z0-9+.-]*)://", re.IGNORECASE)


def env_str(name: str, default: str) -> str:
    return _env.str(name, default=default)


def env_bool(name: str, default: bool) -> bool:
    raw = _env.str(name, default="")
    if raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean (use true/false)")


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = _env.str(name, default="")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from exc
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} is below its minimum {minimum}")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    raw = _env.str(name, default="")
    if raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a number") from exc
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} is below its minimum {minimum}")
    return value


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env_str(name, default).strip().lower()
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def env_cpus(name: str, default: str) -> str | frozenset[int]:
    """`auto`, `none`, or a Linux CPU list (`0`, `0-2,5`) read as a set of CPU numbers."""
    raw = (_env.str(name, default="") or default).strip().lower()
    if raw in {"auto", "none"}:
        return raw
    cpus: set[int] = set()
    try:
        for part in raw.split(","):
            first, dash, last = part.strip().partition("-")
            cpus.update(range(int(first), int(last if dash else first) + 1))
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}={raw!r} is not auto, none or a CPU list like 0-2,5") from exc
    if not cpus or min(cpus) < 0:
        raise ImproperlyConfigured(f"{name}={raw!r} names no CPU")
    return frozenset(cpus)


def env_list(name: str, default: list[str]) -> list[str]:
    raw = _env.str(name, default="")
    if raw == "":
        return list(default)
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_float_list(name: str, default: list[float], *, minimum: float | None = None) -> list[float]:
    """`5,300,1800` -> [5.0, 300.0, 1800.0]."""
    values = []
    for item in env_list(name, [str(value) for value in default]):
        try:
            value = float(item)
        except ValueError as exc:
            raise ImproperlyConfigured(f"{name}: {item!r} is not a number") from exc
        if minimum is not None and value < minimum:
            raise ImproperlyConfigured(f"{name}: {value} is below its minimum {minimum}")
        values.append(value)
    return values


def env_database(name: str, default: str) -> dict:
    url = _env.str(name, default=default)
    scheme = match[1].lower() if (match := _URL_SCHEME.match(url)) else ""
    # django-environ takes a scheme it does not know for a backend's module name (Django then
    # fails at start-up naming neither the variable nor the value), and warns with the parsed
    # URL, password included, when it finds no scheme at all. Neither message may carry the URL.
    if scheme not in environ.Env.DB_SCHEMES:
        found = f"the scheme {scheme}://" if scheme else "no valid scheme"
        raise ImproperlyConfigured(
            f"{name} has {found}, not a database's (postgres://user:password@host:5432/name, "
            "sqlite:////absolute/path)"
        )
    try:
        return _env.db_url_config(url)
    except Exception as exc:  # django-environ raises several types for a bad URL
        # Not its message, nor the chained traceback: urllib quotes the part it could not read,
        # the password when the host is missing ("Port could not be cast to integer value as
        # 's3cret'").
        raise ImproperlyConfigured(
            f"{name} is not a valid database URL ({exc.__class__.__name__}): check its host and "
            "port, and percent-encode special characters in its password"
        ) from None


def env_dict_int(name: str, default: dict[str, int]) -> dict[str, int]:
    """`a=1,b=2` -> {"a": 1, "b": 2}; entries given override the defaults."""
    raw = _env.str(name, default="")
    result = dict(default)
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ImproperlyConfigured(f"{name}: {item!r} is not key=integer")
        try:
            result[key.strip()] = int(value)
        except ValueError as exc:
            raise ImproperlyConfigured(f"{name}: {item!r} is not key=integer") from exc
    return result


def env_dict_str(name: str, default: dict[str, str]) -> dict[str, str]:
    """`a=x,b=y` -> {"a": "x", "b": "y"}; entries given override the defaults."""
    raw = _env.str(name, default="")
    result = dict(default)
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ImproperlyConfigured(f"{name}: {item!r} is not key=value")
        result[key.strip()] = value.strip()
    return result

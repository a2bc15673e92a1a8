"""Shared helpers for the benchmarks: percentiles, a table printer, a Redis to run against."""

from __future__ import annotations

import os
import statistics
from pathlib import Path


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print(" | ".join(value.rjust(widths[i]) for i, value in enumerate(row)))
        if index == 0:
            print("-+-".join("-" * width for width in widths))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 1000 else f"{value:,.0f}"
    return str(value)


def bench_redis_url() -> tuple[str, object | None]:
    """Database 14 of the configured Redis, or an embedded one (returned to be stopped)."""
    from portal.embedded_redis import embedded_redis_start, redis_answers

    configured = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if redis_answers(configured):
        base = configured.rsplit("/", 1)[0] if configured.count("/") > 2 else configured
        return f"{base}/14", None
    embedded = embedded_redis_start(data_dir=Path("var/bench-redis"))
    return embedded.url, embedded


def postgres_database_ensure(url: str) -> None:
    """Create the benchmark's PostgreSQL database when it does not exist yet (the benchmark
    then migrates it), so `make bench-*` needs no set-up step on a fresh machine."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if not parts.scheme.startswith("postgres"):
        return
    import psycopg
    from psycopg import sql

    name = parts.path.lstrip("/")
    server = urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, ""))
    with psycopg.connect(server, autocommit=True, connect_timeout=5) as connection:
        if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is None:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def listening_processes(urls: list[str]) -> list:
    """The local processes listening on these URLs' ports (the Redis server, PostgreSQL's
    postmaster), for a benchmark to pin and to count their CPU. Missing ones (a remote host,
    no permission to see them) are left out."""
    from urllib.parse import urlsplit

    import psutil

    default_ports = {"redis": 6379, "rediss": 6379, "postgres": 5432, "postgresql": 5432}
    ports = set()
    for url in urls:
        parts = urlsplit(url)
        if parts.hostname in ("127.0.0.1", "localhost", "::1"):
            port = parts.port or default_ports.get(parts.scheme)
            if port:
                ports.add(port)
    found = {}
    try:
        for connection in psutil.net_connections(kind="tcp"):
            if (connection.status == psutil.CONN_LISTEN and connection.laddr.port in ports
                    and connection.pid):
                found[connection.pid] = psutil.Process(connection.pid)
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        pass
    return list(found.values())

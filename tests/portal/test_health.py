import socket
import time
from pathlib import Path

import pytest

from portal.embedded_redis import embedded_redis_start


def test_healthz_touches_nothing(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.django_db
def test_readyz_ok_when_database_and_redis_answer(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "redis": "ok"}


@pytest.mark.django_db
def test_readyz_names_redis_when_it_is_stopped(client, settings, tmp_path: Path):
    redis_server = embedded_redis_start(data_dir=tmp_path)
    settings.REDIS_URL = redis_server.url
    assert client.get("/readyz").status_code == 200
    redis_server.stop()
    settings.READINESS_TIMEOUT_S = 0.5
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["redis"].startswith("error: ")


@pytest.mark.django_db(transaction=True)  # so that the request may connect anew
def test_readyz_gives_a_database_that_does_not_answer_its_timeout(client, settings, monkeypatch):
    """SLUICE_READINESS_TIMEOUT_S is per dependency, but only Redis had it: a PostgreSQL that
    accepts connections and says nothing (a hung server, a half-open proxy) held /readyz for
    psycopg's connect timeout, here the URL's 5 s, 130 s by default."""
    from django.db import connection

    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nothing ever answers
    settings.READINESS_TIMEOUT_S = 0.5
    database = connection.settings_dict  # the one every thread's connection is made from
    connection.close()  # as a request's is in production, where CONN_MAX_AGE is 0 on the web
    try:
        with monkeypatch.context() as patch:
            patch.setitem(database, "HOST", "127.0.0.1")
            patch.setitem(database, "PORT", silent.getsockname()[1])
            patch.setitem(database, "OPTIONS", {**database.get("OPTIONS", {}), "connect_timeout": 5})
            started = time.monotonic()
            response = client.get("/readyz")
            elapsed_s = time.monotonic() - started
    finally:
        silent.close()
    assert elapsed_s < 2.5
    assert response.status_code == 503
    assert response.json()["checks"] == {"database": "error: TimeoutError", "redis": "ok"}
    assert client.get("/readyz").status_code == 200  # the real database again

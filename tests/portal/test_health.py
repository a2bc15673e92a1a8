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

import pytest

from portal.models import Tenant
from tests.factories import TenantFactory, api_key_for, tier

pytestmark = pytest.mark.django_db


def test_models_lists_what_the_tier_allows(cast, api):
    pro = api.bearer(cast.owner_key).get("/v1/models").json()
    assert pro["object"] == "list"
    assert {m["id"] for m in pro["data"]} == {"sluice-code-tiny", "sluice-video-tiny"}
    assert all(m["object"] == "model" and m["owned_by"] == "sluice" for m in pro["data"])

    free_tenant = TenantFactory(tier=tier("free"))
    free = api.bearer(api_key_for(free_tenant)).get("/v1/models").json()
    assert [m["id"] for m in free["data"]] == ["sluice-code-tiny"]


def test_model_detail_hides_models_outside_the_tier(api, db):
    free_key = api_key_for(TenantFactory(tier=tier("free")))
    assert api.bearer(free_key).get("/v1/models/sluice-code-tiny").status_code == 200
    hidden = api.get("/v1/models/sluice-video-tiny")
    missing = api.get("/v1/models/no-such-model")
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["error"]["code"] == missing.json()["error"]["code"] == "model_not_found"
    assert hidden.json()["error"]["param"] == "model"


def test_models_report_the_context_length_admission_allows(cast, api, code_checkpoints, settings):
    code_checkpoints(4096)
    api.bearer(cast.owner_key)
    listed = {m["id"]: m for m in api.get("/v1/models").json()["data"]}
    assert listed["sluice-code-tiny"]["context_length"] == 4096
    assert listed["sluice-video-tiny"]["context_length"] is None
    settings.SLUICE_CODE_MAX_MODEL_LEN = 3000
    assert api.get("/v1/models/sluice-code-tiny").json()["context_length"] == 3000


def test_unknown_api_path_is_json_404(cast, api):
    response = api.bearer(cast.owner_key).get("/v1/nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    # Like every API response made with a key (DESIGN.md): it had none before.
    assert int(response["x-ratelimit-limit-cu"]) > 0 and "x-ratelimit-remaining-cu" in response
    assert api.bearer(cast.owner_key).post("/v1/nope", {}, format="json").status_code == 404
    assert api.bearer(None).get("/v1/nope").status_code == 404  # no key: still the 404
    assert api.bearer("sk-not-a-key").get("/v1/nope").status_code == 401  # as anywhere


def test_unknown_api_path_is_json_404_in_debug_mode_too(cast, api, settings):
    # make run sets SLUICE_DEBUG, and Django's debug 404 page bypasses handler404.
    settings.DEBUG = True
    response = api.bearer(cast.owner_key).get("/v1/nope/deeper")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "not_found"


def test_wrong_method_keeps_the_error_shape(cast, api):
    response = api.bearer(cast.owner_key).delete("/v1/models")
    assert response.status_code == 405
    assert set(response.json()["error"]) == {"type", "code", "message", "param"}


def test_openapi_schema_is_served(cast, api):
    response = api.bearer(cast.owner_key).get("/v1/openapi.json")
    assert response.status_code == 200
    assert "/v1/models" in response.json()["paths"]


def test_the_api_docs_page_loads_redoc_from_our_own_static_files(client):
    """/docs/api took Redoc from a CDN: blank on an offline machine or behind a strict CSP."""
    import re

    from django.contrib.staticfiles import finders

    page = client.get("/docs/api")
    assert page.status_code == 200
    scripts = re.findall(r'<script[^>]+src="([^"]+)"', page.content.decode())
    assert scripts and not [src for src in scripts if "://" in src], scripts
    redoc = [src for src in scripts if "redoc" in src]
    assert redoc and finders.find(redoc[0].removeprefix("/static/"))


def test_tiers_are_seeded_with_design_limits(db):
    free, pro, enterprise = tier("free"), tier("pro"), tier("enterprise")
    assert (free.monthly_budget_cu, free.cu_per_minute, free.max_concurrent_jobs) == (1000, 50, 1)
    assert (pro.monthly_budget_cu, pro.cu_per_minute, pro.max_concurrent_jobs) == (100_000, 2000, 8)
    assert (enterprise.monthly_budget_cu, enterprise.cu_per_minute) == (None, 20_000)
    assert enterprise.max_concurrent_jobs == 64
    assert free.queue_priority < pro.queue_priority < enterprise.queue_priority
    assert free.text_variant == "quantized" and pro.text_variant == "full"
    assert Tenant.objects.count() == 0


def test_an_accept_header_no_renderer_offers_is_a_406_not_acceptable(cast, api):
    """A client error: the body said code internal_error, as for a server fault."""
    response = api.bearer(cast.owner_key).get("/v1/models", HTTP_ACCEPT="text/html")
    assert response.status_code == 406
    assert response.json()["error"] == {
        "type": "invalid_request_error", "code": "not_acceptable", "param": None,
        "message": "Could not satisfy the request Accept header."}

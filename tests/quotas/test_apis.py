import pytest
from django.utils import timezone

from portal.models import ApiKey
from quotas.ledger import reservation_open, reservation_settle
from quotas.models import Reservation
from tests.factories import TenantFactory, api_key_for, tier

pytestmark = pytest.mark.django_db


def spend(api_key: ApiKey, cu: float, *, model="sluice-code-tiny", actual_cu=None):
    opened = reservation_open(api_key=api_key, model_id=model, pool="text-batch",
                              cost_mcu=int(cu * 1000), mode="sync")
    reservation_settle(reservation_id=opened.reservation.id,
                       actual_mcu=int((actual_cu if actual_cu is not None else cu) * 1000))


def key_of(full_key: str) -> ApiKey:
    return ApiKey.objects.select_related("tenant__tier").get(prefix=full_key[3:15])


def test_rate_limit_headers_on_every_keyed_response(cast, api):
    api.bearer(cast.owner_key)
    fresh = api.get("/v1/models")
    assert fresh["x-ratelimit-limit-cu"] == "2000"  # pro tier
    assert fresh["x-ratelimit-remaining-cu"] == "2000"
    assert fresh["x-ratelimit-reset-cu"] == "0"
    spend(key_of(cast.owner_key), 500)
    after = api.get("/v1/models/nope")  # error responses carry them too
    assert after.status_code == 404
    # The bucket refills 33 CU a second: a loaded machine's request comes a little later.
    assert 1500 <= int(after["x-ratelimit-remaining-cu"]) <= 1540
    assert 13 <= int(after["x-ratelimit-reset-cu"]) <= 15  # 500 CU at 2,000 CU/min
    assert "x-ratelimit-limit-cu" not in api.bearer("sk-bad").get("/v1/models")


def test_video_quote_prices_without_reserving(cast, api):
    response = api.bearer(cast.owner_key).post(
        "/v1/quotes",
        {"model": "sluice-video-tiny", "prompt": "a red square moving left", "seconds": 6,
         "size": "1280x720", "num_inference_steps": 40},
        format="json",
    )
    assert response.status_code == 200, response.json()
    body = response.json()
    # 6 s at 8 fps is 48 frames, rounded to Wan's 4k+1 = 49: 500 CU/min x 49/8/60 min x 2 (steps).
    assert body["object"] == "quote" and body["estimated_cu"] == 102.084
    assert response["x-cu-estimate"] == "102.084"
    assert body["breakdown"]["frames"] == 49 and body["breakdown"]["steps"] == 40
    assert not Reservation.objects.exists()


@pytest.mark.parametrize(
    ("payload", "status", "code", "param"),
    [
        ({"model": "sluice-video-tiny", "prompt": "x", "size": "999x999"}, 400, "invalid_parameter", "size"),
        ({"model": "sluice-video-tiny", "prompt": "x", "seconds": 60}, 400, "invalid_parameter", "seconds"),
        ({"model": "sluice-video-tiny", "prompt": "x", "num_inference_steps": 500}, 400,
         "invalid_parameter", "num_inference_steps"),
        ({"model": "sluice-video-tiny", "prompt": "x", "num_inference_steps": 0}, 400,
         "invalid_parameter", "num_inference_steps"),
        ({"model": "sluice-video-tiny"}, 400, "invalid_parameter", "prompt"),
        ({"model": "no-such-model", "prompt": "x"}, 404, "model_not_found", "model"),
        ({"prompt": "x"}, 400, "invalid_parameter", "model"),
    ],
)
def test_quote_rejects_bad_input(cast, api, payload, status, code, param):
    response = api.bearer(cast.owner_key).post("/v1/quotes", payload, format="json")
    assert response.status_code == status, response.json()
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["param"] == param


def test_quote_for_a_model_outside_the_tier_is_403(api):
    free_key = api_key_for(TenantFactory(tier=tier("free")))
    response = api.bearer(free_key).post(
        "/v1/quotes", {"model": "sluice-video-tiny", "prompt": "x"}, format="json"
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "model_not_allowed"


def test_malformed_json_body_is_invalid_parameter(cast, api):
    response = api.bearer(cast.owner_key).generic(
        "POST", "/v1/quotes", "{not json", content_type="application/json"
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_parameter"


def test_usage_groups_by_day_model_and_key_for_the_callers_tenant_only(cast, api):
    owner = key_of(cast.owner_key)
    second_key = key_of(api_key_for(cast.tenant, name="second"))
    spend(owner, 2, actual_cu=1.5)
    spend(owner, 1, model="sluice-video-tiny")
    spend(second_key, 3)
    spend(key_of(cast.outsider_key), 50)

    api.bearer(cast.owner_key)
    by_day = api.get("/v1/usage").json()
    today = timezone.now().date().isoformat()
    assert by_day["total_cu"] == 5.5
    assert by_day["data"] == [{"date": today, "cu": 5.5, "requests": 3}]
    assert by_day["budget"]["used_cu"] == 5.5 and by_day["budget"]["limit_cu"] == 100_000.0

    by_model = api.get("/v1/usage", {"group_by": "model"}).json()["data"]
    assert {row["model"]: row["cu"] for row in by_model} == {"sluice-code-tiny": 4.5, "sluice-video-tiny": 1.0}
    by_key = api.get("/v1/usage", {"group_by": "key,model"}).json()["data"]
    assert {(row["api_key_id"], row["model"]): row["cu"] for row in by_key} == {
        (owner.pk, "sluice-code-tiny"): 1.5, (owner.pk, "sluice-video-tiny"): 1.0,
        (second_key.pk, "sluice-code-tiny"): 3.0,
    }
    outsider_view = api.bearer(cast.outsider_key).get("/v1/usage").json()
    assert outsider_view["total_cu"] == 50.0


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"group_by": "tenant"}, "group_by"),
        ({"start_date": "2026-13-01"}, "start_date"),
        ({"start_date": "2026-11-20", "end_date": "2026-11-01"}, "start_date"),
    ],
)
def test_usage_rejects_bad_parameters(cast, api, params, param):
    response = api.bearer(cast.owner_key).get("/v1/usage", params)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_text_quote_counts_prompt_tokens_with_the_models_tokenizer(cast, api):
    from inference.registry import model_get
    from inference.tokenization import count_tokens, render_chat

    messages = [{"role": "user", "content": "def add(a, b):"}]
    response = api.bearer(cast.owner_key).post(
        "/v1/quotes", {"model": "sluice-code-tiny", "messages": messages, "max_tokens": 100},
        format="json")
    assert response.status_code == 200, response.json()
    body = response.json()
    spec = model_get("sluice-code-tiny")
    prompt_tokens = count_tokens(spec, render_chat(spec, messages))
    assert body["breakdown"]["prompt_tokens"] == prompt_tokens > 3
    assert body["estimated_cu"] == (prompt_tokens + 100) / 1000
    assert body["variant"] == "full"


def test_free_tier_text_quote_uses_the_quantized_discount(api):
    free_key = api_key_for(TenantFactory(tier=tier("free")))
    body = api.bearer(free_key).post(
        "/v1/quotes", {"model": "sluice-code-tiny", "prompt": "x = 1", "max_tokens": 998},
        format="json").json()
    assert body["variant"] == "quantized"
    assert body["estimated_cu"] == pytest.approx((body["breakdown"]["prompt_tokens"] + 998) / 2000, abs=0.001)


def test_prompt_longer_than_the_context_is_400_context_length_exceeded(cast, api):
    response = api.bearer(cast.owner_key).post(
        "/v1/quotes", {"model": "sluice-code-tiny", "prompt": "x = 1\n" * 400, "max_tokens": 10},
        format="json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert response.json()["error"]["param"] == "prompt"
    too_many = api.post("/v1/quotes", {"model": "sluice-code-tiny", "prompt": "x", "max_tokens": 5000},
                        format="json")
    assert too_many.json()["error"]["code"] == "context_length_exceeded"


def test_the_context_length_a_quote_allows_is_the_checkpoints(cast, api, code_checkpoints, settings):
    code_checkpoints(2048)
    api.bearer(cast.owner_key)
    quote = {"model": "sluice-code-tiny", "prompt": "x = 1\n", "max_tokens": 1500}
    allowed = api.post("/v1/quotes", quote, format="json")
    assert allowed.status_code == 200, allowed.json()
    refused = api.post("/v1/quotes", {**quote, "max_tokens": 2048}, format="json")
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "context_length_exceeded"
    assert "maximum context length is 2048 tokens" in refused.json()["error"]["message"]
    settings.SLUICE_CODE_MAX_MODEL_LEN = 1200
    capped = api.post("/v1/quotes", quote, format="json")
    assert capped.status_code == 400
    assert capped.json()["error"]["code"] == "context_length_exceeded"

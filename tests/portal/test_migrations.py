import importlib
import io

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from portal.models import Tier


@pytest.mark.django_db
def test_models_and_migrations_agree():
    out = io.StringIO()
    call_command("makemigrations", "--check", "--dry-run", stdout=out)
    assert "No changes detected" in out.getvalue()


@pytest.mark.django_db(transaction=True)
def test_portal_migrations_run_backwards_and_forwards():
    """On the configured database (PostgreSQL in CI): unapply to the schema, reapply, reseed."""
    executor = MigrationExecutor(connection)
    executor.migrate([("portal", "0001_initial")])
    assert Tier.objects.count() == 0
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())
    assert set(Tier.objects.values_list("slug", flat=True)) == {"free", "pro", "enterprise"}
    assert connection.vendor in {"postgresql", "sqlite"}


@pytest.mark.django_db(transaction=True)
def test_limits_the_constraints_refuse_keep_what_they_did():
    """Admission read a negative budget or cap as none at all: the rows become exactly that."""
    executor = MigrationExecutor(connection)
    executor.migrate([("portal", "0003_apikey_cu_per_minute_tenant_burst_cu_override_and_more")])
    old = executor.loader.project_state(
        ("portal", "0003_apikey_cu_per_minute_tenant_burst_cu_override_and_more")).apps
    old_tier = old.get_model("portal", "Tier").objects.create(
        slug="odd", name="Odd", monthly_budget_cu=-1, cu_per_minute=0, max_concurrent_jobs=1,
        queue_priority=1)
    old_tenant = old.get_model("portal", "Tenant").objects.create(
        name="Odd", slug="odd", tier=old_tier, monthly_budget_cu_override=-5)
    old.get_model("portal", "ApiKey").objects.create(
        tenant=old_tenant, name="odd", prefix="odd", secret_digest="0", cu_cap=-1)
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())
    from portal.models import ApiKey, Tenant

    migrated = Tier.objects.get(slug="odd")
    assert (migrated.monthly_budget_cu, migrated.cu_per_minute) == (0, 1)  # refused all, still does
    tenant = Tenant.objects.get(slug="odd")
    assert (tenant.monthly_budget_cu_override, tenant.unlimited_budget) == (None, True)
    assert ApiKey.objects.get(prefix="odd").cu_cap is None


@pytest.mark.django_db(transaction=True)
def test_webhook_events_recorded_before_job_id_get_it_from_their_payload(monkeypatch):
    """A deleted or expired job's events are found by WebhookEvent.job_id: those recorded before
    it existed get it from their payload, batch by batch (two rows a batch here)."""
    backfill = importlib.import_module("inference.migrations.0008_webhookevent_job_id_backfill")
    monkeypatch.setattr(backfill, "BATCH", 2)
    executor = MigrationExecutor(connection)
    executor.migrate([("inference", "0006_job_content_expirable")])
    old = executor.loader.project_state(("inference", "0006_job_content_expirable")).apps
    old_tier = old.get_model("portal", "Tier").objects.create(
        slug="old", name="Old", monthly_budget_cu=1, cu_per_minute=1, max_concurrent_jobs=1,
        queue_priority=1)
    tenant = old.get_model("portal", "Tenant").objects.create(name="Old", slug="old", tier=old_tier)
    recorded = {
        "msg_01": {"type": "job.queued", "data": {"id": "job_a", "object": "job"}},
        "msg_02": {"type": "moderation.case_opened", "data": {"case_id": 3}},
        "msg_03": {"type": "job.completed", "data": {"id": "job_a", "object": "job",
                                                     "result": {"text": "done"}}},
        "msg_04": {"type": "budget.threshold_reached", "data": {"period": "2026-11"}},
        "msg_05": {"type": "job.failed", "data": {"id": "job_b", "object": "job"}},
    }
    for event_id, payload in recorded.items():
        old.get_model("inference", "WebhookEvent").objects.create(
            id=event_id, tenant=tenant, type=payload["type"], payload=payload)

    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())
    from inference.webhook_models import WebhookEvent

    assert dict(WebhookEvent.objects.order_by("pk").values_list("pk", "job_id")) == {
        "msg_01": "job_a", "msg_02": None, "msg_03": "job_a", "msg_04": None, "msg_05": "job_b"}
    assert WebhookEvent.objects.get(pk="msg_03").payload == recorded["msg_03"]  # left as it was

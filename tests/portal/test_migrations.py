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

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

"""portal/db.py against the configured database (PostgreSQL in CI)."""

import pytest
from django.db import transaction
from django.db.models import F

from inference.models import Job
from portal.db import update_returning
from tests.factories import api_key_obj, tenant_with_limits, video_job_submit

pytestmark = pytest.mark.django_db


@pytest.fixture
def job(sent_tasks):
    return video_job_submit(api_key_obj(tenant_with_limits(budget_cu=100))).job


def test_update_returning_changes_the_row_and_returns_it_as_the_orm_would(job):
    claimed = update_returning(Job.objects.filter(pk=job.pk, status="queued"),
                               status="running", attempts=F("attempts") + 1, result={"frames": [1, 2]})
    assert len(claimed) == 1
    row = claimed[0]
    again = Job.objects.get(pk=job.pk)
    # Every field as a plain read gives it: JSON decoded, datetimes aware, foreign keys as ids.
    for field in Job._meta.concrete_fields:
        assert getattr(row, field.attname) == getattr(again, field.attname), field.name
    assert (row.status, row.attempts, row.result) == ("running", 1, {"frames": [1, 2]})
    assert row.queued_at.tzinfo is not None and row.params == job.params
    assert row._state.adding is False and row._state.db == "default"
    assert row.tenant_id == job.tenant_id and row.tenant.pk == job.tenant_id


def test_update_returning_returns_nothing_when_the_condition_no_longer_holds(job):
    assert update_returning(Job.objects.filter(pk=job.pk, status="running"), status="failed") == []
    assert Job.objects.get(pk=job.pk).status == "queued"


def test_update_returning_joins_the_callers_transaction(job):
    with pytest.raises(RuntimeError), transaction.atomic():
        update_returning(Job.objects.filter(pk=job.pk), status="running")
        raise RuntimeError("the caller fails after the claim")
    assert Job.objects.get(pk=job.pk).status == "queued"  # rolled back with it


def test_update_returning_refuses_filters_through_other_tables(job):
    with pytest.raises(ValueError, match="own table"):
        update_returning(Job.objects.filter(tenant__slug="x"), status="running")


@pytest.mark.django_db(transaction=True)
async def test_database_steps_of_successive_requests_reuse_the_pools_threads():
    """Each request runs in its own thread-sensitive context, as Django serves it; a step of
    database_sync_to_async's default would start a thread per request, database_step reuses
    its pool's threads (and their thread-locals) and still queries and returns its result."""
    import threading

    from asgiref.sync import ThreadSensitiveContext
    from django.db import connection

    from portal.db import database_step

    threads = []

    def step(n):
        threads.append(threading.current_thread())
        with connection.cursor() as cursor:
            cursor.execute("SELECT %s", [n])
            return cursor.fetchone()[0]

    results = []
    for n in range(24):
        async with ThreadSensitiveContext():
            results.append(await database_step(step)(n))
    assert results == list(range(24))
    # The pool's threads (a thread per request is the failure).
    assert all(thread.name.startswith("db-step") for thread in threads)


@pytest.mark.django_db(transaction=True)
async def test_a_database_step_returns_its_connection_also_under_channels_test_communicators():
    """Channels' communicators (WebsocketCommunicator) make channels.db's close_old_connections
    a no-op while a test awaits them. A step's pooled thread kept its connection past the test
    then, and a later test without database access got a 500 from that thread's next step
    (tests/portal/test_asgi_handler.py after tests/dashboard/test_live.py)."""
    from channels.testing import ApplicationCommunicator
    from django.db import connections

    from portal.db import database_step

    def step():
        wrapper = connections["default"]  # the step thread's own
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT 1")
        return wrapper

    async def application(scope, receive, send):
        await receive()
        await send({"type": "stepped", "connection": await database_step(step)()})

    communicator = ApplicationCommunicator(application, {"type": "test"})
    await communicator.send_input({"type": "go"})
    stepped = await communicator.receive_output(timeout=10)
    assert stepped["connection"].connection is None  # closed when the step ended
    await communicator.wait(timeout=10)

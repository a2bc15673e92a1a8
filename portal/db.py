"""Database helpers the ORM lacks."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from asgiref.sync import SyncToAsync
from django.conf import settings
from django.db import close_old_connections, connections, transaction
from django.db.models import QuerySet
from django.db.models.sql import UpdateQuery


@dataclass(frozen=True)
class Page:
    """A page of a list (OpenAI's list shape around it: inference.apis.list_body)."""

    rows: list
    has_more: bool


def page_after(queryset: QuerySet, *, after: str | None = None, order: str = "desc",
               limit: int = 20) -> Page:
    """A page of `queryset` in primary-key order (`desc`: newest first, for keys that sort by
    time: ULIDs), after the key `after` in that order: a cursor, so rows added meanwhile never
    shift a page as an offset's do. One row more than the page is read: whether there is more is
    known, not guessed from a full page (a last page that is exactly full said there was more)."""
    if order == "asc":
        queryset = (queryset.filter(pk__gt=after) if after else queryset).order_by("pk")
    else:
        queryset = (queryset.filter(pk__lt=after) if after else queryset).order_by("-pk")
    rows = list(queryset[:limit + 1])
    return Page(rows=rows[:limit], has_more=len(rows) > limit)


def update_returning(queryset: QuerySet, **changes) -> list:
    """`queryset.update(**changes)` that also returns the rows it changed, as model instances,
    in one statement (UPDATE ... RETURNING; PostgreSQL, and SQLite since 3.35).

    For claims that need the row they claimed (STYLE rule 5): the conditional update and the
    read that followed it were two round trips and a second query's worth of ORM work. The
    statement is Django's own UPDATE; rows become instances the way a queryset's do (the
    backend's and the fields' converters, then `from_db`). Only for filters on the queryset's
    own table (what a claim uses), so the statement stays one."""
    model = queryset.model
    query = queryset.query.chain(UpdateQuery)
    query.add_update_values(changes)
    query.clear_select_clause()
    if query.count_active_tables() > 1:
        raise ValueError("update_returning filters on the model's own table only")
    compiler = query.get_compiler(queryset.db)
    statement, params = compiler.as_sql()
    fields = model._meta.concrete_fields
    connection = connections[queryset.db]
    columns = ", ".join(connection.ops.quote_name(field.column) for field in fields)
    with transaction.mark_for_rollback_on_error(using=queryset.db), connection.cursor() as cursor:
        cursor.execute(f"{statement} RETURNING {columns}", params)
        rows = cursor.fetchall()
    converters = compiler.get_converters([field.get_col(model._meta.db_table) for field in fields])
    if converters:
        rows = compiler.apply_converters(rows, converters)
    names = [field.attname for field in fields]
    return [model.from_db(queryset.db, names, row) for row in rows]


# As many threads as the ASGI server's PostgreSQL pool has connections (settings.DB_POOL_MAX),
# 16 without a pool: a thread more than connections would only wait for one.
_database_steps = ThreadPoolExecutor(max_workers=settings.DB_POOL_MAX or 16,
                                     thread_name_prefix="db-step")


class _DatabaseStep(SyncToAsync):
    """`channels.db.DatabaseSyncToAsync`, calling Django's close_old_connections itself. Channels'
    test communicators replace the name in channels.db by a no-op while a test awaits them (so
    that the test's own connection, in its transaction, is left open); a step's pooled thread is
    never the test's, and kept its connection past the test: the next test's step on that thread
    then checked it against pytest-django's database block (500s in tests that use none)."""

    def thread_handler(self, loop, *args, **kwargs):
        close_old_connections()
        try:
            return super().thread_handler(loop, *args, **kwargs)
        finally:
            close_old_connections()


def database_step(func):
    """`channels.db.database_sync_to_async` on a shared pool of threads, for an async view's
    blocking steps that need no thread of their own (each returns its connection when it ends).

    Django serves each async request in its own thread-sensitive context, so the default
    (thread_sensitive=True) starts a thread for every request's first step, and the new thread
    rebuilds its thread-locals (a database wrapper, Celery's result backend): about 1 ms of CPU
    per request step on a small machine (2.2 -> 1.0 ms measured), before any work."""
    return _DatabaseStep(func, thread_sensitive=False, executor=_database_steps)

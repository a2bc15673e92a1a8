"""Usage reports from the ledger (settled charges and adjustments), always for one tenant."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

from django.db.models import Count, Q, Sum
from django.db.models.functions import TruncDate

from portal.models import Tenant
from quotas.models import LedgerEntry

GROUPINGS = {"day": "day", "model": "model", "key": "api_key_id"}


def usage_rows(*, tenant: Tenant, start: date, end: date, group_by: list[str]) -> list[dict]:
    """CU charged per group between start and end (inclusive), oldest first."""
    fields = [GROUPINGS[name] for name in group_by]
    queryset = LedgerEntry.objects.filter(
        tenant=tenant,
        kind__in=[LedgerEntry.Kind.SETTLE, LedgerEntry.Kind.ADJUST],
        created_at__gte=datetime.combine(start, time.min, tzinfo=UTC),
        created_at__lt=datetime.combine(end + timedelta(days=1), time.min, tzinfo=UTC),
    ).annotate(day=TruncDate("created_at", tzinfo=UTC))
    rows = (
        queryset.values(*fields)
        .annotate(mcu=Sum("mcu"), requests=Count("id", filter=Q(kind=LedgerEntry.Kind.SETTLE)))
        .order_by(*fields)
    )
    return list(rows)


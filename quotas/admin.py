from django.contrib import admin

from portal.admin import ReadOnlyAdmin
from quotas.models import BudgetAlert, LedgerEntry, Reservation

# The ledger is append-only: corrections are new `adjust` entries (quotas.ledger.ledger_adjust).


@admin.register(Reservation)
class ReservationAdmin(ReadOnlyAdmin):
    list_display = ("id", "tenant", "model", "pool", "state", "reserved_mcu", "settled_mcu",
                    "created_at", "expires_at", "redis_synced")
    list_filter = ("state", "pool", "redis_synced")
    search_fields = ("id", "tenant__name")


@admin.register(LedgerEntry)
class LedgerEntryAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "tenant", "kind", "mcu", "period", "model", "reservation", "note")
    list_filter = ("kind", "period")
    search_fields = ("tenant__name", "reservation__id")


@admin.register(BudgetAlert)
class BudgetAlertAdmin(ReadOnlyAdmin):
    list_display = ("tenant", "period", "threshold_pct", "used_mcu", "limit_mcu", "created_at")

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from portal.models import Tenant
from quotas.ledger import REBUILD_FORCED_READS, counters_rebuild
from quotas.limits import period_of


class Command(BaseCommand):
    help = "Rebuild Redis budget counters from the ledger (all tenants, or --tenant SLUG)."

    def add_arguments(self, parser):
        parser.add_argument("--tenant", help="tenant slug; default: every tenant")
        parser.add_argument("--period", help="YYYY-MM; default: the current month")

    def handle(self, *args, tenant=None, period=None, **options):
        period = period or period_of(timezone.now())
        tenants = Tenant.objects.filter(slug=tenant) if tenant else Tenant.objects.all()
        busy = []
        for row in tenants:
            # Overwritten in one step, admissions Redis counted and the database has not
            # committed yet kept (counters_rebuild's force): never dropped and rebuilt.
            if counters_rebuild(tenant_id=row.pk, period=period, force=True):
                self.stdout.write(f"rebuilt {row.slug} {period}")
            else:
                busy.append(row.slug)
        if busy:
            raise CommandError(
                f"not rebuilt (admissions kept changing under {REBUILD_FORCED_READS} reads; "
                f"run again): {', '.join(busy)}"
            )

from django.core.management.base import BaseCommand
from django.utils import timezone

from portal.models import Tenant
from portal.redis import redis_client
from quotas.ledger import counters_rebuild
from quotas.limits import CounterKeys, period_of


class Command(BaseCommand):
    help = "Rebuild Redis budget counters from the ledger (all tenants, or --tenant SLUG)."

    def add_arguments(self, parser):
        parser.add_argument("--tenant", help="tenant slug; default: every tenant")
        parser.add_argument("--period", help="YYYY-MM; default: the current month")

    def handle(self, *args, tenant=None, period=None, **options):
        period = period or period_of(timezone.now())
        tenants = Tenant.objects.filter(slug=tenant) if tenant else Tenant.objects.all()
        client = redis_client()
        for row in tenants:
            # Drop the hot copy first so the rebuild applies (it never overwrites a live counter).
            client.delete(CounterKeys(tenant_id=row.pk, api_key_id=0, period=period, pool="").budget)
            counters_rebuild(tenant_id=row.pk, period=period)
            self.stdout.write(f"rebuilt {row.slug} {period}")

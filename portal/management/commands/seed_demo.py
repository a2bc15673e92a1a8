from django.core.management.base import BaseCommand

from portal.demo import demo_seed


class Command(BaseCommand):
    help = "Create the demo tenants and superuser; print a fresh password and keys (shown once)."

    def handle(self, *args, **options):
        credentials = demo_seed()
        self.stdout.write(f"Admin login: {credentials.username} / {credentials.password}")
        for tier_slug, key in credentials.keys_by_tier.items():
            self.stdout.write(f"{tier_slug}: {key}")

"""Empty the stored prompts of cases whose retention period ended (run daily)."""

from django.core.management.base import BaseCommand

from moderation.services import case_prompts_purge


class Command(BaseCommand):
    help = "Delete moderation-case prompts older than SLUICE_MODERATION_PROMPT_RETENTION_DAYS."

    def handle(self, *args, **options):
        purged = case_prompts_purge()
        self.stdout.write(f"purged {purged} prompts")

from celery import shared_task

from moderation.services import case_prompts_purge


@shared_task(name="moderation.case_prompts_purge", ignore_result=True)
def case_prompts_purge_task() -> int:
    return case_prompts_purge()

"""DESIGN.md's three tiers as data; operators edit them in the admin afterwards."""

from django.db import migrations

TIERS = [
    {
        "slug": "free", "name": "Free", "monthly_budget_cu": 1_000, "cu_per_minute": 50,
        "max_concurrent_jobs": 1, "queue_priority": 1, "text_variant": "quantized",
        "allowed_models": ["sluice-code-tiny"],
    },
    {
        "slug": "pro", "name": "Pro", "monthly_budget_cu": 100_000, "cu_per_minute": 2_000,
        "max_concurrent_jobs": 8, "queue_priority": 5, "text_variant": "full",
        "allowed_models": [],
    },
    {
        "slug": "enterprise", "name": "Enterprise", "monthly_budget_cu": None,
        "cu_per_minute": 20_000, "max_concurrent_jobs": 64, "queue_priority": 9,
        "text_variant": "full", "allowed_models": [],
    },
]


def seed(apps, schema_editor):
    Tier = apps.get_model("portal", "Tier")
    for tier in TIERS:
        Tier.objects.update_or_create(slug=tier["slug"], defaults=tier)


def unseed(apps, schema_editor):
    Tier = apps.get_model("portal", "Tier")
    Tier.objects.filter(slug__in=[t["slug"] for t in TIERS], tenants__isnull=True).delete()


class Migration(migrations.Migration):
    dependencies = [("portal", "0001_initial")]
    operations = [migrations.RunPython(seed, unseed)]

from django.apps import AppConfig
from django.conf import settings
from django.db.models.signals import pre_delete


class PortalConfig(AppConfig):
    name = "portal"
    verbose_name = "Tenancy"

    def ready(self) -> None:
        from portal import schema  # noqa: F401 - registers the OpenAPI auth extension
        from portal.services import tenant_delete_guard, user_delete_guard

        # Accounts are deleted through portal.services.user_delete only (its docstring says why).
        pre_delete.connect(user_delete_guard, sender=settings.AUTH_USER_MODEL,
                           dispatch_uid="portal.user_delete_guard")
        # A tenant with history is never deleted, by any path (tenant_delete_guard says why).
        pre_delete.connect(tenant_delete_guard, sender="portal.Tenant",
                           dispatch_uid="portal.tenant_delete_guard")

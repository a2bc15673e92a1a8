from django.apps import AppConfig


class InferenceConfig(AppConfig):
    name = "inference"

    def ready(self) -> None:
        from inference.services import jobs_cancel_for_tenant
        from portal.signals import tenant_suspended

        def stop_the_tenants_work(sender, tenant, **kwargs) -> None:
            jobs_cancel_for_tenant(tenant_id=tenant.pk)

        tenant_suspended.connect(stop_the_tenants_work, weak=False,
                                 dispatch_uid="inference.stop_the_tenants_work")

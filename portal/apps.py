from django.apps import AppConfig


class PortalConfig(AppConfig):
    name = "portal"
    verbose_name = "Tenancy"

    def ready(self) -> None:
        from portal import schema  # noqa: F401 - registers the OpenAPI auth extension

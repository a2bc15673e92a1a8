from django.urls import path

from inference.consumers import JobEventsConsumer, TenantJobsConsumer

websocket_urlpatterns = [
    path("ws/jobs/<str:job_id>/", JobEventsConsumer.as_asgi()),
    path("ws/tenants/<slug:tenant_slug>/jobs/", TenantJobsConsumer.as_asgi()),
]

from django.urls import path

from inference.consumers import JobEventsConsumer

websocket_urlpatterns = [
    path("ws/jobs/<str:job_id>/", JobEventsConsumer.as_asgi()),
]

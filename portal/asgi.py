"""ASGI entry point: Django for HTTP, Channels for websockets (routes added by the apps)."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from portal.asgi_handler import asgi_application_get  # noqa: E402

django_asgi_app = asgi_application_get()

from portal.middleware import SameOriginWebsocketSession  # noqa: E402
from portal.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AuthMiddlewareStack(SameOriginWebsocketSession(URLRouter(websocket_urlpatterns))),
    }
)

from moderation.classifier import classifier_preload  # noqa: E402
from portal.heap import long_lived_freeze  # noqa: E402

classifier_preload()  # every text and video request screens its prompt
long_lived_freeze(after="ASGI start-up")

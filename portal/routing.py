"""Websocket routes of every app, gathered in one list for portal.asgi."""

from inference.routing import websocket_urlpatterns as inference_routes

websocket_urlpatterns: list = [*inference_routes]

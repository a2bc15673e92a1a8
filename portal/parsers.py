"""Request bodies: every JSON body the API reads is an object of named fields."""

from __future__ import annotations

from rest_framework.parsers import JSONParser

from portal.errors import InvalidParameter


def json_object_require(data) -> dict:
    """The parsed body, if it is a JSON object. Views read named fields from it: a list or a
    string reached `.get` and answered 500 instead of the client's 400."""
    if not isinstance(data, dict):
        raise InvalidParameter("Send a JSON object.")
    return data


class JsonObjectParser(JSONParser):
    """DRF's JSON parser, refusing a body that is not an object (the default for every API
    view, so no view checks it again)."""

    def parse(self, stream, media_type=None, parser_context=None):
        return json_object_require(super().parse(stream, media_type, parser_context))

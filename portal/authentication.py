"""`Authorization: Bearer sk-...` for the API (DRF)."""

from __future__ import annotations

from dataclasses import dataclass

from rest_framework.authentication import BaseAuthentication, get_authorization_header

from portal.errors import InvalidApiKey
from portal.models import ApiKey, Tenant
from portal.services import api_key_authenticate


@dataclass(frozen=True)
class ApiPrincipal:
    """request.user for API calls: the key and its tenant, never a Django user."""

    api_key: ApiKey

    is_authenticated = True
    is_anonymous = False

    @property
    def tenant(self) -> Tenant:
        return self.api_key.tenant


def bearer_token(header_value: bytes | str) -> str | None:
    if isinstance(header_value, bytes):
        try:
            header_value = header_value.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidApiKey() from None
    parts = header_value.split()
    if not parts:
        return None
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise InvalidApiKey()
    return parts[1]


class ApiKeyAuthentication(BaseAuthentication):
    def authenticate(self, request):
        token = bearer_token(get_authorization_header(request))
        if token is None:
            return None  # DRF answers NotAuthenticated, rendered as invalid_api_key
        api_key = api_key_authenticate(raw_key=token)
        return ApiPrincipal(api_key=api_key), api_key

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="sluice"'

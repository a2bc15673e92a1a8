"""`Authorization: Bearer sk-...` for the API (DRF)."""

from __future__ import annotations

from dataclasses import dataclass

from django.http import JsonResponse
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.permissions import SAFE_METHODS, BasePermission

from portal.errors import InvalidApiKey, MethodNotAllowed, PermissionDenied, SluiceError, json_error
from portal.models import ROLE_RANK, ApiKey, Membership, Role, Tenant
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


def api_key_from_authorization(value: bytes | str) -> ApiKey | None:
    """The key an `Authorization` header presents, None if it presents none; InvalidApiKey if
    it is malformed, unknown, revoked or expired."""
    token = bearer_token(value or "")
    return None if token is None else api_key_authenticate(raw_key=token)


def method_not_allowed(request, *, allowed: str) -> JsonResponse:
    """A plain (not DRF) API view's answer to a method it does not serve, as DRF's views answer
    it: a key is checked first (a wrong one is the 401) and is the request's principal (the
    rate-limit headers), and the 405 lists in `Allow` what is allowed (RFC 9110)."""
    try:
        api_key = api_key_from_authorization(request.headers.get("Authorization", ""))
        if api_key is not None:
            request.user = ApiPrincipal(api_key=api_key)
        error = MethodNotAllowed(f'Method "{request.method}" not allowed.',
                                 headers={"Allow": allowed})
    except SluiceError as refused:
        error = refused
    return json_error(error)


class ApiKeyAuthentication(BaseAuthentication):
    def authenticate(self, request):
        token = bearer_token(get_authorization_header(request))
        if token is None:
            return None  # DRF answers NotAuthenticated, rendered as invalid_api_key
        api_key = api_key_authenticate(raw_key=token)
        return ApiPrincipal(api_key=api_key), api_key

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="sluice"'


class IssuedByTenantAdmin(BasePermission):
    """Changes the dashboard leaves to admins (webhook endpoints, their secrets, redelivery)
    need a key whose issuer is an admin or owner of its tenant now. A key has no role of its
    own and any member may issue one: without this, a member's key could do what the member
    may not. Reads stay open to every key, as every role reads them in the dashboard."""

    def has_permission(self, request, view) -> bool:
        if request.method in SAFE_METHODS:
            return True
        api_key = request.user.api_key
        admin_roles = [role for role in Role if ROLE_RANK[role] >= ROLE_RANK[Role.ADMIN]]
        if api_key.created_by_id is None or not Membership.objects.filter(
                tenant_id=api_key.tenant_id, user_id=api_key.created_by_id,
                role__in=admin_roles).exists():
            raise PermissionDenied("This needs an API key issued by an admin or owner of the "
                                   "tenant.")
        return True

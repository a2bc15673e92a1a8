from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from drf_spectacular.views import SpectacularJSONAPIView, SpectacularRedocView

from moderation.apis import ModerationsApi
from portal import apis, views

api_v1 = [
    path("models", apis.ModelListApi.as_view(), name="api-models"),
    path("models/<str:model_id>", apis.ModelDetailApi.as_view(), name="api-model-detail"),
    path("openapi.json", SpectacularJSONAPIView.as_view(), name="api-schema"),
    path("moderations", ModerationsApi.as_view(), name="api-moderations"),
]

urlpatterns = [
    path("v1/", include(api_v1)),
    path("healthz", apis.healthz, name="healthz"),
    path("readyz", apis.readyz, name="readyz"),
    path("docs/api", SpectacularRedocView.as_view(url_name="api-schema"), name="api-docs"),
    path("admin/", admin.site.urls),
    path("moderation/", include("moderation.urls")),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path(
        "accounts/set-password/<uidb64>/<token>/",
        auth_views.PasswordResetConfirmView.as_view(success_url="/accounts/login/"),
        name="password_reset_confirm",
    ),
    path("", views.dashboard_home, name="dashboard-home"),
    path("t/<slug:tenant_slug>/", views.tenant_overview, name="tenant-overview"),
    path("t/<slug:tenant_slug>/keys/", views.api_keys_page, name="tenant-keys"),
    path(
        "t/<slug:tenant_slug>/keys/<int:key_id>/revoke/",
        views.api_key_revoke_view,
        name="tenant-key-revoke",
    ),
    path("t/<slug:tenant_slug>/members/", views.members_page, name="tenant-members"),
    path(
        "t/<slug:tenant_slug>/members/<int:membership_id>/",
        views.member_update_view,
        name="tenant-member-update",
    ),
]

handler404 = "portal.views.not_found"
handler500 = "portal.views.server_error"

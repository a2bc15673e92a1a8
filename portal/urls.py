from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularJSONAPIView, SpectacularRedocView

from inference import apis as inference_apis
from inference import text_apis, webhook_apis, webhook_views
from moderation.apis import ModerationsApi
from portal import apis, dashboard_views, ops_views, views
from quotas import apis as quota_apis

api_v1 = [
    path("models", apis.ModelListApi.as_view(), name="api-models"),
    path("models/<str:model_id>", apis.ModelDetailApi.as_view(), name="api-model-detail"),
    path("quotes", quota_apis.QuoteApi.as_view(), name="api-quotes"),
    path("usage", quota_apis.UsageApi.as_view(), name="api-usage"),
    path("chat/completions", text_apis.chat_completions, name="api-chat-completions"),
    path("completions", text_apis.completions, name="api-completions"),
    path("jobs", inference_apis.JobListApi.as_view(), name="api-jobs"),
    path("jobs/<str:job_id>", inference_apis.JobDetailApi.as_view(), name="api-job"),
    path("jobs/<str:job_id>/cancel", inference_apis.JobCancelApi.as_view(), name="api-job-cancel"),
    path("jobs/<str:job_id>/events", inference_apis.job_events_sse, name="api-job-events"),
    path("videos", inference_apis.VideoListApi.as_view(), name="api-videos"),
    path("videos/<str:job_id>", inference_apis.VideoDetailApi.as_view(), name="api-video"),
    path("videos/<str:job_id>/content", inference_apis.VideoContentApi.as_view(), name="api-video-content"),
    path("webhooks", webhook_apis.WebhookListApi.as_view(), name="api-webhooks"),
    path(
        "webhooks/deliveries/<str:delivery_id>/redeliver",
        webhook_apis.WebhookRedeliverApi.as_view(),
        name="api-webhook-redeliver",
    ),
    path("webhooks/<str:endpoint_id>", webhook_apis.WebhookDetailApi.as_view(), name="api-webhook"),
    path(
        "webhooks/<str:endpoint_id>/rotate_secret",
        webhook_apis.WebhookRotateSecretApi.as_view(),
        name="api-webhook-rotate-secret",
    ),
    path(
        "webhooks/<str:endpoint_id>/deliveries",
        webhook_apis.WebhookDeliveryListApi.as_view(),
        name="api-webhook-deliveries",
    ),
    path("openapi.json", SpectacularJSONAPIView.as_view(), name="api-schema"),
    path("moderations", ModerationsApi.as_view(), name="api-moderations"),
    # Last: any other /v1/ path is the JSON 404 here, since with DEBUG (make run) Django answers
    # an unmatched URL with its HTML debug page and never calls handler404.
    re_path(r"", apis.ApiPathNotFound.as_view(), name="api-not-found"),
]

urlpatterns = [
    path("v1/", include(api_v1)),
    path("healthz", apis.healthz, name="healthz"),
    path("readyz", apis.readyz, name="readyz"),
    path("metrics", apis.metrics, name="metrics"),
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
    path("ops/", ops_views.ops_console, name="ops-console"),
    path("t/<slug:tenant_slug>/", views.tenant_overview, name="tenant-overview"),
    path("t/<slug:tenant_slug>/jobs/", dashboard_views.jobs_page, name="tenant-jobs"),
    path("t/<slug:tenant_slug>/jobs/<str:job_id>/", dashboard_views.job_detail_page, name="tenant-job"),
    path(
        "t/<slug:tenant_slug>/jobs/<str:job_id>/cancel/",
        dashboard_views.job_cancel_view,
        name="tenant-job-cancel",
    ),
    path(
        "t/<slug:tenant_slug>/jobs/<str:job_id>/content/",
        dashboard_views.job_content_view,
        name="tenant-job-content",
    ),
    path("t/<slug:tenant_slug>/playground/", dashboard_views.playground_page, name="tenant-playground"),
    path("t/<slug:tenant_slug>/usage.csv", dashboard_views.usage_export_view, name="tenant-usage-csv"),
    path("t/<slug:tenant_slug>/keys/", views.api_keys_page, name="tenant-keys"),
    path(
        "t/<slug:tenant_slug>/keys/<int:key_id>/revoke/",
        views.api_key_revoke_view,
        name="tenant-key-revoke",
    ),
    path("t/<slug:tenant_slug>/members/", views.members_page, name="tenant-members"),
    path("t/<slug:tenant_slug>/audit/", views.audit_log_page, name="tenant-audit"),
    path(
        "t/<slug:tenant_slug>/members/<int:membership_id>/",
        views.member_update_view,
        name="tenant-member-update",
    ),
    path("t/<slug:tenant_slug>/webhooks/", webhook_views.webhooks_page, name="tenant-webhooks"),
    path(
        "t/<slug:tenant_slug>/webhooks/<str:endpoint_id>/",
        webhook_views.webhook_deliveries_page,
        name="tenant-webhook-deliveries",
    ),
    path(
        "t/<slug:tenant_slug>/webhooks/<str:endpoint_id>/rotate-secret/",
        webhook_views.webhook_secret_rotate_view,
        name="tenant-webhook-rotate",
    ),
    path(
        "t/<slug:tenant_slug>/webhooks/<str:endpoint_id>/<str:action>/",
        webhook_views.webhook_endpoint_action_view,
        name="tenant-webhook-action",
    ),
    path(
        "t/<slug:tenant_slug>/webhook-deliveries/<str:delivery_id>/redeliver/",
        webhook_views.webhook_redeliver_view,
        name="tenant-webhook-redeliver",
    ),
]

handler400 = "portal.views.bad_request"
handler404 = "portal.views.not_found"
handler500 = "portal.views.server_error"

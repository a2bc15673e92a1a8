from django.urls import path

from moderation import views

urlpatterns = [
    path("", views.review_queue, name="moderation-queue"),
    path("cases/<int:case_id>/", views.case_detail, name="moderation-case"),
    path("tenants/<slug:tenant_slug>/unsuspend/", views.tenant_unsuspend, name="moderation-unsuspend"),
    path("export/overturned.jsonl", views.overturned_export, name="moderation-export"),
]

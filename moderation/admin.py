from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html_join

from moderation import services
from moderation.models import (
    CaseDecision,
    ModerationCase,
    SafetyPolicy,
    SafetyPolicyAssignment,
    SafetyRule,
    TenantSuspension,
)


class _SavedThroughServicesAdmin(admin.ModelAdmin):
    """Saving and deleting go through the services, which clear the process's caches (the
    compiled rules, the resolved policies) so an edit applies at once."""

    @staticmethod
    def save_through_service(obj) -> None:
        raise NotImplementedError

    @staticmethod
    def delete_through_service(obj) -> None:
        raise NotImplementedError

    def save_model(self, request, obj, form, change):
        self.save_through_service(obj)

    def delete_model(self, request, obj):
        self.delete_through_service(obj)

    def delete_queryset(self, request, queryset):
        for obj in queryset:
            self.delete_through_service(obj)


@admin.register(SafetyRule)
class SafetyRuleAdmin(_SavedThroughServicesAdmin):
    """Moderators edit signatures here."""

    list_display = ("name", "family", "label", "enabled", "updated_at")
    list_filter = ("family", "label", "enabled")
    search_fields = ("name", "family", "pattern")
    readonly_fields = ("updated_at",)

    @staticmethod
    def save_through_service(obj) -> None:
        services.safety_rule_save(rule=obj)

    @staticmethod
    def delete_through_service(obj) -> None:
        services.safety_rule_delete(rule=obj)


class _PolicyAdmin(_SavedThroughServicesAdmin):
    @staticmethod
    def save_through_service(obj) -> None:
        services.safety_policy_save(policy=obj)

    @staticmethod
    def delete_through_service(obj) -> None:
        services.safety_policy_delete(policy=obj)


@admin.register(SafetyPolicy)
class SafetyPolicyAdmin(_PolicyAdmin):
    list_display = ("slug", "name", "block_fpr", "review_fpr", "output_window_chars",
                    "output_first_window_chars", "is_default")


@admin.register(SafetyPolicyAssignment)
class SafetyPolicyAssignmentAdmin(_PolicyAdmin):
    list_display = ("__str__", "tier", "tenant", "policy")
    autocomplete_fields = ("tenant",)


class CaseDecisionInline(admin.TabularInline):
    model = CaseDecision
    extra = 0
    can_delete = False
    readonly_fields = ("moderator", "decision", "note", "created_at")

    def has_add_permission(self, request, obj=None) -> bool:
        return False  # decisions are made in the review queue, which audits them


@admin.register(ModerationCase)
class ModerationCaseAdmin(admin.ModelAdmin):
    """Read-only: the review queue (/moderation/) is where cases are decided."""

    list_display = ("pk", "tenant", "action", "category", "score", "status", "created_at")
    list_filter = ("status", "action", "category", "source")
    search_fields = ("tenant__slug", "request_id")
    inlines = [CaseDecisionInline]
    exclude = ("prompt",)
    readonly_fields = ("retained_prompt",)

    @admin.display(description="Prompt (redacted)")
    def retained_prompt(self, obj) -> str:
        return "(deleted: its retention period ended)" if obj.prompt_expired else obj.prompt

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # a case and its decisions are the audit trail, and its strikes count


@admin.register(TenantSuspension)
class TenantSuspensionAdmin(admin.ModelAdmin):
    list_display = ("tenant", "kind", "created_at", "strike_count", "lifted_at", "lifted_by")
    list_filter = ("kind",)
    fields = readonly_fields = ("tenant", "kind", "reason", "strike_count", "strike_cases",
                                "created_at", "lifted_at", "lifted_by", "lift_note",
                                "lifted_by_decision")

    @admin.display(description="Strikes (cases)")
    def strike_cases(self, obj) -> str:
        return format_html_join(
            ", ", '<a href="{}">#{} ({})</a>',
            ((reverse("moderation-case", args=[case.pk]), case.pk, case.status)
             for case in obj.cases.order_by("pk")),
        ) or "-"

    def has_add_permission(self, request) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # lifted in the review queue (audited), never erased

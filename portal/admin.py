from django.contrib import admin, messages

from portal import services
from portal.models import ApiKey, Membership, Tenant, Tier


@admin.register(Tier)
class TierAdmin(admin.ModelAdmin):
    list_display = (
        "slug", "name", "monthly_budget_cu", "cu_per_minute", "max_concurrent_jobs",
        "queue_priority", "text_variant", "burst_cu", "fail_open",
    )


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ("user",)


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ("name", "slug", "tier", "status", "created_at")
    list_filter = ("tier", "status")
    search_fields = ("name", "slug")
    prepopulated_fields = {"slug": ("name",)}
    inlines = [MembershipInline]
    actions = ["suspend", "unsuspend"]

    @admin.action(description="Suspend selected tenants", permissions=["change"])
    def suspend(self, request, queryset):
        for tenant in queryset:
            services.tenant_suspend(tenant=tenant)

    @admin.action(description="Unsuspend selected tenants", permissions=["change"])
    def unsuspend(self, request, queryset):
        from moderation.selectors import suspension_active_for_tenant  # moderation builds on portal

        for tenant in queryset:
            if suspension_active_for_tenant(tenant=tenant) is not None:
                # Lifted here, the suspension would stay open, and the strikes after it would
                # never suspend again (one open suspension per tenant).
                self.message_user(request, f"{tenant.slug} has a moderation suspension pending "
                                           "review: lift it in the review queue (/moderation/).",
                                  level=messages.ERROR)
                continue
            services.tenant_unsuspend(tenant=tenant)


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ("user", "tenant", "role", "created_at")
    list_filter = ("role",)
    search_fields = ("user__username", "user__email", "tenant__name")
    autocomplete_fields = ("user", "tenant")


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys are issued from the dashboard (the secret is shown once there). The digest is never shown."""

    list_display = ("name", "masked", "tenant", "created_by", "created_at", "last_used_at",
                    "expires_at", "revoked_at", "cu_cap")
    list_filter = ("tenant",)
    search_fields = ("name", "prefix", "tenant__name")
    fields = ("tenant", "name", "masked", "created_by", "created_at", "last_used_at",
              "expires_at", "revoked_at", "cu_cap", "cu_per_minute")
    readonly_fields = ("tenant", "masked", "created_by", "created_at", "last_used_at", "revoked_at")
    actions = ["revoke"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke(self, request, queryset):
        for api_key in queryset:
            services.api_key_revoke(api_key=api_key)

import contextlib

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.actions import delete_selected as django_delete_selected
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.core.exceptions import ValidationError
from django.db import transaction
from django.http import HttpResponseRedirect

from portal import services
from portal.errors import InvalidParameter, NotFound
from portal.models import ApiKey, AuditEvent, Membership, Tenant, Tier


class ServiceDeleteAdmin:
    """For a model whose delete goes through a service that may refuse it (InvalidParameter:
    tenant_delete, user_delete). The confirmation page checked first, but the service decides
    again under its lock, so a refusal can still come on the POST."""

    def delete_view(self, request, object_id, extra_context=None):
        try:
            return super().delete_view(request, object_id, extra_context)
        except InvalidParameter as exc:  # refused since the page was shown: nothing was deleted
            self.message_user(request, exc.message, level=messages.ERROR)
            return HttpResponseRedirect(request.path)

    def delete_selected_all_or_nothing(self, request, queryset):
        """Django's delete action and its confirmation page in one transaction: a refusal of
        one deletes none."""
        try:
            with transaction.atomic():
                return django_delete_selected(self, request, queryset)
        except InvalidParameter as exc:
            self.message_user(request, exc.message, level=messages.ERROR)
            return None


@admin.register(Tier)
class TierAdmin(admin.ModelAdmin):
    list_display = (
        "slug", "name", "monthly_budget_cu", "cu_per_minute", "max_concurrent_jobs",
        "queue_priority", "text_variant", "burst_cu", "fail_open",
    )


class MembershipInline(admin.TabularInline):
    """Adds members; changing or removing one is on its own page (MembershipAdmin), which goes
    through the services (the last owner stays, a removed member's keys are revoked)."""

    model = Membership
    extra = 0
    autocomplete_fields = ("user",)

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Tenant)
class TenantAdmin(ServiceDeleteAdmin, admin.ModelAdmin):
    """Deleting a tenant goes through services.tenant_delete: refused while it has history that
    must be kept (its ledger, jobs, moderation cases, suspensions; suspend it instead), else its
    keys are revoked and it goes."""

    list_display = ("name", "slug", "tier", "status", "created_at")
    list_filter = ("tier", "status")
    search_fields = ("name", "slug")
    prepopulated_fields = {"slug": ("name",)}
    inlines = [MembershipInline]
    # Through the actions only: saved from the form, a suspension would skip tenant_suspend
    # (its signal stops the tenant's work) and lifting it the moderation check below.
    readonly_fields = ("status",)
    actions = ["suspend", "unsuspend", "delete_selected"]

    @admin.action(description="Suspend selected tenants", permissions=["change"])
    def suspend(self, request, queryset):
        from moderation.services import tenant_staff_suspend  # moderation builds on portal

        for tenant in queryset:
            if tenant_staff_suspend(tenant=tenant, user=request.user):
                self.log_change(request, tenant, "Suspended (admin action).")

    @admin.action(description="Unsuspend selected tenants", permissions=["change"])
    def unsuspend(self, request, queryset):
        from moderation.services import tenant_staff_unsuspend

        for tenant in queryset:
            # Lifts staff's suspension only: one for strikes stays until a moderator reviews it.
            changed = tenant_staff_unsuspend(tenant=tenant, user=request.user)
            tenant.refresh_from_db(fields=["status"])
            if changed:
                self.log_change(request, tenant, "Staff suspension lifted, a moderation one remains "
                                "(admin action)." if tenant.is_suspended else "Unsuspended (admin action).")
            if tenant.is_suspended:
                self.message_user(request, f"{tenant.slug} stays suspended: a moderation suspension "
                                           "is pending review (lift it in the review queue, "
                                           "/moderation/).", level=messages.ERROR)

    def get_deleted_objects(self, objs, request):
        # The confirmation page and the bulk action both ask this first: a refusal is listed as
        # what stops the delete, and the delete button is not offered.
        refusals = services.tenant_delete_refusals(tenants=objs)
        if refusals:
            # Not collected: the page would list the tenant's whole history, row by row, and
            # say that staff may not delete it (its admins are read-only) instead of why.
            return [str(obj) for obj in objs], {}, set(), refusals
        deleted, model_count, perms_needed, protected = super().get_deleted_objects(objs, request)
        # What goes with the tenant by design (its audit log, its last owner's membership) is
        # refused one by one in its own admin: that is no missing permission here.
        perms_needed -= {str(model._meta.verbose_name) for model in (AuditEvent, Membership)}
        return deleted, model_count, perms_needed, protected

    def delete_model(self, request, obj):
        services.tenant_delete(tenant=obj, actor=request.user)

    def delete_queryset(self, request, queryset):
        for tenant in queryset.order_by("pk"):
            with contextlib.suppress(NotFound):  # another request deleted it since the list was read
                services.tenant_delete(tenant=tenant, actor=request.user)

    @admin.action(description="Delete selected tenants", permissions=["delete"])
    def delete_selected(self, request, queryset):
        """When tenant_delete refuses one (decided under the tenant's lock), none is deleted."""
        return self.delete_selected_all_or_nothing(request, queryset)


class MembershipAdminForm(forms.ModelForm):
    class Meta:
        model = Membership
        fields = ("user", "tenant", "role", "created_at")

    def clean_role(self):
        role = self.cleaned_data["role"]
        if self.instance.pk is not None:  # the stored row: the form has not touched it yet
            try:
                services.membership_owner_rule_check(membership=self.instance, role=role)
            except InvalidParameter as exc:
                raise ValidationError(exc.message) from exc
        return role


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    """A role change and a removal go through the services, as on the dashboard: the last
    owner stays, and a removed member's keys are revoked."""

    form = MembershipAdminForm
    list_display = ("user", "tenant", "role", "created_at")
    list_filter = ("role",)
    search_fields = ("user__username", "user__email", "tenant__name")
    autocomplete_fields = ("user", "tenant")
    actions = ["remove"]

    def get_object(self, request, object_id, from_field=None):
        membership = super().get_object(request, object_id, from_field)
        if membership is None or request.method != "POST":
            return membership
        # A posted change or removal is first checked here (the form's clean_role, and
        # has_delete_permission) and then saved through the services, which lock the tenant's
        # owners: checked before that lock, demoting or removing each of the last two owners at
        # once passed both checks, and the later save's refusal was a 500. Django runs these
        # posts in one transaction (changeform_view, delete_view), so the lock taken here holds
        # until the save: a concurrent change waits, and the check sees its outcome.
        try:
            return services.membership_lock(membership=membership)
        except NotFound:  # removed since the read above
            return None

    def get_readonly_fields(self, request, obj=None):
        # Only the role changes; moving a membership to another user or tenant is a removal
        # and an addition.
        return ("user", "tenant", "created_at") if obj is not None else ()

    def get_actions(self, request):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # it would delete without the services
        return actions

    def has_delete_permission(self, request, obj=None) -> bool:
        if obj is not None:
            try:
                services.membership_owner_rule_check(membership=obj, role=None)
            except InvalidParameter:
                return False
        return super().has_delete_permission(request, obj)

    def save_model(self, request, obj, form, change):
        if change:
            services.membership_role_set_as_staff(membership=obj, role=obj.role, user=request.user)
        else:
            super().save_model(request, obj, form, change)

    def delete_model(self, request, obj):
        services.membership_remove_as_staff(membership=obj, user=request.user)

    @admin.action(description="Remove selected memberships (and revoke the keys each created)",
                  permissions=["delete"])
    def remove(self, request, queryset):
        for membership in queryset.select_related("user", "tenant"):
            try:
                with transaction.atomic():  # no log entry for a refused removal
                    self.log_deletions(request, [membership])
                    revoked = services.membership_remove_as_staff(membership=membership, user=request.user)
            except InvalidParameter as exc:
                self.message_user(request, f"{membership}: {exc.message}", level=messages.ERROR)
                continue
            except NotFound:  # another request removed it since the list was read
                self.message_user(request, f"{membership} was removed already.", level=messages.WARNING)
                continue
            self.message_user(request, f"Removed {membership}; revoked {len(revoked)} key(s).")


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
            if api_key.is_revoked:
                continue
            services.api_key_revoke(api_key=api_key, actor=request.user)
            self.log_change(request, api_key, "Revoked (admin action).")


class ReadOnlyAdmin(admin.ModelAdmin):
    """For records that are history (the audit log, the ledger): read, never edited here."""

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "tenant", "action", "actor", "actor_user", "target")
    list_filter = ("action",)
    search_fields = ("tenant__slug", "actor", "target")
    list_select_related = ("tenant", "actor_user")


admin.site.unregister(get_user_model())


@admin.register(get_user_model())
class UserAdmin(ServiceDeleteAdmin, DjangoUserAdmin):
    """Deleting an account goes through services.user_delete: its memberships are removed as the
    membership admin removes them (the keys they created revoked, audit-logged), refused where a
    tenant would be left without an owner or the account's history would go (deactivate it).
    Deactivating one (unticking Active, or the "Deactivate" action) goes through
    services.user_deactivate: the keys it created are revoked. Ticking Active again restores no
    key: the person issues new ones."""

    actions = ["deactivate", "delete_selected"]
    NO_KEYS_RESTORED = ("Ticking Active again restores no key: revoked keys stay revoked, the person "
                        "issues new ones.")

    def save_model(self, request, obj, form, change):
        was_active = change and type(obj).objects.filter(pk=obj.pk, is_active=True).exists()
        super().save_model(request, obj, form, change)  # in changeform_view's transaction
        if not obj.is_active:
            # Also on an account that was inactive already: a key of its left working (one from
            # before deactivating revoked keys) is revoked by saving it.
            revoked = services.user_deactivate(user=obj, actor=request.user)
            if was_active or revoked:
                self.message_user(request, self._deactivated_message(obj, revoked))

    @admin.action(description="Deactivate selected users (and revoke the keys each created)",
                  permissions=["change"])
    def deactivate(self, request, queryset):
        deactivated, inactive_already, revoked = 0, 0, []
        for user in queryset.order_by("pk"):
            was_active = user.is_active
            with transaction.atomic():  # the log entry with the deactivation, or neither
                revoked_now = services.user_deactivate(user=user, actor=request.user)
                if was_active or revoked_now:
                    self.log_change(request, user, f"Deactivated (admin action); revoked "
                                                   f"{len(revoked_now)} key(s).")
            deactivated += was_active
            inactive_already += not was_active
            revoked += revoked_now
        already = f" ({inactive_already} inactive already)" if inactive_already else ""
        self.message_user(request, f"Deactivated {deactivated} account(s){already}; revoked "
                                   f"{len(revoked)} key(s) they created. " + self.NO_KEYS_RESTORED)

    @classmethod
    def _deactivated_message(cls, user, revoked) -> str:
        keys = f": {', '.join(key.masked for key in revoked)}" if revoked else ""
        return (f"{user.get_username()} is deactivated; revoked {len(revoked)} key(s) it created{keys}. "
                + cls.NO_KEYS_RESTORED)

    def get_deleted_objects(self, objs, request):
        # The confirmation page and the bulk action both ask this first: a refusal is listed as
        # what stops the delete, and the delete button is not offered.
        deleted, model_count, perms_needed, protected = super().get_deleted_objects(objs, request)
        refusals = services.user_delete_refusals(users=objs)
        if refusals:
            # The page shows missing permissions instead of what is protected, and a last owner's
            # membership reads as one (MembershipAdmin.has_delete_permission): say why instead.
            perms_needed = set()
        return deleted, model_count, perms_needed, [*protected, *refusals]

    def delete_model(self, request, obj):
        services.user_delete(user=obj, actor=request.user)

    def delete_queryset(self, request, queryset):
        for user in queryset.order_by("pk"):
            services.user_delete(user=user, actor=request.user)

    @admin.action(description="Delete selected users", permissions=["delete"])
    def delete_selected(self, request, queryset):
        """When user_delete refuses one (decided under the owners' lock), none is deleted."""
        return self.delete_selected_all_or_nothing(request, queryset)

from django import forms

from portal.models import Role

# The columns' ranges: a larger number was a database error (a 500), not a message. The cap is
# also compared in mCU by Redis's Lua, whose numbers are exact to 2**53 (9e15 mCU).
API_KEY_CU_CAP_MAX = 10**12
API_KEY_CU_PER_MINUTE_MAX = 2**31 - 1  # PositiveIntegerField


class ApiKeyCreateForm(forms.Form):
    name = forms.CharField(max_length=120, label="Key name")
    expires_in_days = forms.IntegerField(
        required=False, min_value=1, max_value=3650, label="Expires after (days, optional)"
    )
    cu_cap = forms.IntegerField(required=False, min_value=1, max_value=API_KEY_CU_CAP_MAX,
                                label="Monthly CU cap (optional)")
    cu_per_minute = forms.IntegerField(
        required=False, min_value=1, max_value=API_KEY_CU_PER_MINUTE_MAX,
        label="CU per minute limit (optional)"
    )


class MemberInviteForm(forms.Form):
    email = forms.EmailField(label="Email")
    role = forms.ChoiceField(choices=Role.choices, initial=Role.MEMBER, label="Role")

    def __init__(self, *args, roles: list[Role] | None = None, **kwargs):
        """`roles`: the ones the inviter may give (Membership.roles_grantable); the form offers
        only those, so an admin is not shown an "owner" that the service would refuse."""
        super().__init__(*args, **kwargs)
        if roles is not None:
            self.fields["role"].choices = [(role.value, role.label) for role in roles]


class MemberUpdateForm(forms.Form):
    action = forms.ChoiceField(choices=[("change_role", "change role"), ("remove", "remove")])
    role = forms.ChoiceField(choices=Role.choices, required=False)

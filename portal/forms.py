from django import forms

from portal.models import Role


class ApiKeyCreateForm(forms.Form):
    name = forms.CharField(max_length=120, label="Key name")
    expires_in_days = forms.IntegerField(
        required=False, min_value=1, max_value=3650, label="Expires after (days, optional)"
    )
    cu_cap = forms.IntegerField(required=False, min_value=1, label="Monthly CU cap (optional)")
    cu_per_minute = forms.IntegerField(
        required=False, min_value=1, label="CU per minute limit (optional)"
    )


class MemberInviteForm(forms.Form):
    email = forms.EmailField(label="Email")
    role = forms.ChoiceField(choices=Role.choices, initial=Role.MEMBER, label="Role")


class MemberUpdateForm(forms.Form):
    action = forms.ChoiceField(choices=[("change_role", "change role"), ("remove", "remove")])
    role = forms.ChoiceField(choices=Role.choices, required=False)

from django import forms

from moderation.models import CaseDecision, Category, ModerationCase


class QueueFilterForm(forms.Form):
    tenant = forms.SlugField(required=False, label="Tenant slug")
    category = forms.ChoiceField(required=False, choices=[("", "any"), *Category.choices])
    min_score = forms.FloatField(required=False, min_value=0, max_value=1, label="Score at least")
    status = forms.ChoiceField(
        required=False,
        choices=[("", "open + escalated"), *ModerationCase.Status.choices],
    )


class DecisionForm(forms.Form):
    decision = forms.ChoiceField(choices=CaseDecision.Decision.choices)
    # Required to uphold or overturn (services.case_decide says so); optional to escalate.
    note = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}),
                           help_text="Why: required to uphold or overturn.")

    def offer(self, decisions: list[str]) -> None:
        """Show only these; any decision still validates, so a stale page's choice gets
        case_decide's own answer ("already escalated", "already decided")."""
        self.fields["decision"].widget.choices = [
            (value, label) for value, label in CaseDecision.Decision.choices if value in decisions
        ]


class UnsuspendForm(forms.Form):
    # Required: the note is the audit trail of why a suspension was lifted.
    note = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}))

"""Errors the safety cascade raises. Rendered by portal.errors' one handler."""

from __future__ import annotations

from collections.abc import Sequence

from portal.errors import SluiceError


class SafetyRejection(SluiceError):
    """400 `safety_rejection`: names the categories, never the rule or score that decided it."""

    code = "safety_rejection"
    http_status = 400
    default_message = "The request was rejected by the safety system."

    def __init__(self, *, categories: Sequence[str], param: str | None = None) -> None:
        categories = sorted(set(categories))
        super().__init__(
            f"The request was rejected by the safety system ({', '.join(categories)}).",
            param=param,
            extra={"categories": categories},
        )


class ClassifierUnavailable(SluiceError):
    """The trained head is missing: `python manage.py train_safety_classifier` writes it."""

    code = "safety_unavailable"
    http_status = 503
    default_message = "The safety classifier is not available. Retry later."

"""Template filters of the dashboard."""

from django import template

from quotas.cost import mcu_to_cu

register = template.Library()


@register.filter
def cu(mcu: int | None) -> str:
    """mCU (what the database stores) as CU, the unit people read."""
    return "—" if mcu is None else f"{mcu_to_cu(mcu):g}"

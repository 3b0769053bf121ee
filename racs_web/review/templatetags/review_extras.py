"""Template filters of the review site."""
import math

from django import template

register = template.Library()


@register.filter
def mjy(value, digits=2):
    """A flux in Jy shown in mJy ('' when missing or not finite)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(value):
        return ""
    return "%.*f" % (int(digits), value * 1e3)

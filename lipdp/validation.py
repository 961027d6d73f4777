"""Small argument checks shared by layers and losses."""

import math


def positive_number(name: str, value, allow_zero: bool = False) -> float:
    """``value`` as a float, or a ValueError that names the argument."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} number, got {value!r}.")
    return number

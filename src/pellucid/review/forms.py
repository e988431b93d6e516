"""The review study's form fields and their validation: every answer is a whole number in its
range or yes/no, and each problem is a message under the field it concerns."""

from __future__ import annotations

RATING_FIELDS = (("agreement", 0, 10), ("spatial", 1, 5), ("usefulness", 1, 5), ("trust", 1, 5))
START_FIELDS = (("years_experience", 0, 60), ("ai_familiarity", 1, 5), ("trust_start", 0, 10),
                ("willingness_start", 0, 10))
END_FIELDS = (("trust_end", 0, 10), ("willingness_end", 0, 10))


def whole_number(form: dict, key: str, lo: int, hi: int, label: str, errors: dict) -> int | None:
    """``form[key]`` as a whole number in [lo, hi]; otherwise None and a message in ``errors``."""
    raw = str(form.get(key, "")).strip()
    if raw == "":
        errors[key] = f"{label}: please answer"
        return None
    try:
        value = int(raw)
    except ValueError:
        errors[key] = f"{label}: {raw!r} is not a whole number"
        return None
    if not lo <= value <= hi:
        errors[key] = f"{label}: must be between {lo} and {hi}, got {value}"
        return None
    return value


def yes_no(form: dict, key: str, label: str, errors: dict) -> bool | None:
    """``form[key]`` as yes (True) or no (False); otherwise None and a message in ``errors``."""
    raw = str(form.get(key, "")).strip().lower()
    if raw not in ("yes", "no"):
        errors[key] = f"{label}: answer yes or no"
        return None
    return raw == "yes"

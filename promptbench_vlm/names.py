"""Helpers for messages about names: 'did you mean' suggestions for unknown choices."""

import difflib
from collections.abc import Iterable

from .errors import UserError


def unknown_name_error(kind: str, name: str, valid: Iterable[str]) -> UserError:
    """Build the error for an unknown `name` of `kind`, listing the valid names and the closest."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return UserError(f"unknown {kind} '{name}'.{hint} Valid: {', '.join(valid) or '(none)'}")

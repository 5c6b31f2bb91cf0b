"""Helpers for messages about names: 'did you mean' suggestions for unknown choices."""

import difflib
from collections.abc import Iterable

from .errors import UserError

MAX_LISTED = 30


def unknown_name_error(kind: str, name: str, valid: Iterable[str]) -> UserError:
    """Build the error for an unknown `name` of `kind`, listing the valid names and the closest.

    Long lists (open_clip has hundreds of models) show the closest names and the count instead.
    """
    valid = sorted(set(valid))
    close = difflib.get_close_matches(name, valid, n=5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    if len(valid) <= MAX_LISTED:
        listed = f"Valid: {', '.join(valid) or '(none)'}"
    else:
        shown = close or valid[:10]
        listed = f"Valid ({len(valid)} in all) include: {', '.join(shown)}, ..."
    return UserError(f"unknown {kind} '{name}'.{hint} {listed}")

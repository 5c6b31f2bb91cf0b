"""Registries backed by entry points: built-ins and plug-ins are found the same way.

Entry points are listed cheaply and imported only when a name is asked for, so a broken
plug-in cannot break unrelated commands. Objects registered in code (tests, notebooks) take
precedence over entry points of the same name.
"""

from __future__ import annotations

import traceback
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

from .errors import UserError
from .names import unknown_name_error

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> objects for one entry-point group, loaded lazily.

    Args:
        group: The entry-point group, e.g. ``"promptbench_vlm.learners"``.
        kind: What the objects are, for messages (``"learner"``).
        builtin: ``name -> "module:attribute"`` entries declared in code, found exactly like
            entry points (lazily, by the same path) but needing no reinstall when a release adds
            one; an installed entry point of the same name wins.
    """

    def __init__(self, group: str, kind: str, builtin: dict[str, str] | None = None):
        self.group = group
        self.kind = kind
        self._local: dict[str, T] = {}
        self._builtin = dict(builtin or {})

    def _entry_points(self) -> dict[str, EntryPoint]:
        found = {name: EntryPoint(name, value, self.group) for name, value in self._builtin.items()}
        found.update({ep.name: ep for ep in entry_points(group=self.group)})
        return found

    def register(self, name: str, obj: T) -> T:
        """Register `obj` under `name` in this process (for tests and interactive use)."""
        self._local[name] = obj
        return obj

    def names(self) -> list[str]:
        """All known names, built-in and plug-in, sorted."""
        return sorted(set(self._local) | set(self._entry_points()))

    def origin(self, name: str) -> str:
        """Where `name` comes from: the entry point's module, or 'registered in code'."""
        if name in self._local:
            return "registered in code"
        ep = self._entry_points().get(name)
        if ep is None:
            raise unknown_name_error(self.kind, name, self.names())
        dist = getattr(ep, "dist", None)
        package = f" ({dist.name})" if dist is not None else ""
        return f"{ep.value}{package}"

    def get(self, name: str) -> T:
        """Return the object for `name`, importing its entry point on first use.

        Raises:
            UserError: unknown name (listing the valid ones) or a plug-in that fails to import.
        """
        if name in self._local:
            return self._local[name]
        ep = self._entry_points().get(name)
        if ep is None:
            raise unknown_name_error(self.kind, name, self.names())
        try:
            return ep.load()
        except Exception as err:  # a broken plug-in must say which one, not crash the CLI
            raise UserError(f"{self.kind} '{name}' ({ep.value}) failed to load: {err}") from err

    def raised_inside(self, name: str, err: BaseException) -> UserError:
        """An error from the code of `name` (a TypeError while building it: options are checked
        before, so it is not a bad option) as that code's error, with the place it was raised."""
        frame = traceback.extract_tb(err.__traceback__)[-1]
        return UserError(f"{self.kind} '{name}' ({self.origin(name)}) raised {type(err).__name__}: {err} "
                         f"(at {frame.filename}:{frame.lineno}, in {frame.name})")

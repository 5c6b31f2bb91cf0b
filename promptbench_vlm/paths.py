"""Where the shipped data folders live, the same way in a wheel and in an editable install.

The top-level `templates/` and `perturbations/` folders are copied into the package by the wheel
build (hatchling force-include); an editable install or a source checkout finds them beside it.
"""

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """Return the shipped data folder `name` (``"templates"`` or ``"perturbations"``)."""
    for candidate in (_PACKAGE_DIR / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"shipped data folder '{name}' not found next to {_PACKAGE_DIR}")

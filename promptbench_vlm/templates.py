"""Template sets: plain text files, one template per line, `{}` marks the class name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .files import read_user_text
from .names import unknown_name_error
from .paths import data_dir

DEFAULT_TEMPLATES = "promptsrc60"


@dataclass(frozen=True)
class TemplateSet:
    """A named, ordered set of templates.

    Attributes:
        name: The set's name (file stem for shipped sets, the path for user files).
        templates: The templates, in file order; each has exactly one ``{}``.
    """

    name: str
    templates: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.templates)


def list_template_sets() -> list[str]:
    """Names of the template sets shipped with the package."""
    return sorted(p.stem for p in data_dir("templates").glob("*.txt"))


def parse_template_file(path: Path) -> tuple[str, ...]:
    """Read templates from `path`; blank lines and lines starting with '#' are skipped.

    The file is UTF-8; a byte-order mark (an editor's, or one left inside by concatenating files)
    is dropped, and a file that is not UTF-8 is read as Latin-1 with a warning
    (`files.read_user_text`).

    Raises:
        UserError: a line without exactly one ``{}``, an unreadable or empty file.
    """
    lines = read_user_text(path, "template file").splitlines()
    templates = []
    for lineno, line in enumerate(lines, start=1):
        text = line.replace("\ufeff", "").strip()
        if not text or text.startswith("#"):
            continue
        if text.count("{}") != 1:
            raise UserError(f"{path}:{lineno}: a template needs exactly one '{{}}' for the class name, got: {text!r}")
        templates.append(text)
    if not templates:
        raise UserError(f"template file {path} holds no templates")
    return tuple(templates)


def load_templates(name_or_path: str = DEFAULT_TEMPLATES) -> TemplateSet:
    """Load a shipped template set by name (``promptsrc60``) or a user file by path."""
    shipped = data_dir("templates") / f"{name_or_path}.txt"
    if shipped.is_file():
        return TemplateSet(name_or_path, parse_template_file(shipped))
    path = Path(name_or_path)
    if path.is_file():
        return TemplateSet(str(path), parse_template_file(path))
    if path.suffix or "/" in name_or_path:
        raise UserError(f"template file not found: {path}")
    raise unknown_name_error("template set", name_or_path, list_template_sets())

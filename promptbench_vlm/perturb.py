"""Text perturbations of filled prompts: synonym, mask, shuffle, drop and context.

Each op is a pure function of its arguments. Its random stream is seeded from a SHA-256 of
(text, class span, op, rate, seed), so a prompt perturbs the same way in every process and
call order. The class name is one protected unit: never replaced, masked or dropped, and
its words keep their order. See docs/perturbations.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from .errors import UserError
from .names import unknown_name_error
from .paths import data_dir

OPS: tuple[str, ...] = ("synonym", "mask", "shuffle", "drop", "context")
LEVELS: dict[str, float] = {"weak": 0.1, "strong": 0.5}
DEFAULT_OPS: tuple[str, ...] = ("synonym", "mask", "shuffle", "drop")

# Punctuation that ends a prompt ("dog." -> unit "dog" + final "."); it stays at the end.
_FINAL_PUNCT = frozenset(".,;:!?…")
# A word as (leading punctuation, core, trailing punctuation): lexicon look-ups use the core.
_EDGE_PUNCT = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)


def _check_op_rate(op: str, rate: float) -> None:
    """Reject an unknown op or a rate outside [0, 1] with a clear user error."""
    if op not in OPS:
        raise unknown_name_error("perturbation op", op, OPS)
    if not 0.0 <= rate <= 1.0:
        raise UserError(f"perturbation rate for '{op}' must be in [0, 1], got {rate}")


@dataclass(frozen=True)
class PerturbSpec:
    """One perturbation setting: an op at a rate, given directly or by level name.

    Attributes:
        op: One of `OPS`.
        rate: Share of candidates to edit, in [0, 1].
        level: ``"weak"`` or ``"strong"`` when the rate was given by level name, else None.
    """

    op: str
    rate: float
    level: str | None = None

    def __post_init__(self) -> None:
        _check_op_rate(self.op, self.rate)
        if self.level is not None:
            if self.level not in LEVELS:
                raise unknown_name_error("perturbation level", self.level, LEVELS)
            if LEVELS[self.level] != self.rate:
                raise UserError(f"level '{self.level}' means rate {LEVELS[self.level]}, got {self.rate}")

    @property
    def label(self) -> str:
        """Key of this setting in result files: ``synonym:weak`` or ``drop:0.3``."""
        if self.level is not None:
            return f"{self.op}:{self.level}"
        short = f"{self.rate:g}"
        return f"{self.op}:{short if float(short) == self.rate else repr(float(self.rate))}"


def _parse_item(item: str) -> PerturbSpec:
    """Parse one ``op``, ``op:level`` or ``op:rate`` item; a bare op means the weak level."""
    op, sep, amount = (part.strip() for part in item.partition(":"))
    if op not in OPS:
        raise unknown_name_error("perturbation op", op, OPS)
    if not sep:
        return PerturbSpec(op, LEVELS["weak"], "weak")
    if amount in LEVELS:
        return PerturbSpec(op, LEVELS[amount], amount)
    try:
        rate = float(amount)
    except ValueError:
        raise UserError(
            f"bad perturbation '{item}': '{amount}' is neither a level ({', '.join(LEVELS)}) nor a rate in [0, 1]"
        ) from None
    if not 0.0 <= rate <= 1.0:
        raise UserError(f"bad perturbation '{item}': rate {amount} is outside [0, 1]")
    return PerturbSpec(op, rate)


def parse_perturbations(text: str) -> list[PerturbSpec]:
    """Parse a ``--perturb`` value such as ``"synonym:0.3,drop:weak"``.

    ``"none"`` or ``""`` gives no perturbation; the item ``"default"`` stands for every op of
    `DEFAULT_OPS` at both levels. Repeated settings are kept once, in first-seen order.

    Raises:
        UserError: an unknown op (with 'did you mean'), a rate that is not a number in [0, 1].
    """
    specs: list[PerturbSpec] = []
    for item in (part.strip().lower() for part in text.split(",")):
        if item in ("", "none"):
            continue
        if item == "default":
            new = [PerturbSpec(op, rate, level) for op in DEFAULT_OPS for level, rate in LEVELS.items()]
        else:
            new = [_parse_item(item)]
        specs += [spec for spec in new if spec not in specs]
    return specs


@dataclass(frozen=True)
class Lexicon:
    """The word lists the ops draw from.

    Attributes:
        synonyms: Lower-case word or phrase -> its synonyms (words or short phrases).
        stopwords: Lower-case words that are never synonym candidates.
        noise_phrases: Mild class-agnostic phrases for the ``context`` op.
        mask_token: What ``mask`` puts in place of a unit.
    """

    synonyms: Mapping[str, tuple[str, ...]]
    stopwords: frozenset[str]
    noise_phrases: tuple[str, ...]
    mask_token: str = "[MASK]"
    _max_words: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The longest entry in words bounds the greedy phrase match.
        object.__setattr__(self, "_max_words", max((len(key.split()) for key in self.synonyms), default=0))


def _read_lines(path: Path) -> list[str]:
    """Non-blank lines of a shipped word list, '#' comments skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read word list {path}: {err}") from None
    return [" ".join(line.split()) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _read_synonyms(path: Path) -> Mapping[str, tuple[str, ...]]:
    """Read and check a ``{word or phrase: [synonyms]}`` JSON file; keys are lower-cased.

    A synonym equal to its own key is dropped, so a replacement always changes the text.
    """
    where = f"synonym lexicon {path}"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{where}: file not found") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: invalid JSON: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{where}: cannot read: {err}") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{where}: expected a non-empty JSON object {{\"word\": [\"synonym\", ...]}}")
    table: dict[str, tuple[str, ...]] = {}
    for key, values in raw.items():
        word = " ".join(key.lower().split())
        if not word:
            raise UserError(f"{where}: an entry has an empty key")
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise UserError(f"{where}: entry '{key}' must be a list of strings")
        options = tuple(dict.fromkeys(s for s in (" ".join(v.split()) for v in values) if s and s.lower() != word))
        if not options:
            raise UserError(f"{where}: entry '{key}' has no synonym different from itself")
        table[word] = options
    return MappingProxyType(table)


@functools.cache
def _shipped_lexicon() -> Lexicon:
    """The lexicon in the shipped ``perturbations/`` folder, read once on first use."""
    folder = data_dir("perturbations")
    return Lexicon(
        synonyms=_read_synonyms(folder / "synonyms.json"),
        stopwords=frozenset(word.lower() for word in _read_lines(folder / "stopwords.txt")),
        noise_phrases=tuple(_read_lines(folder / "noise_phrases.txt")),
    )


def load_lexicon(synonyms: str | Path | None = None, mask_token: str = "[MASK]") -> Lexicon:
    """Load the shipped lexicon, or a user synonym file with the shipped stop words and phrases.

    Args:
        synonyms: A JSON file ``{word or phrase: [synonyms]}``; None uses the shipped one.
        mask_token: The string ``mask`` writes in place of a unit.

    Raises:
        UserError: a missing, unreadable or malformed file (one line naming it), an empty mask.
    """
    if not mask_token.strip():
        raise UserError("the mask token must not be empty")
    shipped = _shipped_lexicon()
    if synonyms is None and mask_token == shipped.mask_token:
        return shipped
    table = shipped.synonyms if synonyms is None else _read_synonyms(Path(synonyms))
    return replace(shipped, synonyms=table, mask_token=mask_token)


def fill_template(template: str, classname: str) -> tuple[str, tuple[int, int]]:
    """Put `classname` into the ``{}`` of `template`; return the prompt and the class span.

    The span is what `perturb` needs to protect the class name.

    Raises:
        UserError: the template has not exactly one ``{}``, or the class name is blank.
    """
    if template.count("{}") != 1:
        raise UserError(f"a template needs exactly one '{{}}' for the class name, got: {template!r}")
    if not classname.strip():
        raise UserError(f"blank class name for template {template!r}")
    start = template.index("{}")
    return template[:start] + classname + template[start + 2 :], (start, start + len(classname))


class PromptUnits(NamedTuple):
    """A prompt split into word units.

    Attributes:
        units: Whitespace words; the class name (with anything glued to it) is one unit.
        cls: Index of the class unit.
        tail: Final punctuation of the prompt, kept at its end whatever the op does.
    """

    units: list[str]
    cls: int
    tail: str


def split_prompt(text: str, class_span: tuple[int, int]) -> PromptUnits:
    """Split `text` into units, the class span and the words touching it forming one unit."""
    start, end = class_span
    if not 0 <= start < end <= len(text):
        raise ValueError(f"class span {class_span} is not a non-empty span of {text!r}")
    body_end = max(len(text.rstrip()), end)
    stop = body_end
    while stop > end and text[stop - 1] in _FINAL_PUNCT:
        stop -= 1
    first, last = start, end
    while first > 0 and not text[first - 1].isspace():
        first -= 1
    while last < stop and not text[last].isspace():
        last += 1
    before, after = text[:first].split(), text[last:stop].split()
    return PromptUnits([*before, text[first:last], *after], len(before), text[stop:body_end])


def _lexicon_key(words: Sequence[str]) -> str:
    """Look-up key of a run of words: lower-case, outer punctuation removed."""
    return _EDGE_PUNCT.match(" ".join(words)).group(2).lower()


def synonym_candidates(units: Sequence[str], protected: int, lexicon: Lexicon) -> list[tuple[int, int]]:
    """Spans ``(start, stop)`` of units with a lexicon entry, found by greedy longest match.

    Matching whole phrases first lets ``black and white`` be replaced as one candidate. A
    span never crosses or includes the `protected` unit, and a stop word is never a candidate.
    """
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(units):
        length = _match_length(units, i, protected, lexicon)
        if length:
            spans.append((i, i + length))
        i += max(length, 1)
    return spans


def _match_length(units: Sequence[str], i: int, protected: int, lexicon: Lexicon) -> int:
    """Words in the longest candidate starting at unit `i` (stopping before `protected`), or 0."""
    limit = protected if i < protected else len(units)
    for n in range(min(lexicon._max_words, limit - i), 0, -1):
        key = _lexicon_key(units[i : i + n])
        if key in lexicon.synonyms and key not in lexicon.stopwords:
            return n
    return 0


def _n_edits(rate: float, n_candidates: int) -> int:
    """The spec's edit count ``k = max(1, round(rate * n))``, or 0 without a candidate."""
    return max(1, round(rate * n_candidates)) if n_candidates else 0


def _synonym_for(words: str, lexicon: Lexicon, rng: random.Random) -> str:
    """A random synonym of `words`, keeping its outer punctuation and initial capital."""
    lead, core, trail = _EDGE_PUNCT.match(words).groups()
    choice = rng.choice(lexicon.synonyms[core.lower()])
    if core[:1].isupper():
        choice = choice[:1].upper() + choice[1:]
    return lead + choice + trail


def _op_synonym(p: PromptUnits, rate: float, rng: random.Random, lexicon: Lexicon) -> tuple[list[str], int]:
    """Replace k lexicon candidates with one of their synonyms."""
    spans = synonym_candidates(p.units, p.cls, lexicon)
    chosen = sorted(rng.sample(spans, _n_edits(rate, len(spans))), reverse=True)
    units = list(p.units)
    for start, stop in chosen:
        units[start:stop] = [_synonym_for(" ".join(units[start:stop]), lexicon, rng)]
    return units, len(chosen)


def _op_mask(p: PromptUnits, rate: float, rng: random.Random, lexicon: Lexicon) -> tuple[list[str], int]:
    """Replace k non-class units with the mask token."""
    others = [i for i in range(len(p.units)) if i != p.cls]
    chosen = set(rng.sample(others, _n_edits(rate, len(others))))
    return [lexicon.mask_token if i in chosen else u for i, u in enumerate(p.units)], len(chosen)


def _op_drop(p: PromptUnits, rate: float, rng: random.Random, lexicon: Lexicon) -> tuple[list[str], int]:
    """Delete k non-class units."""
    others = [i for i in range(len(p.units)) if i != p.cls]
    chosen = set(rng.sample(others, _n_edits(rate, len(others))))
    return [u for i, u in enumerate(p.units) if i not in chosen], len(chosen)


def _op_shuffle(p: PromptUnits, rate: float, rng: random.Random, lexicon: Lexicon) -> tuple[list[str], int]:
    """Make k swaps of two units (the class unit included); only units that differ are swapped."""
    units = list(p.units)
    k = _n_edits(rate, len(units)) if len(set(units)) > 1 else 0
    for _ in range(k):
        i, j = rng.choice([(i, j) for i in range(len(units)) for j in range(i + 1, len(units)) if units[i] != units[j]])
        units[i], units[j] = units[j], units[i]
    return units, k


def _op_context(p: PromptUnits, rate: float, rng: random.Random, lexicon: Lexicon) -> tuple[list[str], int]:
    """Insert one noise phrase right after the class unit or at the end; `rate` is not used."""
    if not lexicon.noise_phrases:
        return list(p.units), 0
    phrase = rng.choice(lexicon.noise_phrases)
    at = rng.choice(sorted({p.cls + 1, len(p.units)}))
    return [*p.units[:at], phrase, *p.units[at:]], 1


_OP_FUNCS: dict[str, Callable[[PromptUnits, float, random.Random, Lexicon], tuple[list[str], int]]] = {
    "synonym": _op_synonym,
    "mask": _op_mask,
    "shuffle": _op_shuffle,
    "drop": _op_drop,
    "context": _op_context,
}


def _rng(text: str, class_span: tuple[int, int], op: str, rate: float, seed: int) -> random.Random:
    """A generator seeded by a SHA-256 of the arguments: stable across processes (no salted hash)."""
    key = repr((text, int(class_span[0]), int(class_span[1]), op, float(rate), int(seed)))
    return random.Random(int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big"))


class Perturbed(NamedTuple):
    """The result of `perturb`.

    Attributes:
        text: The perturbed prompt.
        n_edits: Edits made; 0 exactly when the text is unchanged (the op found no candidate).
    """

    text: str
    n_edits: int


def perturb(
    text: str, class_span: tuple[int, int], op: str, rate: float, seed: int, lexicon: Lexicon | None = None
) -> Perturbed:
    """Apply `op` at `rate` to the filled prompt `text`, protecting the class name.

    Args:
        text: A filled prompt, e.g. from `fill_template`.
        class_span: ``(start, end)`` character offsets of the class name in `text`.
        op: One of `OPS`.
        rate: Share of candidates to edit: ``k = max(1, round(rate * n_candidates))``.
        seed: Draw seed; with the other arguments it fixes the output.
        lexicon: Word lists; None uses the shipped ones.

    Raises:
        UserError: an unknown op or a rate outside [0, 1].
    """
    _check_op_rate(op, rate)
    prompt = split_prompt(text, class_span)
    if lexicon is None:
        lexicon = load_lexicon()
    units, edits = _OP_FUNCS[op](prompt, rate, _rng(text, class_span, op, rate, seed), lexicon)
    new_text = " ".join(units) + prompt.tail
    return Perturbed(text, 0) if edits == 0 or new_text == text else Perturbed(new_text, edits)

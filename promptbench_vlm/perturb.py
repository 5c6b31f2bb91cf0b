"""Text perturbations of filled prompts: synonym, mask, shuffle, drop and context.

Each op is a pure function of its arguments. Its random stream is seeded from a SHA-256 of
(text, class span, op, amount, seed), so a prompt perturbs the same way in every process and
call order. The class name is one protected unit: never replaced, masked or dropped, and
its words keep their order. The levels are edit counts, not draws: ``strong`` makes at least
one edit more than ``weak`` wherever the prompt has room for it, and an explicit rate 0 is the
identity. Articles an edit leaves in front of a new word are made to agree ("an image" ->
"a picture"). See docs/perturbations.md.
"""

from __future__ import annotations

import _random
import functools
import hashlib
import json
import random
import re
import threading
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from .articles import ARTICLES, agree, wants_an
from .errors import UserError
from .names import unknown_name_error
from .paths import data_dir

OPS: tuple[str, ...] = ("synonym", "mask", "shuffle", "drop", "context")
LEVELS: dict[str, float] = {"weak": 0.1, "strong": 0.5}
# Every op is in the default evaluation: `context` (ANPrompt's weak semantic perturbation) is the
# reference point against which the other four are the strong noise.
DEFAULT_OPS: tuple[str, ...] = OPS

# Punctuation that ends a prompt ("dog." -> unit "dog" + final "."); it stays at the end.
_FINAL_PUNCT = frozenset(".,;:!?…")
# A word as (leading punctuation, core, trailing punctuation): lexicon look-ups use the core.
_EDGE_PUNCT = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)


Amount = float | str
"""How much an op changes a prompt: a level name of `LEVELS` or a rate in [0, 1]."""


def _check_op_amount(op: str, amount: Amount) -> None:
    """Reject an unknown op, level or a rate outside [0, 1] with a clear user error."""
    if op not in OPS:
        raise unknown_name_error("perturbation op", op, OPS)
    if isinstance(amount, str):
        if amount not in LEVELS:
            raise unknown_name_error("perturbation level", amount, LEVELS)
    elif not 0.0 <= amount <= 1.0:
        raise UserError(f"perturbation rate for '{op}' must be in [0, 1], got {amount}")


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
        _check_op_amount(self.op, self.rate)
        if self.level is not None:
            if self.level not in LEVELS:
                raise unknown_name_error("perturbation level", self.level, LEVELS)
            if LEVELS[self.level] != self.rate:
                raise UserError(f"level '{self.level}' means rate {LEVELS[self.level]}, got {self.rate}")

    @property
    def amount(self) -> Amount:
        """What `perturb` takes: the level name when there is one (levels are edit-count rules,
        not just rates), else the rate."""
        return self.level if self.level is not None else self.rate

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
        noise_phrases: Mild class-agnostic phrases for the ``context`` op, by group; one prompt
            never gets two phrases of a group (they could contradict each other).
        mask_token: What ``mask`` puts in place of a unit.
    """

    synonyms: Mapping[str, tuple[str, ...]]
    stopwords: frozenset[str]
    noise_phrases: Mapping[str, tuple[str, ...]]
    mask_token: str = "[MASK]"
    _max_words: int = field(init=False, repr=False, compare=False)
    # What the ops find in a template's words under this lexicon (candidates, synonym parts), per
    # `_Frame`: the same for every class name, so a prompt table looks it up once per template.
    _memo: dict[_Frame, dict[str, object]] = field(default_factory=dict, init=False, repr=False, compare=False)

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


def _read_phrase_groups(path: Path) -> Mapping[str, tuple[str, ...]]:
    """Phrases of a word list under ``[group]`` header lines."""
    groups: dict[str, list[str]] = {}
    current = None
    for line in _read_lines(path):
        if line.startswith("[") and line.endswith("]"):
            current = groups.setdefault(line[1:-1].strip(), [])
        elif current is None:
            raise UserError(f"{path}: phrase {line!r} comes before any [group] header")
        else:
            current.append(line)
    return MappingProxyType({name: tuple(phrases) for name, phrases in groups.items() if phrases})


@functools.cache
def _shipped_lexicon() -> Lexicon:
    """The lexicon in the shipped ``perturbations/`` folder, read once on first use."""
    folder = data_dir("perturbations")
    return Lexicon(
        synonyms=_read_synonyms(folder / "synonyms.json"),
        stopwords=frozenset(word.lower() for word in _read_lines(folder / "stopwords.txt")),
        noise_phrases=_read_phrase_groups(folder / "noise_phrases.txt"),
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


class _Frame:
    """A prompt's split around its class name, which depends only on the text before and after it.

    The class unit is ``glue_left + class name + glue_right`` (the words touching the name); the
    other units, the final punctuation and the lead are the template's. One object per distinct
    (before, after) pair (`_frame` is cached), so it serves as an identity key of `Lexicon._memo`.
    """

    __slots__ = ("before", "after", "glue_left", "glue_right", "tail")

    def __init__(self, before: list[str], after: list[str], glue_left: str, glue_right: str, tail: str):
        self.before, self.after, self.glue_left, self.glue_right, self.tail = before, after, glue_left, glue_right, tail


@functools.lru_cache(maxsize=4096)
def _frame(pre: str, post: str) -> _Frame:
    """The `_Frame` of a prompt ``pre + class name + post``: where the class unit starts and ends,
    and where the final punctuation begins, are decided by `pre` and `post` alone (the walks from
    the class span outwards never enter it; trailing blanks end the body at the name at most)."""
    body_end = len(post.rstrip())
    stop = body_end
    while stop > 0 and post[stop - 1] in _FINAL_PUNCT:
        stop -= 1
    first, last = len(pre), 0
    while first > 0 and not pre[first - 1].isspace():
        first -= 1
    while last < stop and not post[last].isspace():
        last += 1
    return _Frame(pre[:first].split(), post[last:stop].split(), pre[first:], post[:last], post[stop:body_end])


class PromptUnits(NamedTuple):
    """A prompt split into word units.

    Attributes:
        units: Whitespace words; the class name (with anything glued to it) is one unit.
        cls: Index of the class unit.
        tail: Final punctuation of the prompt, kept at its end whatever the op does.
        lead: Characters glued in front of the class name inside its unit (a quote, say).
    """

    units: list[str]
    cls: int
    tail: str
    lead: int = 0


def split_prompt(text: str, class_span: tuple[int, int]) -> PromptUnits:
    """Split `text` into units, the class span and the words touching it forming one unit."""
    return _split(text, class_span)[0]


def _split(text: str, class_span: tuple[int, int]) -> tuple[PromptUnits, _Frame]:
    """`split_prompt`, and the frame the units come from."""
    start, end = class_span
    if not 0 <= start < end <= len(text):
        raise ValueError(f"class span {class_span} is not a non-empty span of {text!r}")
    frame = _frame(text[:start], text[end:])
    unit = frame.glue_left + text[start:end] + frame.glue_right
    return PromptUnits([*frame.before, unit, *frame.after], len(frame.before), frame.tail, len(frame.glue_left)), frame


def _lexicon_key(words: Sequence[str]) -> str:
    """Look-up key of a run of words: lower-case, outer punctuation removed."""
    return _EDGE_PUNCT.match(" ".join(words)).group(2).lower()


def synonym_candidates(units: Sequence[str], protected: int, lexicon: Lexicon) -> list[tuple[int, int]]:
    """Spans ``(start, stop)`` of units with a lexicon entry, found by greedy longest match.

    Matching whole phrases first lets ``black and white`` be replaced as one candidate. A
    span never starts at, crosses or includes the `protected` unit (the class name, even when
    it is itself a lexicon key), and a stop word is never a candidate.
    """
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(units):
        length = _match_length(units, i, protected, lexicon) if i != protected else 0
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


@functools.lru_cache(maxsize=4096)
def edit_count(op: str, amount: Amount, room: int) -> int:
    """How many edits `op` makes at `amount` on a prompt with `room` candidates.

    A rate r gives ``round(r * room)``, but at least the op's smallest edit (one unit; two for
    `shuffle`, which cannot move a unit alone) and at most `room`; rate 0 gives 0, the identity.
    ``weak`` is rate 0.1. ``strong`` is rate 0.5 and at least one edit more than ``weak``, so
    it is strictly larger wherever the prompt has room for it.

    Args:
        op: One of `OPS`.
        amount: A level name or a rate in [0, 1].
        room: Candidates: synonym spans (`synonym`), non-class units (`mask`, `drop`), units that
            can move at once (`shuffle`), phrase groups (`context`).
    """
    least = 2 if op == "shuffle" else 1
    if room < least:
        return 0

    def at(rate: float) -> int:
        return 0 if rate == 0 else min(room, max(least, round(rate * room)))

    if amount == "strong":
        return min(room, max(at(LEVELS["weak"]) + 1, at(LEVELS["strong"])))
    return at(LEVELS[amount] if isinstance(amount, str) else amount)


class Edited(NamedTuple):
    """What an op did: the new units, where the class unit went, and how many edits it made."""

    units: list[str]
    cls: int
    edits: int


# `random.Random` draws an integer below n as getrandbits(n.bit_length()) until it is below n.
_RANDBELOW_BY_BITS = random.Random._randbelow is random.Random._randbelow_with_getrandbits


def _sample(rng: random.Random, population: Sequence, k: int) -> list:
    """``rng.sample(population, k)``: the same draws and result, without its set-up and calls on
    the small populations of a prompt (the pool branch `random.Random.sample` takes for up to 21
    items, with its `_randbelow` written out)."""
    n = len(population)
    if n > 21 or not 0 <= k <= n or not _RANDBELOW_BY_BITS:
        return rng.sample(population, k)
    getrandbits, pool, result = rng.getrandbits, list(population), [None] * k
    for i in range(k):
        below = n - i
        bits = below.bit_length()
        j = getrandbits(bits)
        while j >= below:
            j = getrandbits(bits)
        result[i] = pool[j]
        pool[j] = pool[n - i - 1]
    return result


def _synonym_parts(words: str, lexicon: Lexicon) -> tuple[str, tuple[str, ...], bool, str]:
    """What a replacement of `words` keeps: outer punctuation, the synonyms of its core, and
    whether the core starts with a capital."""
    lead, core, trail = _EDGE_PUNCT.match(words).groups()
    return lead, lexicon.synonyms[core.lower()], core[:1].isupper(), trail


def _synonym_spans(p: PromptUnits, lexicon: Lexicon, memo: dict) -> tuple[list[tuple[int, int]], dict]:
    """The template's synonym candidates and each one's `_synonym_parts`, found once per template
    (spans never touch the class unit: the template's words decide them)."""
    if "synonym" not in memo:
        spans = synonym_candidates(p.units, p.cls, lexicon)
        memo["synonym"] = spans, {(a, b): _synonym_parts(" ".join(p.units[a:b]), lexicon) for a, b in spans}
    return memo["synonym"]


def _op_synonym(p: PromptUnits, amount: Amount, rng: random.Random, lexicon: Lexicon, memo: dict) -> Edited:
    """Replace k lexicon candidates (words or phrases) with one of their synonyms, keeping each
    one's outer punctuation and initial capital."""
    spans, parts = _synonym_spans(p, lexicon, memo)
    chosen = sorted(_sample(rng, spans, edit_count("synonym", amount, len(spans))), reverse=True)
    units, cls = list(p.units), p.cls
    for start, stop in chosen:
        lead, options, capital, trail = parts[start, stop]
        choice = rng.choice(options)
        if capital:
            choice = choice[:1].upper() + choice[1:]
        units[start:stop] = [lead + choice + trail]
        if stop <= cls:
            cls -= stop - start - 1
    return Edited(units, cls, len(chosen))


def _op_mask(p: PromptUnits, amount: Amount, rng: random.Random, lexicon: Lexicon, memo: dict) -> Edited:
    """Replace k non-class units (not already the mask token) with the mask token."""
    if "mask" not in memo:
        memo["mask"] = [i for i, unit in enumerate(p.units) if i != p.cls and unit != lexicon.mask_token]
    others = memo["mask"]
    chosen = set(_sample(rng, others, edit_count("mask", amount, len(others))))
    return Edited([lexicon.mask_token if i in chosen else u for i, u in enumerate(p.units)], p.cls, len(chosen))


def _op_drop(p: PromptUnits, amount: Amount, rng: random.Random, lexicon: Lexicon, memo: dict) -> Edited:
    """Delete k non-class units."""
    others = [i for i in range(len(p.units)) if i != p.cls]
    chosen = set(_sample(rng, others, edit_count("drop", amount, len(others))))
    cls = p.cls - sum(1 for i in chosen if i < p.cls)
    return Edited([u for i, u in enumerate(p.units) if i not in chosen], cls, len(chosen))


def _can_move(counts: Collection[int], m: int) -> bool:
    """Whether m units can all change place, given how often each unit text occurs: exactly when
    m positions can be picked with no text on more than half of them."""
    return sum(min(c, m // 2) for c in counts) >= m


def most_movable(units: Sequence[str]) -> int:
    """The most units one rearrangement can move at once (0 when fewer than two differ).

    Repeated words ("a ... a") limit the count: no text may fill more than half the moved places.
    """
    return _most_movable(Counter(units).values())


def _most_movable(counts: Collection[int]) -> int:
    """`most_movable` of units whose texts occur `counts` times."""
    return next((m for m in range(sum(counts), 1, -1) if _can_move(counts, m)), 0)


def _rearrangement(units: Sequence[str], k: int, rng: random.Random) -> list[int]:
    """A random order of `units` (``order[i]`` = the unit now at position i) that moves exactly k.

    k positions are drawn with no text on more than half of them, then permuted so that every
    one of them receives a different text: a random permutation when one of a few draws does,
    else a rotation of the positions grouped by text by the largest group's size.
    """
    cap, taken, chosen = k // 2, Counter(), []
    for i in _sample(rng, range(len(units)), len(units)):
        if taken[units[i]] < cap:
            taken[units[i]] += 1
            chosen.append(i)
            if len(chosen) == k:
                break
    chosen.sort()
    for _ in range(_PERMUTATION_DRAWS):
        sources = _sample(rng, chosen, k)
        if all(units[s] != units[c] for c, s in zip(chosen, sources)):
            break
    else:
        grouped = sorted(chosen, key=lambda i: (units[i], i))
        shift = max(taken.values())
        source_of = {grouped[j]: grouped[(j + shift) % k] for j in range(k)}
        sources = [source_of[c] for c in chosen]
    order = list(range(len(units)))
    for c, s in zip(chosen, sources):
        order[c] = s
    return order


_PERMUTATION_DRAWS = 20
_SHUFFLE_DRAWS = 5


def _moved_count(counts: Collection[int], amount: Amount) -> int:
    """How many units a shuffle at `amount` moves, given how often each unit text occurs."""
    k = edit_count("shuffle", amount, _most_movable(counts))
    while k and not _can_move(counts, k):  # two texts only ("a b a b"): an odd count cannot all move
        k += 1  # `room` itself can, so this stops there at the latest
    return k


def _op_shuffle(p: PromptUnits, amount: Amount, rng: random.Random, lexicon: Lexicon, memo: dict) -> Edited:
    """Move k units (the class unit included, as one block) so that each lands where another
    text stood: moves never cancel, so the prompt always changes when two units can move."""
    if "shuffle" not in memo:  # the template's unit texts, counted
        memo["shuffle"] = Counter(p.units[: p.cls] + p.units[p.cls + 1 :])
    if p.units[p.cls] in memo["shuffle"]:  # the class unit repeats a template word: count it in
        k = _moved_count(Counter(p.units).values(), amount)
    elif (found := memo.get(("shuffle", amount))) is not None:
        k = found
    else:  # a class unit of its own: the same count for every class name
        k = memo["shuffle", amount] = _moved_count([*memo["shuffle"].values(), 1], amount)
    if k == 0:
        return Edited(list(p.units), p.cls, 0)
    original = " ".join(p.units)
    for _ in range(_SHUFFLE_DRAWS):
        order = _rearrangement(p.units, k, rng)
        if " ".join(p.units[j] for j in order) != original:
            return Edited([p.units[j] for j in order], order.index(p.cls), k)
    # A class name made of its neighbours' words ("a" next to "a a") can hide a move: swap the
    # first two units whose exchange shows, if any.
    n = len(p.units)
    for i, j in ((i, j) for i in range(n) for j in range(i + 1, n)):
        order = list(range(n))
        order[i], order[j] = j, i
        if " ".join(p.units[x] for x in order) != original:
            return Edited([p.units[x] for x in order], order.index(p.cls), 2)
    return Edited(list(p.units), p.cls, 0)


def _op_context(p: PromptUnits, amount: Amount, rng: random.Random, lexicon: Lexicon, memo: dict) -> Edited:
    """Insert k mild phrases, each from another group, right after the class unit or at the end."""
    groups = list(lexicon.noise_phrases.values())
    phrases = [rng.choice(group) for group in _sample(rng, groups, edit_count("context", amount, len(groups)))]
    slots = sorted({p.cls + 1, len(p.units)})
    placed: dict[int, list[str]] = {slot: [] for slot in slots}
    for phrase in phrases:
        placed[rng.choice(slots)].append(phrase)
    units = list(p.units)
    for slot in reversed(slots):  # every slot lies after the class unit: its index stays
        units[slot:slot] = placed[slot]
    return Edited(units, p.cls, len(phrases))


_OP_FUNCS: dict[str, Callable[[PromptUnits, Amount, random.Random, Lexicon, dict], Edited]] = {
    "synonym": _op_synonym,
    "mask": _op_mask,
    "shuffle": _op_shuffle,
    "drop": _op_drop,
    "context": _op_context,
}


def _words(units: Sequence[str], cls: int) -> tuple[list[str], int]:
    """`units` as words, the class unit kept whole (its own words are not the op's to touch), and
    the index of the class unit among them."""
    words: list[str] = []
    for unit in units[:cls]:
        words += unit.split()
    at = len(words)
    words.append(units[cls])
    for unit in units[cls + 1 :]:
        words += unit.split()
    return words, at


_ARTICLE_FORMS = frozenset(form for a in ARTICLES for form in (a, a.capitalize(), a.upper()))


def _article_pairs(words: Sequence[str]) -> set[tuple[str, str]]:
    """(article in lower case, next word) of every article in `words`."""
    return {(a.lower(), b) for a, b in zip(words, words[1:]) if a in _ARTICLE_FORMS}


def _agreeing_words(before: PromptUnits, after: Edited,
                    old_pairs: Callable[[], set[tuple[str, str]]] | None = None) -> tuple[list[str], int]:
    """The edited prompt's words with every "a"/"an" that now precedes a word it did not precede
    before made to agree with it; also the index of the class unit among the words.

    Pairs the template already had ("a origami {}") are left as they are: they are the
    template's wording, not the op's. `old_pairs`, when given, returns those pairs of `before`
    (`perturb` takes most of them from its template memo).
    """
    words, cls = _words(after.units, after.cls)
    if _ARTICLE_FORMS.isdisjoint(words):
        return words, cls
    pairs: set[tuple[str, str]] | None = None  # built only for a prompt that has an article
    for j in reversed(range(len(words) - 1)):  # right to left: a word is final before its article is chosen
        if j != cls and words[j] in _ARTICLE_FORMS:
            if pairs is None:
                pairs = old_pairs() if old_pairs is not None else _article_pairs(_words(before.units, before.cls)[0])
            if (words[j].lower(), words[j + 1]) not in pairs:
                words[j] = agree(words[j], words[j + 1])
    return words, cls


def _frame_pairs(p: PromptUnits, memo: dict) -> set[tuple[str, str]]:
    """`_article_pairs` of a split prompt's words: the pairs away from the class unit come from the
    template memo (the template's units are single words), the at most two touching it are added."""
    if "pairs" not in memo:
        memo["pairs"] = _article_pairs(p.units[: p.cls]) | _article_pairs(p.units[p.cls + 1 :])
    near = p.units[max(p.cls - 1, 0) : p.cls + 2]
    touching = _article_pairs(near)
    return memo["pairs"] | touching if touching else memo["pairs"]


def _edit_vocabulary(p: PromptUnits, lexicon: Lexicon, memo: dict) -> frozenset[str]:
    """Every word other than the class unit that an op can leave in an edited prompt of this
    template: its own words, the synonyms of its candidates as a replacement writes them
    (outer punctuation kept, capital or not), the mask token's and the noise phrases' words,
    and the article forms agreement writes."""
    if "vocabulary" not in memo:
        words = {*p.units[: p.cls], *p.units[p.cls + 1 :], *lexicon.mask_token.split(), *_ARTICLE_FORMS}
        for group in lexicon.noise_phrases.values():
            words.update(word for phrase in group for word in phrase.split())
        for lead, options, _, trail in _synonym_spans(p, lexicon, memo)[1].values():
            for option in options:
                words.update((lead + option + trail).split())
                words.update((lead + option[:1].upper() + option[1:] + trail).split())
        memo["vocabulary"] = frozenset(words)
    return memo["vocabulary"]


def _assembly(p: PromptUnits, edited: Edited, memo: dict) -> tuple[str, str]:
    """``(prefix, suffix)`` of the edited prompt's text around its class unit, articles made to agree."""
    words, cls = _agreeing_words(p, edited, lambda: _frame_pairs(p, memo))
    return " ".join(words[:cls]) + (" " if cls else ""), "".join(" " + w for w in words[cls + 1 :]) + p.tail


_MEMO_FRAMES = 4096  # templates a lexicon remembers its findings for (a prompt table has 60)
_GENERATORS = threading.local()  # one reseeded generator per thread: seeding is a perturbation's largest cost


def _reseeder(op: str, amount: Amount, seed: int) -> Callable[[str, tuple[int, int]], random.Random]:
    """``rng(text, class_span)``: the thread's generator reseeded by a SHA-256 of the arguments,
    stable across processes (no salted hash).

    The key is the ``repr`` of ``(text, start, end, op, amount, seed)``, written as that string
    directly (the part after the span once per call of this function). The generator is reseeded
    in place (the C seeding `random.Random(n)` runs, without building a new object); it is valid
    until the thread's next reseeding.
    """
    how = amount if isinstance(amount, str) else float(amount)
    rest = f", {op!r}, {how!r}, {int(seed)!r})".encode("utf-8")
    rng = getattr(_GENERATORS, "rng", None)
    if rng is None:
        rng = _GENERATORS.rng = random.Random(0)
    reseed, sha256, from_bytes = _random.Random.seed, hashlib.sha256, int.from_bytes

    def reseeded(text: str, class_span: tuple[int, int]) -> random.Random:
        key = f"({text!r}, {int(class_span[0])!r}, {int(class_span[1])!r}".encode("utf-8") + rest
        reseed(rng, from_bytes(sha256(key).digest()[:8], "big"))
        return rng

    return reseeded


class Perturbed(NamedTuple):
    """The result of `perturb`.

    Attributes:
        text: The perturbed prompt.
        n_edits: Edits made (units moved, for shuffle); 0 exactly when the text is unchanged.
        class_span: ``(start, end)`` of the class name in `text`, for a further op.
    """

    text: str
    n_edits: int
    class_span: tuple[int, int]


def perturb(
    text: str, class_span: tuple[int, int], op: str, rate: Amount, seed: int, lexicon: Lexicon | None = None
) -> Perturbed:
    """Apply `op` at `rate` to the filled prompt `text`, protecting the class name.

    Args:
        text: A filled prompt, e.g. from `fill_template`.
        class_span: ``(start, end)`` character offsets of the class name in `text`.
        op: One of `OPS`.
        rate: A level name (``"weak"``, ``"strong"``) or a share of candidates in [0, 1]; see
            `edit_count`. Rate 0 returns `text` unchanged.
        seed: Draw seed; with the other arguments it fixes the output.
        lexicon: Word lists; None uses the shipped ones.

    Raises:
        UserError: an unknown op or level, or a rate outside [0, 1].
    """
    return perturb_many([(text, class_span)], op, rate, seed, lexicon)[0]


def perturb_many(
    filled: Sequence[tuple[str, tuple[int, int]]], op: str, rate: Amount, seed: int, lexicon: Lexicon | None = None
) -> list[Perturbed]:
    """`perturb` of each ``(text, class_span)`` of `filled` under one op, rate and seed: the
    same outputs, with the checks and look-ups they share done once (a prompt table's cell is
    one template filled with every class name)."""
    _check_op_amount(op, rate)
    if lexicon is None:
        lexicon = load_lexicon()
    op_func, rng, memos = _OP_FUNCS[op], _reseeder(op, rate, seed), lexicon._memo
    # The text around the class unit is the same for every class name that is none of the words
    # an edit can write (nor an article), given the frame, the other units and the article the
    # name takes: the agreement compares pairs of words, and such a name is in no pair but its own.
    assembled: dict[tuple, tuple[str, str]] = {}
    out: list[Perturbed] = []
    for text, class_span in filled:
        prompt, frame = _split(text, class_span)
        memo = memos.get(frame)
        if memo is None:
            memo = {}
            if len(memos) < _MEMO_FRAMES:
                memos[frame] = memo
        edited = op_func(prompt, rate, rng(text, class_span), lexicon, memo)
        if edited.edits == 0:
            out.append(Perturbed(text, 0, (int(class_span[0]), int(class_span[1]))))
            continue
        unit, cls = prompt.units[prompt.cls], edited.cls
        if unit in _edit_vocabulary(prompt, lexicon, memo):
            prefix, suffix = _assembly(prompt, edited, memo)
        else:
            key = (frame, cls, wants_an(unit), *edited.units[:cls], *edited.units[cls + 1 :])
            if key not in assembled:
                assembled[key] = _assembly(prompt, edited, memo)
            prefix, suffix = assembled[key]
        new_text = prefix + unit + suffix
        if new_text == text:
            out.append(Perturbed(text, 0, (int(class_span[0]), int(class_span[1]))))
            continue
        start = len(prefix) + prompt.lead
        out.append(Perturbed(new_text, edited.edits, (start, start + class_span[1] - class_span[0])))
    return out

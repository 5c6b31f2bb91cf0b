"""Worst-case wordings: a budgeted beam search for the meaning-preserving wording a learner fails on.

Image features do not depend on the wording, so they are encoded once per split (through the
evaluator's `image_features`, with its cache); every candidate wording costs only the C text
encodings of its filled prompts (through `text_features`, with its cache). The search space is
the templates reachable from a start set by lexicon edits (`neighbours`); the class slot ``{}``
is one protected unit that no edit touches. The search picks wordings on the *search* images and
the result reports them on disjoint *report* images, so the worst-case accuracy is not the
minimum of noise over many tries on the same images. See docs/attack.md.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .articles import agree
from .data import ImageDataset, load_dataset
from .errors import UserError
from .evaluate import ImageFeatures, image_features, score_templates, text_features
from .evaluation import (EvalInputs, EvalRequest, Note, feature_cache, load_evaluated_learner, load_inputs,
                         output_path, run_block)
from .learners import is_checkpoint, learner_class
from .learners.base import PromptLearner, read_checkpoint
from .metrics import bootstrap_intervals
from .names import unknown_name_error
from .perturb import _EDGE_PUNCT, Edited, Lexicon, PromptUnits, _agreeing_words, split_prompt, synonym_candidates
from .results import read_schema_file, schema_errors, write_json
from .templates import TemplateSet

ATTACK_SCHEMA = "promptbench_vlm/attack"
ATTACK_SCHEMA_VERSION = 1
ATTACK_SCHEMA_FILE = Path(__file__).resolve().parent / "schemas" / "attack.schema.json"
ATTACK_REQUIRES: tuple[str, ...] = ("unconditional",)
"""The learner capabilities (`train.method.CAPABILITIES`) the search relies on: a wording is scored
from text features encoded once for every image, so they must not depend on the image."""
OBJECTIVES: tuple[str, ...] = ("accuracy", "loss", "sensitivity")
DEFAULT_ATTACK_OUTPUT = "results/attack__{learner}__{dataset}__{split}__{time}.json"
# Determiners an edit may swap or drop; "a"/"an" count as one (agreement picks the form).
DETERMINERS: tuple[str, ...] = ("a", "the", "this", "my")
_ARTICLE_WORDS = frozenset({"a", "an"})
_DETERMINER_WORDS = frozenset(DETERMINERS) | _ARTICLE_WORDS
SLOT = "{}"


@dataclass(frozen=True)
class AttackSettings:
    """How the search runs; recorded in the result file.

    Attributes:
        budget: Wordings scored in all, the start set included: at most ``budget x C`` new
            prompt strings are encoded.
        beam: Wordings expanded per round (the worst ones found so far with edit room left).
        max_edits: Edits allowed on the path from a start template (the documented meaning guard).
        objective: ``accuracy`` (minimised), ``loss`` (mean cross-entropy, maximised) or
            ``sensitivity`` (the wording's share of S(θ): mean over images of the squared gap
            between its true-class probability and the start set's mean, maximised).
        search_split: ``half`` (a seeded, class-stratified half of the images of the dataset
            split searches, the other half reports) or a dataset split name (e.g. ``val``)
            that searches while the request's split reports.
        top: Worst wordings listed in the result.
        seed: Fixes the half split and the order in which candidates are tried.
    """

    budget: int = 300
    beam: int = 8
    max_edits: int = 3
    objective: str = "accuracy"
    search_split: str = "half"
    top: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise unknown_name_error("attack objective", self.objective, OBJECTIVES)
        for name in ("budget", "beam", "max_edits", "top"):
            if getattr(self, name) < 1:
                raise UserError(f"attack {name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


@dataclass
class Wording:
    """A scored template and how it was reached.

    Attributes:
        template: The wording, with ``{}`` for the class name.
        start: The start template its path begins at.
        path: The edits from `start`, each ``{"op", "detail", "template"}`` (the result after it).
        groups: Context-phrase groups already inserted (one phrase per group at most).
        search: Objective values on the search images: ``acc``, ``loss``, ``sensitivity``.
        report: The same on the report images (never read by the search).
    """

    template: str
    start: str
    path: list[dict[str, str]] = field(default_factory=list)
    groups: frozenset[str] = frozenset()
    search: dict[str, float] = field(default_factory=dict)
    report: dict[str, float] = field(default_factory=dict)
    report_correct: np.ndarray | None = field(default=None, repr=False)
    """Per report image, whether this wording classifies it right (for intervals and paired tests)."""

    def badness(self, objective: str) -> float:
        """What the search maximises: error, loss or sensitivity on the search images."""
        return -self.search["acc"] if objective == "accuracy" else self.search[objective]


# ----------------------------------------------------------------------------------------------
# The edit space
# ----------------------------------------------------------------------------------------------

def template_units(template: str) -> PromptUnits:
    """`template` as word units, the ``{}`` slot (and anything glued to it) one protected unit."""
    if template.count(SLOT) != 1:
        raise UserError(f"a template needs exactly one '{{}}' for the class name, got: {template!r}")
    start = template.index(SLOT)
    return split_prompt(template, (start, start + len(SLOT)))


def _join(before: PromptUnits, units: list[str], cls: int, tail: str) -> str:
    """The template of edited `units`, with articles an edit put before a new word made to agree."""
    words, _ = _agreeing_words(before, Edited(units, cls, 1))
    return " ".join(words) + tail


def neighbours(template: str, lexicon: Lexicon, used_groups: frozenset[str] = frozenset()
               ) -> list[tuple[str, str, str, frozenset[str]]]:
    """Every wording one edit away from `template`, as ``(template, op, detail, groups)``.

    The edits: a lexicon synonym for a word or phrase (``synonym``); a mild context phrase of a
    group not yet used, after the class slot or at the end (``context``); a determiner swapped
    for another (``determiner``: a/the/this/my; never "a" straight before the class slot, whose
    sound is the class's); a determiner or the final punctuation dropped (``drop``). No edit
    touches the class slot, and every result keeps it. Duplicates and no-ops are left out.
    """
    p = template_units(template)
    out: dict[str, tuple[str, str, str, frozenset[str]]] = {}

    def add(units: list[str], cls: int, op: str, detail: str, tail: str = p.tail,
            groups: frozenset[str] = used_groups) -> None:
        text = _join(p, units, cls, tail)
        if text != template and text.count(SLOT) == 1 and text not in out:
            out[text] = (text, op, detail, groups)

    for start, stop in synonym_candidates(p.units, p.cls, lexicon):
        old = " ".join(p.units[start:stop])
        for choice in _synonyms_of(old, lexicon):
            units = [*p.units[:start], choice, *p.units[stop:]]
            add(units, p.cls - (stop - start - 1) if stop <= p.cls else p.cls, "synonym", f"{old} -> {choice}")
    for group, phrases in lexicon.noise_phrases.items():
        if group in used_groups:
            continue
        for phrase in phrases:
            for slot in sorted({p.cls + 1, len(p.units)}):
                units = [*p.units[:slot], phrase, *p.units[slot:]]
                add(units, p.cls, "context", f"+ {phrase!r}", groups=used_groups | {group})
    for i, unit in enumerate(p.units):
        if i == p.cls or unit.lower() not in _DETERMINER_WORDS:
            continue
        for other in DETERMINERS:
            if other == unit.lower() or (other == "a" and unit.lower() in _ARTICLE_WORDS):
                continue
            if other == "a" and i + 1 == p.cls:
                continue
            new = other.capitalize() if unit[:1].isupper() else other
            add([*p.units[:i], new, *p.units[i + 1:]], p.cls, "determiner", f"{unit} -> {new}")
        add([*p.units[:i], *p.units[i + 1:]], p.cls - (i < p.cls), "drop", unit)
    if p.tail:
        add(list(p.units), p.cls, "drop", repr(p.tail), tail="")
    return list(out.values())


def _synonyms_of(words: str, lexicon: Lexicon) -> list[str]:
    """Every lexicon synonym of `words`, with its outer punctuation and initial capital kept."""
    lead, core, trail = _EDGE_PUNCT.match(words).groups()
    capital = core[:1].isupper()
    return [lead + (s[:1].upper() + s[1:] if capital else s) + trail for s in lexicon.synonyms[core.lower()]]


def grammatical(template: str) -> bool:
    """Whether every "a"/"an" of `template` agrees with the word after it (the article rule of
    docs/perturbations.md); one before the class slot depends on the class and is not judged."""
    words = template.split()
    return all(agree(w, nxt) == w for w, nxt in zip(words, words[1:]) if w.lower() in _ARTICLE_WORDS)


def word_distance(a: str, b: str) -> int:
    """Word-level Levenshtein distance of two templates (a phrase insertion counts its words)."""
    x, y = a.split(), b.split()
    row = list(range(len(y) + 1))
    for i, wx in enumerate(x, 1):
        prev, row[0] = row[0], i
        for j, wy in enumerate(y, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (wx != wy))
    return row[-1]


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------

@dataclass
class _Split:
    """The image features of one split of the attack, and the start set's mean p_true per image."""

    features: torch.Tensor
    labels: torch.Tensor
    p_mean: torch.Tensor | None = None


class WordingScorer:
    """Scores wordings from text features only, on the search and the report images at once.

    Counts what it encodes: `texts_encoded` new prompt strings (cache hits not counted).
    """

    def __init__(self, learner: PromptLearner, classnames: Sequence[str], search: _Split, report: _Split,
                 cache=None, text_batch_size: int = 512, amp: bool = True):
        self.learner, self.classnames = learner, list(classnames)
        self.search, self.report = search, report
        self.cache, self.text_batch_size, self.amp = cache, text_batch_size, amp
        self.texts_encoded = self.texts_cached = 0
        self.scored = 0

    def score(self, wordings: Sequence[Wording]) -> dict[str, torch.Tensor]:
        """Fill in `search` and `report` of each wording (one batch of text encodings for all).

        Returns:
            Per split, the true-class probabilities ``[M, N]`` (float64) of the wordings.
        """
        if not wordings:
            return {}
        texts = [w.template.replace(SLOT, c, 1) for w in wordings for c in self.classnames]
        feats, encoded, cached = text_features(self.learner, texts, self.text_batch_size, cache=self.cache,
                                               amp=self.amp)
        self.texts_encoded += encoded
        self.texts_cached += cached
        self.scored += len(wordings)
        class_feats = feats.view(len(wordings), len(self.classnames), -1)
        scale = float(self.learner.logit_scale)
        out = {}
        for name in ("search", "report"):
            split: _Split = getattr(self, name)
            s = score_templates(split.features, split.labels, class_feats, scale)
            p_true = out[name] = torch.as_tensor(s.p_true, dtype=torch.float64)
            acc = (s.pred == split.labels.cpu().numpy()[None]).mean(1)
            loss = (-p_true.clamp_min(1e-12).log()).mean(1)
            sens = ((p_true - split.p_mean) ** 2).mean(1) if split.p_mean is not None else None
            if name == "report":
                for k, w in enumerate(wordings):
                    w.report_correct = s.pred[k] == split.labels.cpu().numpy()
            for k, w in enumerate(wordings):
                values = getattr(w, name)
                values.update(acc=float(acc[k]), loss=float(loss[k]))
                if sens is not None:
                    values["sensitivity"] = float(sens[k])
        return out


# ----------------------------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------------------------

@dataclass
class SearchResult:
    """What `beam_search` returns: every wording scored, in scoring order, and the budget curve."""

    scored: list[Wording]
    curve: list[dict[str, float]]
    starts: list[Wording]


def beam_search(starts: Sequence[str], scorer: WordingScorer, lexicon: Lexicon, settings: AttackSettings,
                progress: Callable[[str, int, int], None] | None = None) -> SearchResult:
    """Score the start templates, then repeatedly expand the `beam` worst wordings (on the search
    images) that still have edit room, scoring their unseen neighbours until the budget is spent.

    When a round's neighbours exceed the budget left, they are taken round robin over the beam in
    a seeded random order, so every beam member gets its share.
    """
    if settings.budget < len(set(starts)):
        raise UserError(f"--budget {settings.budget} is smaller than the {len(set(starts))} start templates")
    rng = np.random.default_rng(settings.seed)
    start_words = [Wording(t, t) for t in dict.fromkeys(starts)]
    p_true = scorer.score(start_words)
    for name, p in p_true.items():  # the start set's mean p_true per image: the sensitivity reference
        getattr(scorer, name).p_mean = p.mean(0)
        for w, sens in zip(start_words, ((p - p.mean(0)) ** 2).mean(1)):
            getattr(w, name)["sensitivity"] = float(sens)
    scored = list(start_words)
    seen = {w.template for w in scored}
    expanded: set[str] = set()
    curve: list[dict[str, float]] = []

    worst = max(scored, key=lambda w: w.badness(settings.objective))

    def record(new: Wording) -> None:
        nonlocal worst
        worst = max(worst, new, key=lambda w: w.badness(settings.objective))  # ties keep the earlier one
        curve.append({"wordings": len(scored), "worst_search_acc": worst.search["acc"],
                      "worst_report_acc": worst.report["acc"], "worst_template": worst.template})

    record(worst)
    while len(scored) < settings.budget:
        room = [w for w in scored if len(w.path) < settings.max_edits and w.template not in expanded]
        if not room:
            break
        beam = sorted(room, key=lambda w: -w.badness(settings.objective))[: settings.beam]
        per_member = []
        for parent in beam:
            expanded.add(parent.template)
            options = [n for n in neighbours(parent.template, lexicon, parent.groups) if n[0] not in seen]
            per_member.append([options[i] for i in rng.permutation(len(options))])
        batch: list[Wording] = []
        left = settings.budget - len(scored)
        for rank in range(max((len(o) for o in per_member), default=0)):
            for parent, options in zip(beam, per_member):
                if rank < len(options) and len(batch) < left and options[rank][0] not in seen:
                    text, op, detail, groups = options[rank]
                    seen.add(text)
                    batch.append(Wording(text, parent.start, [*parent.path, {"op": op, "detail": detail,
                                                                             "template": text}], groups))
        scorer.score(batch)
        for w in batch:
            scored.append(w)
            record(w)
        if progress:
            progress("wordings", len(scored), settings.budget)
    return SearchResult(scored, curve, start_words)


# ----------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------

def attack_refusal(cls: type[PromptLearner]) -> str | None:
    """Why learner class `cls` cannot be attacked (it lacks a capability of `ATTACK_REQUIRES`), or None."""
    from .train.method import CAPABILITIES

    lacking = [name for name in ATTACK_REQUIRES if not CAPABILITIES[name][0](cls)]
    if not lacking:
        return None
    return (f"learner '{cls.name}' cannot be attacked: it lacks the capability '{lacking[0]}' "
            f"({CAPABILITIES[lacking[0]][1]}); the attack scores each wording from text features encoded once "
            "for all images")


def check_attackable(cls: type[PromptLearner]) -> None:
    """Refuse a learner class that lacks a capability the search relies on (`attack_refusal`).

    Raises:
        UserError: naming the capability, what it means and why the attack needs it.
    """
    if (why := attack_refusal(cls)) is not None:
        raise UserError(why)


def _learner_name(spec: str) -> str:
    """The registered learner a --learner value builds: the name itself, or the one a checkpoint records."""
    return str(read_checkpoint(spec)[1].get("learner", "")) if is_checkpoint(spec) else spec


def attack_schema() -> dict[str, Any]:
    """The JSON Schema of the attack result, as shipped in the package."""
    return read_schema_file(ATTACK_SCHEMA_FILE)


def read_attack(path: str | Path) -> dict[str, Any]:
    """Read an attack result file, checking it against the shipped schema.

    Raises:
        UserError: missing or unreadable file, not an attack result of this package, another
            schema version, or a file that departs from the schema (the first place, one line).
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"attack result not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read attack result {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(doc, dict) or doc.get("schema") != ATTACK_SCHEMA:
        raise UserError(f"{path} is not a promptbench_vlm attack result")
    if doc.get("schema_version") != ATTACK_SCHEMA_VERSION:
        raise UserError(f"{path} has attack schema version {doc.get('schema_version')}; this version reads "
                        f"{ATTACK_SCHEMA_VERSION}")
    errors = schema_errors(doc, attack_schema())
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UserError(f"{path} is not a valid attack result {errors[0]}{more}")
    return doc


def stratified_halves(labels: Sequence[int], seed: int) -> tuple[list[int], list[int]]:
    """Disjoint search and report halves of the images: each class's images shuffled (seeded)
    and dealt alternately, so both halves hold every class (an odd one out goes to search)."""
    rng = np.random.default_rng(seed)
    search, report = [], []
    labels = np.asarray(labels)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)[rng.permutation(int((labels == c).sum()))]
        search += members[0::2].tolist()
        report += members[1::2].tolist()
    return sorted(search), sorted(report)


def _split_of(images: ImageFeatures, keep: Sequence[int] | None = None) -> _Split:
    """The features and labels of the kept images (all when `keep` is None), as a scoring split."""
    feats, labels = images.features, torch.as_tensor(images.labels, device=images.features.device)
    if keep is not None:
        index = torch.as_tensor(list(keep), dtype=torch.long, device=feats.device)
        feats, labels = feats[index], labels[index]
    return _Split(feats, labels)


def _wording_entry(w: Wording) -> dict[str, Any]:
    """A found wording in the result file."""
    return {"template": w.template, "start": w.start, "edits": len(w.path),
            "word_distance": word_distance(w.start, w.template), "grammatical": grammatical(w.template),
            "path": w.path, "search": w.search, "report": w.report}


def _ci(bounds: tuple[float, float] | None) -> list[float] | None:
    return None if bounds is None else [float(bounds[0]), float(bounds[1])]


def _mean(words: Sequence[Wording], split: str, key: str) -> float:
    return float(np.mean([getattr(w, split)[key] for w in words]))


@dataclass
class Attack:
    """What `run_attack` returns: the result document and where it was written (None: not written)."""

    doc: dict[str, Any]
    path: Path | None


def run_attack(request: EvalRequest, settings: AttackSettings, *, learner: PromptLearner | None = None,
               dataset: ImageDataset | None = None, templates: Sequence[str] | None = None,
               progress: Callable[[str, int, int], None] | None = None, note: Note | None = None,
               features: Any = None) -> Attack:
    """Search for the worst wordings of a learner on a dataset; write and return the result.

    `request` says the learner, dataset, split (the report split), start templates (``templates``),
    lexicon, cache, subset (all, base or new classes) and output as for an evaluation (its
    perturbations are not used). Image features are encoded once per split, with the evaluator's
    cache; every wording is scored from its C text features. `features` replaces the request's
    feature cache (a `cache.MemoryCache` that `compare` shares between the cells of a sweep).

    Raises:
        UserError: bad input (before any model loads where it can be found there), a learner
            lacking a capability of `ATTACK_REQUIRES` (CoCoOp: image-conditional), a search split
            equal to the report split.
    """
    say = note or (lambda message: None)
    started_clock = time.perf_counter()
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    if request.subset == "base-new":
        raise UserError("an attack runs on one subset of classes: --subset all, base or new")
    request = replace(request, perturb="none")
    check_attackable(type(learner) if learner is not None else learner_class(_learner_name(request.learner)))
    if dataset is not None and settings.search_split != "half":
        raise UserError("an attack on a dataset object searches and reports on halves of it (search_split='half')")
    if settings.search_split not in ("half", request.split):
        search_data = load_dataset(request.dataset, replace(request.dataset_options, split=settings.search_split),
                                   request.subset)
    elif settings.search_split == request.split:
        raise UserError(f"--search-split {settings.search_split} is the report split --split {request.split}: "
                        f"search and report images must differ (use 'half' or another split)")
    else:
        search_data = None
    inputs = load_inputs(request, dataset, note=say)
    if templates is not None:
        inputs.templates = TemplateSet("given", tuple(templates))
    starts = list(dict.fromkeys(inputs.templates.templates))
    if settings.budget < len(starts):
        raise UserError(f"--budget {settings.budget} is smaller than the {len(starts)} start templates; "
                        f"raise it or start from fewer templates")
    report_data = inputs.datasets[request.subset]
    if search_data is not None and list(search_data.classnames) != list(report_data.classnames):
        raise UserError(f"the {settings.search_split} and {request.split} splits have different classes")
    learner = (learner or load_evaluated_learner(request, say)).eval()
    check_attackable(type(learner))
    cache = feature_cache(request, say) if features is None else features
    images = image_features(learner, report_data, request.batch_size, request.num_workers, progress, cache,
                            request.split, request.amp)
    encoded_images = images.encoded
    if search_data is None:
        kept_labels = images.labels
        search_idx, report_idx = stratified_halves(kept_labels, settings.seed)
        search, report = _split_of(images, search_idx), _split_of(images, report_idx)
        split_info = {"mode": "half", "split": request.split, "search_images": len(search_idx),
                      "report_images": len(report_idx), "seed": settings.seed}
    else:
        other = image_features(learner, search_data, request.batch_size, request.num_workers, progress, cache,
                               settings.search_split, request.amp)
        encoded_images += other.encoded
        search, report = _split_of(other), _split_of(images)
        split_info = {"mode": "split", "search_split": settings.search_split, "report_split": request.split,
                      "search_images": len(other.labels), "report_images": len(images.labels),
                      "search_fingerprint": search_data.fingerprint()}
    if min(len(search.labels), len(report.labels)) == 0:
        raise UserError("too few images to split into search and report halves")
    scorer = WordingScorer(learner, report_data.classnames, search, report, cache, amp=request.amp)
    t0 = time.perf_counter()
    found = beam_search(starts, scorer, inputs.lexicon, settings, progress)
    search_s = time.perf_counter() - t0
    doc = attack_document(request, settings, learner, inputs, found, scorer, split_info, started)
    doc["counts"].update(images_encoded=encoded_images, images_cached=images.cached)
    doc["timings"] = {"search_s": search_s, "wordings_per_s": scorer.scored / max(search_s, 1e-9)}
    doc["run"]["wall_time_s"] = time.perf_counter() - started_clock
    path = None
    if request.output is not None:
        path = output_path(request.output, learner=learner.name, dataset=request.dataset, split=request.split,
                           subset=request.subset, model=learner.backbone.name, seed=str(request.seed),
                           time=dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
        write_json(doc, path)
    return Attack(doc, path)


def attack_document(request: EvalRequest, settings: AttackSettings, learner: PromptLearner, inputs: EvalInputs,
                    found: SearchResult, scorer: WordingScorer, split_info: dict[str, Any], started: str
                    ) -> dict[str, Any]:
    """The attack's result document (``docs/attack.md``)."""
    by_badness = sorted(found.scored, key=lambda w: -w.badness(settings.objective))
    worst = by_badness[0]
    top = by_badness[: settings.top]
    report_mean = _mean(found.starts, "report", "acc")
    starts_correct = np.sum([w.report_correct for w in found.starts], axis=0)  # [N] start templates right
    worst_correct = worst.report_correct.astype(np.float64)
    rows = np.stack([worst_correct, starts_correct / len(found.starts)])
    if request.bootstrap:
        ci_worst, ci_mean, ci_gap = bootstrap_intervals(np.concatenate([rows, rows[1:] - rows[:1]]),
                                                        request.bootstrap, request.seed)
    else:
        ci_worst = ci_mean = ci_gap = None
    checkpoint = request.learner if is_checkpoint(request.learner) else None
    return {
        "schema": ATTACK_SCHEMA,
        "schema_version": ATTACK_SCHEMA_VERSION,
        "run": {**run_block(request, learner, inputs, started, checkpoint),
                "attack": {**asdict(settings), "determiners": list(DETERMINERS)}},
        "splits": split_info,
        "summary": {
            "objective": settings.objective,
            "worst_template": worst.template,
            "worst_case_acc": worst.report["acc"],
            "worst_case_acc_ci": _ci(ci_worst),
            "worst_case_acc_search": worst.search["acc"],
            "mean_acc": report_mean,
            "mean_acc_ci": _ci(ci_mean),
            "mean_acc_search": _mean(found.starts, "search", "acc"),
            "gap": report_mean - worst.report["acc"],
            "gap_ci": _ci(ci_gap),
            "worst_start_acc": max(found.starts, key=lambda w: w.badness(settings.objective)).report["acc"],
            "min_report_acc_of_top": min(w.report["acc"] for w in top),
            "grammatical_share": float(np.mean([grammatical(w.template) for w in top])),
            "wordings_scored": len(found.scored),
        },
        "worst": [_wording_entry(w) for w in top],
        "curve": found.curve,
        "report_per_image": {"labels": scorer.report.labels.cpu().tolist(),
                             "worst_correct": worst_correct.astype(int).tolist(),
                             "starts_correct": starts_correct.astype(int).tolist(), "n_starts": len(found.starts)},
        "scored_templates": [w.template for w in found.scored],
        "counts": {"wordings_scored": scorer.scored, "texts_encoded": scorer.texts_encoded,
                   "texts_cached": scorer.texts_cached, "classes": len(scorer.classnames)},
    }

"""One evaluation end to end: load, score each subset, write the result document.

The counterpart of `train.run.run_training`. `promptbench evaluate`, the final evaluation of
`promptbench train` and the zero-shot runs of `promptbench compare` all come through
`run_evaluation`, so their result files are built the same way: the ``run`` block by
`run_block` alone, the document by `results.build_result`. `run_evaluation` owns loading (inputs
first, so a typo fails before any model loads), resuming an interrupted run, writing each
finished subset at once (``"complete": false`` until the last) and the final document.

Under torchrun every rank calls it alike and scores its share of the work; rank 0 alone writes.
"""

from __future__ import annotations

import datetime as dt
import platform
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__, distributed
from .backbone import precision
from .data import SUBSETS, DatasetOptions, ImageDataset, load_dataset, select_subset
from .errors import UserError
from .evaluate import EvalSettings, Evaluator, ProgressFn, SubsetResult
from .files import check_output_file, sha256_file
from .learners import is_checkpoint
from .learners.base import PromptLearner
from .perturb import Lexicon, PerturbSpec, load_lexicon, parse_perturbations
from .protocols import target_subsets
from .results import backbone_fields, build_result, is_result_file, read_result, write_json
from .templates import TemplateSet, load_templates
from .wordings import (WordingProtocol, WordingSplit, evaluation_pools, split_wordings, subset_name, wording_fields,
                       wording_split)

DEFAULT_OUTPUT = "results/{learner}__{dataset}__{split}__{time}.json"
Note = Callable[[str], None]


@dataclass
class EvalRequest:
    """Everything an evaluation is asked (what `promptbench evaluate` parses its options into).

    Attributes:
        learner: A registered learner name or a learner checkpoint (``.safetensors``); with a
            learner object handed to `run_evaluation`, the checkpoint it was saved to (or its name).
        subset: ``all``, ``base``, ``new`` or ``base-new`` (both, each with its own classes, and H).
        lexicon: Path of a synonym lexicon (JSON); None uses the shipped one.
        output: Result path; fields ``{learner} {dataset} {split} {subset} {model} {seed} {time}``
            are filled in (write ``{{`` for a literal brace). None writes nothing.
        resume: Continue an interrupted run written to `output`, keeping its finished subsets.
        overwrite: Replace an existing file at `output`; only a result file of this package is
            replaced, any other file is refused (and an existing one without it too).
        command: The command line recorded in the result; None records ``sys.argv``.
        wordings: The wording protocol (``docs/wordings.md``): `templates` is split and each
            subset scored on the seen, held-out and out-of-family pools (``base@held-out``);
            None scores `templates` whole.
        targets: Dataset specs scored after `subset`, each with all its classes and the same
            split, as subset ``target:LABEL`` (`protocols.target_subset`): the cross-dataset and
            domain-generalisation protocols.
    """

    model: str = "toy-clip"
    pretrained: str | None = None
    learner: str = "zeroshot"
    learner_options: dict[str, Any] = field(default_factory=dict)
    dataset: str = "toy-shapes"
    dataset_options: DatasetOptions = field(default_factory=DatasetOptions)
    subset: str = "all"
    templates: str = "promptsrc60"
    perturb: str = "default"
    draws: int = 1
    lexicon: str | None = None
    mask_token: str = "[MASK]"
    seed: int = 0
    bootstrap: int = 1000
    batch_size: int = 128
    num_workers: int = 0
    device: str = "auto"
    amp: bool = True
    cache: bool = True
    cache_dir: str | None = None
    output: str | None = DEFAULT_OUTPUT
    resume: bool = False
    overwrite: bool = False
    command: list[str] | None = None
    wordings: WordingProtocol | None = None
    targets: tuple[str, ...] = ()

    @property
    def split(self) -> str:
        return self.dataset_options.split

    @property
    def subsets(self) -> list[str]:
        """The subsets scored, in order."""
        return ["base", "new"] if self.subset == "base-new" else [self.subset]


@dataclass
class EvalInputs:
    """What an evaluation reads besides the learner, loaded (and checked) before any model."""

    templates: TemplateSet
    perturbations: list[PerturbSpec]
    lexicon: Lexicon
    datasets: dict[str, ImageDataset]
    """Subset name -> its dataset."""
    wordings: WordingSplit | None = None
    """The wording protocol's pools, when asked for."""

    def units(self) -> list[tuple[str, tuple[str, ...], ImageDataset]]:
        """What is scored, in order: (result subset name, templates, dataset), one pool of
        wordings after the other."""
        return [(subset_name(name, pool), templates, dataset)
                for pool, templates in evaluation_pools(self.wordings, self.templates.templates)
                for name, dataset in self.datasets.items()]


@dataclass
class Evaluation:
    """What `run_evaluation` returns.

    Attributes:
        doc: The result document (schema in ``docs/results.md``).
        path: Where it was written (None when not written).
        already_complete: ``resume`` found this evaluation finished; `doc` is the earlier file's.
    """

    doc: dict[str, Any]
    path: Path | None
    already_complete: bool = False

    @property
    def n_skipped(self) -> int:
        """Corrupt images skipped over all subsets."""
        return sum(body["n_skipped"] for body in self.doc["subsets"].values())


def load_inputs(request: EvalRequest, dataset: ImageDataset | None = None, note: Note | None = None) -> EvalInputs:
    """Load templates, perturbations, lexicon, the wording split and the datasets of each subset.

    Under the wording protocol a learner checkpoint trained under it is scored on its recorded
    split (its held-out wordings are the ones it never saw), else on the split of `templates`.

    Args:
        dataset: An already built dataset to score instead of ``request.dataset``.
        note: Receives a ``warning:`` line when a checkpoint trained without the protocol is
            scored under it (its "held-out" wordings may be ones it trained on).

    Raises:
        UserError: an unknown subset, template set, perturbation or dataset; a missing file.
    """
    if request.subsets[0] not in SUBSETS:
        raise UserError(f"unknown subset '{request.subset}'. Valid: {', '.join(SUBSETS)}, base-new")
    templates = load_templates(request.templates)
    wordings = None
    if request.wordings is not None:
        on_file = is_checkpoint(request.learner) and Path(request.learner).is_file()
        wordings, warning = wording_split("split", request.learner, request.wordings) if on_file else (
            split_wordings(request.wordings), None)
        if warning and note:
            note(f"warning: {warning}")
    specs = parse_perturbations(request.perturb)
    lexicon = load_lexicon(request.lexicon, mask_token=request.mask_token)
    if dataset is None:
        datasets = {s: load_dataset(request.dataset, request.dataset_options, s) for s in request.subsets}
    else:
        datasets = {s: select_subset(dataset, s) for s in request.subsets}
    for name, target in target_subsets(request.targets).items():
        datasets[name] = load_dataset(target, request.dataset_options)
    return EvalInputs(templates, specs, lexicon, datasets, wordings)


def load_evaluated_learner(request: EvalRequest, note: Note | None = None) -> PromptLearner:
    """The backbone and learner a request names (a registered learner or a checkpoint).

    An unknown learner name or option fails before the backbone loads; a randomly initialised
    backbone (no pretrained weights, none shipped) is worth a warning, since its numbers mean little.
    """
    from .backbone import load_backbone
    from .learners import build_learner, check_learner_options, load_learner_checkpoint

    checkpoint = is_checkpoint(request.learner)
    if checkpoint and request.learner_options:
        raise UserError(f"--learner-opt cannot change a checkpoint's learner: {request.learner} brings its own "
                        "options; drop --learner-opt")
    options = None if checkpoint else check_learner_options(request.learner, request.learner_options)
    backbone = load_backbone(request.model, request.pretrained, distributed.setup(request.device))
    if backbone.random_init and note:
        note(f"warning: no --pretrained given: {backbone.name} is randomly initialised")
    if checkpoint:
        return load_learner_checkpoint(request.learner, backbone)
    return build_learner(request.learner, backbone, options)


def environment_info(command: list[str] | None = None) -> dict[str, Any]:
    """Versions and the command line, for the result's ``run`` block."""
    import open_clip
    import torch

    return {"package_version": __version__, "torch_version": torch.__version__,
            "open_clip_version": open_clip.__version__, "python": platform.python_version(),
            "command": list(sys.argv if command is None else command)}


def run_block(request: EvalRequest, learner: PromptLearner, inputs: EvalInputs, started: str,
              checkpoint: str | None) -> dict[str, Any]:
    """The result's ``run`` block: everything needed to rerun and to verify the evaluation.

    The one place it is built; every producer's result carries the same fields (see
    ``docs/results.md``). `wall_time_s` is added when the evaluation ends.
    """
    return {
        **environment_info(request.command),
        **backbone_fields(learner.backbone),
        "learner": learner.name,
        "learner_options": learner.options,
        "checkpoint": checkpoint,
        "checkpoint_sha256": sha256_file(checkpoint) if checkpoint and Path(checkpoint).is_file() else None,
        "dataset": request.dataset,
        "dataset_fingerprint": {d.name: d.fingerprint() for d in inputs.datasets.values()},
        "split": request.split,
        "subset": request.subset,
        **({"targets": list(request.targets)} if request.targets else {}),  # the transfer protocols only
        **wording_fields(inputs.wordings, inputs.templates),
        "perturbations": [{"label": p.label, "op": p.op, "rate": p.rate, "level": p.level}
                          for p in inputs.perturbations],
        "draws": request.draws,
        "lexicon": request.lexicon or "shipped",
        "mask_token": request.mask_token,
        "seed": request.seed,
        "bootstrap": request.bootstrap,
        "device": str(learner.device),
        "precision": precision(learner.device, request.amp),
        "started": started,
    }


def output_path(template: str, **fields: str) -> Path:
    """Fill an output template; field values are made safe for file names."""
    safe = {k: re.sub(r"[^A-Za-z0-9._-]+", "-", str(v)).strip("-") for k, v in fields.items()}
    try:
        return Path(template.format(**safe))
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(f"--output template '{template}' cannot be filled ({err}); fields: "
                        f"{', '.join(sorted(safe))}") from None


def literal(path: str | Path) -> str:
    """An output template that is exactly `path` (braces in it doubled)."""
    return str(path).replace("{", "{{").replace("}", "}}")


def run_evaluation(request: EvalRequest, *, learner: PromptLearner | None = None, inputs: EvalInputs | None = None,
                   extra_run: dict[str, Any] | None = None, progress: ProgressFn | None = None,
                   note: Note | None = None) -> Evaluation:
    """Evaluate a learner as `request` says; write and return the result document.

    Args:
        request: What to evaluate, where to write.
        learner: An already built learner (a trained one, a notebook's); None loads the one
            ``request`` names.
        inputs: Inputs already loaded by `load_inputs` (a trainer loads them before training,
            so a typo fails before the first epoch); None loads them here.
        extra_run: Fields added to the ``run`` block (``training`` for a trained learner).
        progress: ``progress(stage, done, total)`` callback.
        note: Receives one-line messages for the user on rank 0 (resuming, interrupted,
            warnings prefixed ``warning:``); None sends warnings to `warnings.warn`.

    Raises:
        UserError: bad input (before any model loads where it can be found there).
        KeyboardInterrupt: after the finished subsets were written (``"complete": false``).
    """
    main = distributed.is_main()
    if request.resume and request.overwrite:
        raise UserError("--resume continues the result file at --output and --overwrite replaces it: pass one of them")

    def say(message: str) -> None:
        if not main:
            return
        if note:
            note(message)
        elif message.startswith("warning: "):
            warnings.warn(message.removeprefix("warning: "), stacklevel=3)

    started_clock = time.perf_counter()
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    inputs = inputs or load_inputs(request, note=say)
    learner = learner or load_evaluated_learner(request, say)
    checkpoint = request.learner if is_checkpoint(request.learner) else None
    run = {**run_block(request, learner, inputs, started, checkpoint), **(extra_run or {})}
    path, earlier = None, {}
    if request.output is not None:
        fields = dict(learner=learner.name, dataset=request.dataset, split=request.split, subset=request.subset,
                      model=learner.backbone.name, seed=str(request.seed))
        stamp = distributed.broadcast(dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
        path = output_path(request.output, **fields, time=stamp)
        if request.resume:
            previous, earlier, complete = _previous_run(request.output, fields, run)
            if complete:
                say(f"{previous} is already complete: nothing to resume")
                return Evaluation(read_result(previous), previous, already_complete=True)
            path = previous or path
            say(f"resuming {path}: {len(earlier)} finished subset(s) kept" if previous
                else "--resume: no earlier result of this evaluation found; starting afresh")
        else:  # before any encoding: never replace what this package did not write
            target = path
            distributed.main_only(lambda: check_output_file(target, request.overwrite, ours=is_result_file(target)))
    finished = _score_subsets(request, learner, inputs, run, path, earlier, progress, say, started_clock)
    run["wall_time_s"] = time.perf_counter() - started_clock
    doc = build_result(run, finished, earlier=earlier)
    if main and path is not None:
        write_json(doc, path)
    return Evaluation(doc, path)


def _previous_run(template: str, fields: dict[str, str], run: dict[str, Any]
                  ) -> tuple[Path | None, dict[str, dict[str, Any]], bool]:
    """The earlier result file of this evaluation, its finished subsets and whether it is complete."""
    from .resume import find_previous, finished_subsets

    pattern = str(output_path(template, **fields, time="RESUMETIME")).replace("RESUMETIME", "*")
    previous = distributed.main_only(lambda: find_previous(pattern, run))  # ranks' run fields may differ
    earlier, complete = finished_subsets(previous)
    return previous, earlier, complete


def feature_cache(request: EvalRequest, say: Note):
    """The feature cache a request asks for (None with ``cache=False``); warnings go to `say`."""
    from .cache import FeatureCache
    from .files import cache_root

    if not request.cache:
        return None
    folder = Path(request.cache_dir) if request.cache_dir else cache_root() / "features"
    return FeatureCache(folder, warn=lambda message: say(f"warning: {message}"))


def _score_subsets(request: EvalRequest, learner: PromptLearner, inputs: EvalInputs, run: dict[str, Any],
                   path: Path | None, earlier: dict[str, dict[str, Any]], progress: ProgressFn | None,
                   say: Note, started_clock: float) -> list[SubsetResult]:
    """Score each subset not in `earlier`; each finished one is written at once (incomplete)."""
    features = feature_cache(request, say)
    units = inputs.units()
    writes = distributed.is_main() and path is not None
    finished: list[SubsetResult] = []
    try:
        for name, templates, dataset in units:
            if name in earlier:
                continue
            settings = EvalSettings(templates=templates, perturbations=tuple(inputs.perturbations),
                                    draws=request.draws, seed=request.seed, bootstrap=request.bootstrap,
                                    batch_size=request.batch_size, num_workers=request.num_workers,
                                    lexicon=inputs.lexicon, amp=request.amp)
            evaluator = Evaluator(learner, settings, progress=progress, cache=features, split=request.split)
            evaluator.run(dataset, subset=name, partial=finished)
            if writes and len(earlier) + len(finished) < len(units):  # a finished unit survives any kill
                run["wall_time_s"] = time.perf_counter() - started_clock
                write_json(build_result(run, finished, complete=False, earlier=earlier), path)
    except KeyboardInterrupt:
        if writes:
            run["wall_time_s"] = time.perf_counter() - started_clock
            write_json(build_result(run, finished, complete=False, earlier=earlier), path)
            say(f"interrupted: partial results written to {path}; --resume continues it")
        raise
    return finished

"""One training run end to end: data, learner, method, loop, checkpoint, final evaluation.

Writes into the output folder: ``learner.safetensors`` (the checkpoint, also the last good one
at each epoch end), ``train_state.pt`` (what ``--resume`` continues from: the optimiser, method
and random-generator state at the last epoch end; removed once the run is finished),
``log.jsonl`` (one line per optimiser step), ``train.json`` (the run's settings) and
``result.json`` (the evaluator's result on the test split's base and new classes). Under torchrun
every rank trains on its share of each batch and evaluates its share of the images; rank 0 alone
writes.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import distributed
from ..backbone import load_backbone
from ..data import DatasetOptions, load_dataset
from ..errors import InputWarning, UserError
from ..evaluate import ProgressFn
from ..evaluation import EvalRequest, literal, load_inputs, run_evaluation
from ..files import atomic_path, check_run_folder, claim_folder, release_folder, remove_run_files
from ..learners import build_learner, check_learner_options, load_learner_checkpoint
from ..results import read_result
from ..wordings import WordingProtocol, seen_pool_options, write_seen_pool
from .fewshot import DEFAULT_CACHE, few_shot
from .loop import TrainConfig, train
from .maml_tasks import JointDataset
from .method import METHODS, build_method, check_method_options
from .train_state import STATE, load_state

CHECKPOINT, LOG, SETTINGS, RESULT = "learner.safetensors", "log.jsonl", "train.json", "result.json"
SEEN_WORDINGS = "seen-wordings.txt"
RUN_FILES = (CHECKPOINT, LOG, SETTINGS, RESULT, STATE, SEEN_WORDINGS)
"""Everything a run writes into its folder: the only files ``--overwrite`` ever removes."""
VOLATILE_REQUEST_FIELDS = ("resume", "overwrite")
"""Request fields that may differ between an interrupted run and its resumption."""


@dataclass
class TrainRequest:
    """Everything `promptbench train` was asked; stored in ``train.json``."""

    method: str = "erm"
    learner: str = "coop"
    model: str = "toy-clip"
    pretrained: str | None = None
    dataset: str | list[str] = "toy-shapes"  # several: trained on side by side, evaluated on the first
    shots: int = 16
    subset: str = "base"
    output: str = "runs/{method}-{learner}-seed{seed}"
    init: str | None = None
    learner_options: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, Any] = field(default_factory=dict)
    config: TrainConfig = field(default_factory=TrainConfig)
    eval_templates: str = "promptsrc60"
    wordings: WordingProtocol | None = None  # the wording protocol; None: train and evaluate on eval_templates
    eval_perturb: str = "default"
    bootstrap: int = 1000
    device: str = "auto"
    overwrite: bool = False
    resume: bool = False
    fewshot_cache: str | None = str(DEFAULT_CACHE)
    dataset_options: DatasetOptions = field(default_factory=DatasetOptions)
    preset: dict[str, Any] | None = None  # the preset's name, source, values and what the flags overrode
    eval_targets: list[str] | None = None  # datasets also scored at the end (cross-dataset, DG: `protocols`)


def check_request(request: TrainRequest) -> None:
    """Refuse what cannot run, before any data or model loads; type the method and learner
    options in place (so train.json records ``weighting: false`` however it was spelt)."""
    config = request.config
    if config.epochs < 1 or config.batch_size < 1 or config.accumulate < 1:
        raise UserError("--epochs, --batch-size and --accumulate must be at least 1")
    if config.lr is not None and not (math.isfinite(config.lr) and config.lr > 0):
        raise UserError(f"--lr must be a positive number, got {config.lr}")
    if config.seed < 0:
        raise UserError(f"--seed must be 0 or more, got {config.seed}")
    if request.init and request.learner_options:
        raise UserError(f"--learner-opt cannot change a checkpoint's learner: --init {request.init} brings its own "
                        "options; drop --learner-opt")
    request.method_options = check_method_options(request.method, request.method_options)
    if request.learner and not request.init:
        request.learner_options = check_learner_options(request.learner, request.learner_options)
    if request.resume and request.overwrite:
        raise UserError("--resume continues the run in the output folder and --overwrite replaces it: pass one of them")


def prepare_output(folder: Path, request: TrainRequest) -> str:
    """Claim the run folder for this process and say what to do with it.

    A folder is used only when it is new, empty, or one this package wrote; ``--overwrite``
    removes only the files a run writes (`RUN_FILES`), and refuses a folder that also holds
    anything else, the working directory and its parents. The claim (`files.claim_folder`) keeps
    a second process from writing the same folder at the same time.

    Returns:
        "fresh" (start clean), "resume" (continue after the last finished epoch) or "complete"
        (``--resume`` on a finished run of the same request: nothing to do).

    Raises:
        UserError: a finished run without ``--overwrite``, ``--resume`` on another run's folder,
            a folder holding files this package did not write, or one claimed by another process.
    """
    check_run_folder(folder, RUN_FILES, replace=request.overwrite, legacy=(SETTINGS, RESULT))
    claim_folder(folder, wait=False)
    if request.resume and (folder / SETTINGS).exists():
        check_same_run(folder / SETTINGS, request)
        if (folder / RESULT).exists():
            return "complete"
        if (folder / STATE).exists():
            return "resume"
    if (folder / RESULT).exists() and not request.overwrite:
        raise UserError(f"{folder} holds a finished run ({RESULT}); pass --overwrite to replace it")
    remove_run_files(folder, RUN_FILES if request.overwrite else (LOG, STATE))  # else: another run's leftovers
    return "fresh"


def checkpoint_learner(init: str | Path, requested: str | None = None) -> str:
    """The learner a ``--init`` checkpoint holds; a `requested` learner must be that one.

    Raises:
        UserError: an unreadable checkpoint, or `requested` names another learner (training the
            checkpoint's learner into a run named after another would mislabel the run).
    """
    from ..learners.base import read_checkpoint

    name = read_checkpoint(init)[1].get("learner", "")
    if requested and requested != name:
        raise UserError(f"--init {init} holds a '{name}' learner, not '{requested}': drop --learner, or pass "
                        f"--learner {name}")
    return name


def check_same_run(path: Path, request: TrainRequest) -> None:
    """Refuse to resume a folder whose ``train.json`` records another request; name the keys."""
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))["request"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"--resume: cannot read the run settings {path} ({err!r}); pass --overwrite to start over"
                        ) from None
    differing = request_differences(earlier, request)
    if differing:
        raise UserError(f"--resume: {path.parent} holds another run ({', '.join(differing)} differ); "
                        "pass the options of that run, or another --output")


def request_differences(recorded: dict[str, Any], request: TrainRequest) -> list[str]:
    """The keys (``config.lr`` for nested ones) on which a ``train.json`` request differs from
    `request`, ignoring what may change between a run and its resumption (`VOLATILE_REQUEST_FIELDS`).

    A field the record lacks (written before the field existed) counts as its default: a new
    request field's default keeps the behaviour runs had before it, so older runs stay reusable.
    """
    return _differing(_with_defaults(_comparable(recorded), _comparable(_jsonable(TrainRequest()))),
                      _comparable(_jsonable(request)))


def _with_defaults(recorded: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`recorded` with the keys it lacks taken from `defaults`, nested dicts merged the same way."""
    out = dict(recorded)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _with_defaults(out[key], value)
    return out


def keep_log_until(path: Path, step: int) -> None:
    """Drop the log lines of steps after `step`: the resumed run does them again."""
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line for line in lines if _logged_step(line) <= step), encoding="utf-8")


def final_evaluation(request: TrainRequest) -> EvalRequest:
    """The evaluation of the trained checkpoint: the first dataset's test split, base and new
    classes when trained on base (else the trained subset), then each of `eval_targets` with its
    own classes, into the run folder's result file."""
    source = request.dataset if isinstance(request.dataset, str) else request.dataset[0]
    folder = Path(request.output)
    return EvalRequest(model=request.model, pretrained=request.pretrained, learner=str(folder / CHECKPOINT),
                       dataset=source, dataset_options=replace(request.dataset_options, split="test"),
                       subset="base-new" if request.subset == "base" else request.subset,
                       templates=request.eval_templates, perturb=request.eval_perturb, seed=request.config.seed,
                       bootstrap=request.bootstrap, num_workers=request.config.num_workers, device=request.device,
                       amp=request.config.amp, cache=False, output=literal(folder / RESULT), overwrite=True,
                       wordings=request.wordings,  # the claimed run folder's own result file
                       targets=tuple(request.eval_targets or ()))


def run_training(request: TrainRequest, extra_run: dict[str, Any] | None = None, progress: ProgressFn | None = None,
                 note: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train, checkpoint and evaluate; return the result document (also written to disk).

    Under torchrun every rank calls this alike. `note` receives one-line messages for the user
    (resuming, already complete, interrupted), on rank 0; `extra_run` holds fields added to the
    result's ``run`` block. The run folder is claimed for the whole run.
    """
    check_request(request)
    try:
        return _run_training(request, extra_run, progress, note)
    finally:
        release_folder(Path(request.output))


def _run_training(request: TrainRequest, extra_run: dict[str, Any] | None, progress: ProgressFn | None,
                  note: Callable[[str], None] | None) -> dict[str, Any]:
    import torch

    device = distributed.setup(request.device)
    main = distributed.is_main()
    say = note if note and main else (lambda _: None)
    folder = Path(request.output)
    config = request.config
    evaluation = final_evaluation(request)
    eval_inputs = load_inputs(evaluation)
    split = eval_inputs.wordings
    options = request.dataset_options
    sources = [request.dataset] if isinstance(request.dataset, str) else list(request.dataset)
    parts = [few_shot(load_dataset(source, DatasetOptions(**{**options.__dict__, "split": "train"}), request.subset),
                      request.shots, config.seed, Path(request.fewshot_cache) if request.fewshot_cache else None)
             for source in sources]
    train_data = parts[0] if len(parts) == 1 else JointDataset(parts)
    if main and any(getattr(ds, "split_ignored", False) for ds in eval_inputs.datasets.values()):
        message = (f"{sources[0]} has no train/ and test/ split folders: training and scoring on the same images, "
                   "so the result measures memorisation, not generalisation")
        note(f"warning: {message}") if note else warnings.warn(message, InputWarning, stacklevel=2)
    mode = distributed.main_only(lambda: prepare_output(folder, request))
    if mode == "complete":
        say(f"{folder} is already complete: nothing to resume")
        return read_result(folder / RESULT)
    start = load_state(folder / STATE) if mode == "resume" else None
    if start is not None:
        if main:
            keep_log_until(folder / LOG, start.step)
        say(f"resuming {folder} after epoch {start.epoch} of {config.epochs}")
    elif request.resume:
        say(f"--resume: no finished epoch in {folder}; starting afresh")

    backbone = load_backbone(request.model, request.pretrained, device)
    torch.manual_seed(config.seed)
    if request.init:
        learner = load_learner_checkpoint(request.init, backbone)
        if request.learner and request.learner != learner.name:
            raise UserError(f"--init {request.init} holds a '{learner.name}' learner, not '{request.learner}': drop "
                            f"--learner, or pass --learner {learner.name}")
    else:
        known = list(dict.fromkeys([*train_data.classnames,
                                    *(c for ds in eval_inputs.datasets.values() for c in ds.classnames)]))
        learner = build_learner(request.learner, backbone, learner_options(request, train_data.classnames, known))
    method_options = dict(request.method_options)
    if split is not None:  # every method trains on the same seen pool, none on a held-out wording
        seen_file = distributed.main_only(lambda: write_seen_pool(folder / SEEN_WORDINGS, split))
        method_options = seen_pool_options(METHODS.get(request.method), method_options, split, seen_file)
    method = build_method(request.method, learner, train_data.classnames, method_options)
    lr = config.lr if config.lr is not None else method.default_lr()
    if main and not method.episodic and config.warmup_epochs >= config.epochs:
        message = (f"the warm-up ({config.warmup_epochs} epoch(s) at {config.warmup_lr}) covers the whole run of "
                   f"{config.epochs} epoch(s): every step uses the warm-up rate, never {lr}; pass --warmup-epochs 0 "
                   "or more --epochs")
        note(f"warning: {message}") if note else warnings.warn(message, stacklevel=2)
    if main and start is None:
        settings = {"request": _jsonable(request), "lr": lr, "train_images": len(train_data)}
        with atomic_path(folder / SETTINGS) as tmp:
            tmp.write_text(json.dumps(settings, indent=2))

    extra = {"method": request.method, "method_options": method.options, "train": config.to_dict(), "lr": lr,
             "dataset": request.dataset, "subset": request.subset, "shots": request.shots,
             "wordings": split.to_dict() if split else None}
    checkpoint = folder / CHECKPOINT
    save = (lambda epoch: learner.save(checkpoint, {**extra, "epoch": epoch})) if main else None
    try:
        outcome = train(method, train_data, config, lr, log_path=folder / LOG, on_epoch_end=save, progress=progress,
                        state_path=folder / STATE, start=start)
    except KeyboardInterrupt:
        say(f"interrupted: {folder} keeps the checkpoint and training state of the last finished epoch; the same "
            "command with --resume continues it")
        raise
    if main:
        learner.save(checkpoint, {**extra, "epoch": config.epochs, "final": True})
    training = {**extra, "steps": outcome.steps, "first_loss": outcome.losses[0] if outcome.losses else None,
                "last_loss": outcome.losses[-1] if outcome.losses else None,
                "train_wall_time_s": outcome.wall_time_s, "skipped_images": outcome.skipped_images,
                "method_summary": method.summary(), "ranks": distributed.world_size()}
    doc = run_evaluation(evaluation, learner=learner, inputs=eval_inputs,
                         extra_run={**(extra_run or {}), "training": training}, progress=progress, note=note).doc
    if main:
        (folder / STATE).unlink(missing_ok=True)  # finished: --resume now finds the result
    return doc


def learner_options(request: TrainRequest, train_classes: list[str], known_classes: list[str]) -> dict[str, Any]:
    """The learner options to build with: the method's reference defaults for this learner,
    overridden by the user's. A class-aware CoOp layout gets its class names: the training
    classes for class-specific context (one context each), else every class it will score.

    Raises:
        UserError: class-specific context with base-to-new evaluation (no context for new classes).
    """
    options = {**METHODS.get(request.method).learner_defaults.get(request.learner, {}), **request.learner_options}
    csc = bool(options.get("csc"))
    if csc and request.subset == "base":
        raise UserError("--learner-opt csc=true learns one context per training class and cannot score the new "
                        "classes of a base-to-new run; train with --subset all")
    if (csc or options.get("class_token_position", "end") != "end") and not options.get("classnames"):
        options["classnames"] = list(train_classes if csc else known_classes)
    return options


def _jsonable(request: TrainRequest) -> dict[str, Any]:
    data = dict(request.__dict__)
    data["config"] = request.config.to_dict()
    data["dataset_options"] = dict(request.dataset_options.__dict__)
    data["wordings"] = asdict(request.wordings) if request.wordings else None
    return data


def _comparable(request: dict[str, Any]) -> dict[str, Any]:
    plain = json.loads(json.dumps(request, default=str))
    return {k: v for k, v in plain.items() if k not in VOLATILE_REQUEST_FIELDS}


def _differing(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys whose values differ; nested dicts are searched, their keys named ``config.lr``."""
    out = []
    for key in sorted(a.keys() | b.keys()):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differing(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(prefix + key)
    return out


def _logged_step(line: str) -> float:
    """The step of a log line; infinite for a line a kill cut short (so it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf

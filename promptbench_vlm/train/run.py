"""One training run end to end: data, learner, method, loop, checkpoint, final evaluation.

Writes into the output folder: ``learner.safetensors`` (the checkpoint, also the last good one
at each epoch end), ``log.jsonl`` (one line per optimiser step), ``train.json`` (the run's
settings) and ``result.json`` (the evaluator's result on the test split's base and new classes).
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import distributed
from ..backbone import load_backbone
from ..data import DatasetOptions, load_dataset
from ..errors import UserError
from ..evaluate import EvalSettings, Evaluator, ProgressFn
from ..files import atomic_path
from ..learners import build_learner, load_learner_checkpoint
from ..perturb import parse_perturbations
from ..results import backbone_fields, build_result, write_json
from ..templates import load_templates
from .fewshot import DEFAULT_CACHE, few_shot
from .loop import TrainConfig, train
from .maml_tasks import JointDataset
from .method import build_method

CHECKPOINT, LOG, SETTINGS, RESULT = "learner.safetensors", "log.jsonl", "train.json", "result.json"


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
    eval_perturb: str = "default"
    bootstrap: int = 1000
    device: str = "auto"
    overwrite: bool = False
    fewshot_cache: str | None = str(DEFAULT_CACHE)
    dataset_options: DatasetOptions = field(default_factory=DatasetOptions)


def prepare_output(folder: Path, overwrite: bool) -> None:
    """Refuse to clobber a finished run unless asked; start the folder clean."""
    if (folder / RESULT).exists() and not overwrite:
        raise UserError(f"{folder} holds a finished run ({RESULT}); pass --overwrite to replace it")
    if folder.exists() and overwrite:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOG).unlink(missing_ok=True)


def run_training(request: TrainRequest, run_info: dict[str, Any], progress: ProgressFn | None = None) -> dict[str, Any]:
    """Train, checkpoint and evaluate; return the result document (also written to disk)."""
    import torch

    if distributed.launched():
        raise UserError("promptbench train is not data-parallel yet: under torchrun every rank would train its own "
                        "copy into one folder; run it as a single process")
    folder = Path(request.output)
    config = request.config
    if config.epochs < 1 or config.batch_size < 1 or config.accumulate < 1:
        raise UserError("--epochs, --batch-size and --accumulate must be at least 1")
    eval_templates = load_templates(request.eval_templates)
    eval_specs = parse_perturbations(request.eval_perturb)
    options = request.dataset_options
    sources = [request.dataset] if isinstance(request.dataset, str) else list(request.dataset)
    parts = [few_shot(load_dataset(source, DatasetOptions(**{**options.__dict__, "split": "train"}), request.subset),
                      request.shots, config.seed, Path(request.fewshot_cache) if request.fewshot_cache else None)
             for source in sources]
    train_data = parts[0] if len(parts) == 1 else JointDataset(parts)
    eval_subsets = ["base", "new"] if request.subset == "base" else [request.subset]
    test_sets = [load_dataset(sources[0], DatasetOptions(**{**options.__dict__, "split": "test"}), s)
                 for s in eval_subsets]
    prepare_output(folder, request.overwrite)

    backbone = load_backbone(request.model, request.pretrained, request.device)
    torch.manual_seed(config.seed)
    if request.init:
        learner = load_learner_checkpoint(request.init, backbone)
        if request.learner not in ("", learner.name):
            raise UserError(f"--init {request.init} holds a '{learner.name}' learner, not '{request.learner}'")
    else:
        learner = build_learner(request.learner, backbone, request.learner_options)
    method = build_method(request.method, learner, train_data.classnames, request.method_options)
    lr = config.lr if config.lr is not None else getattr(method, "default_lr", lambda _: method.lr)(learner.name)
    settings = {"request": _jsonable(request), "lr": lr, "train_images": len(train_data)}
    with atomic_path(folder / SETTINGS) as tmp:
        tmp.write_text(json.dumps(settings, indent=2))

    extra = {"method": request.method, "method_options": method.options, "train": config.to_dict(), "lr": lr,
             "dataset": request.dataset, "subset": request.subset, "shots": request.shots}
    checkpoint = folder / CHECKPOINT
    fit = method.fit if method.fit is not None else partial(train, method)
    outcome = fit(train_data, config, lr, log_path=folder / LOG,
                  on_epoch_end=lambda epoch: learner.save(checkpoint, {**extra, "epoch": epoch}), progress=progress)
    learner.save(checkpoint, {**extra, "epoch": config.epochs, "final": True})

    evaluator = Evaluator(learner, EvalSettings(templates=eval_templates.templates, perturbations=tuple(eval_specs),
                                                seed=config.seed, bootstrap=request.bootstrap), progress=progress)
    subsets = [evaluator.run(ds, subset=name) for ds, name in zip(test_sets, eval_subsets)]
    run = {**run_info, **backbone_fields(backbone), "learner": learner.name, "learner_options": learner.options,
           "checkpoint": str(checkpoint), "dataset": sources[0], "split": "test",
           "subset": "base-new" if len(eval_subsets) == 2 else request.subset,
           "templates_name": eval_templates.name, "templates": list(eval_templates.templates),
           "perturbations": [{"label": p.label, "op": p.op, "rate": p.rate, "level": p.level} for p in eval_specs],
           "draws": 1, "seed": config.seed, "bootstrap": request.bootstrap, "device": str(backbone.device),
           "training": {**extra, "steps": outcome.steps, "first_loss": outcome.losses[0] if outcome.losses else None,
                        "last_loss": outcome.losses[-1] if outcome.losses else None,
                        "train_wall_time_s": outcome.wall_time_s, "skipped_images": outcome.skipped_images}}
    doc = build_result(run, subsets)
    write_json(doc, folder / RESULT)
    return doc


def _jsonable(request: TrainRequest) -> dict[str, Any]:
    data = dict(request.__dict__)
    data["config"] = request.config.to_dict()
    data["dataset_options"] = dict(request.dataset_options.__dict__)
    return data

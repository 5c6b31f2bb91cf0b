"""The Python API's front doors: a learner by name or checkpoint; evaluate, train, compare.

Each is a thin front to the library function the command line calls (`run_evaluation`,
`run_training`, `run_comparison`), taking Python objects where the CLI takes strings, so a
notebook and a shell command produce the same result document. ``import promptbench_vlm as pb``
exports them lazily (``pb.evaluate_learner``); ``docs/api.md`` shows a session.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from .backbone import Backbone, load_backbone
from .compare.run import ComparisonResult, run_comparison
from .compare.sweep import build_sweep
from .data import DatasetOptions, ImageDataset
from .errors import UserError
from .evaluate import ProgressFn
from .evaluation import EvalRequest, literal, load_inputs, run_evaluation
from .learners import build_learner, check_learner_options, is_checkpoint, load_learner_checkpoint
from .learners.base import PromptLearner
from .train.loop import TrainConfig
from .train.run import TrainRequest, run_training
from .wordings import WordingProtocol


def load_learner(learner: str | Path, backbone: Backbone | None = None, device: str = "auto",
                 **options: Any) -> PromptLearner:
    """A learner by registered name (built-in or plug-in) or rebuilt from a checkpoint file.

    Args:
        learner: A registered name (``"coop"``; ``promptbench list learners``) or the path of a
            learner checkpoint (``.safetensors``), which records its learner and options.
        backbone: The backbone to build on; None loads ``toy-clip`` for a name, and for a
            checkpoint the backbone it records.
        device: Where a backbone loaded here goes.
        **options: The learner's options, checked against its declaration (not for a checkpoint).

    Raises:
        UserError: unknown learner or option, a bad value, or a checkpoint of another backbone.
    """
    if is_checkpoint(str(learner)):
        if options:
            raise UserError(f"{learner} is a checkpoint: its options are the recorded ones, not {sorted(options)}")
        return load_learner_checkpoint(learner, backbone, device)
    checked = check_learner_options(str(learner), options)
    return build_learner(str(learner), backbone or load_backbone(device=device), checked)


def evaluate_learner(learner: PromptLearner, dataset: str | ImageDataset = "toy-shapes", *, subset: str = "all",
             split: str = "test", output: str | Path | None = None, progress: ProgressFn | None = None,
             **settings: Any) -> dict[str, Any]:
    """Score `learner` as ``promptbench evaluate`` does; return the result document.

    Args:
        learner: Any learner (`load_learner`, a trained one, a plug-in instance).
        dataset: A dataset spec (``"folder:PATH"``, ...) or an `ImageDataset` object.
        subset: ``all``, ``base``, ``new`` or ``base-new``.
        split: The split a spec is read from.
        output: Also write the result file here (None: only return it).
        **settings: Any other `EvalRequest` field: ``templates``, ``perturb``, ``draws``, ``seed``,
            ``bootstrap``, ``batch_size``, ``cache``, ``wordings`` (a `WordingProtocol`), ...

    Raises:
        UserError: bad input (an unknown template set, perturbation, subset or setting).
    """
    known = {f.name for f in fields(EvalRequest)} - {"model", "pretrained", "learner", "learner_options", "dataset",
                                                    "dataset_options", "subset", "output", "resume"}
    if unknown := sorted(set(settings) - known):
        raise UserError(f"evaluate: unknown setting(s) {unknown}; valid: {', '.join(sorted(known))}")
    backbone = learner.backbone
    request = EvalRequest(model=backbone.spec, pretrained=backbone.pretrained,
                          learner=getattr(learner, "checkpoint_path", None) or learner.name,
                          learner_options=dict(learner.options),
                          dataset=dataset if isinstance(dataset, str) else dataset.name,
                          dataset_options=DatasetOptions(split=split), subset=subset,
                          output=None if output is None else literal(output), device=str(learner.device), **settings)
    inputs = load_inputs(request, None if isinstance(dataset, str) else dataset)
    return run_evaluation(request, learner=learner, inputs=inputs, progress=progress).doc


def train_learner(method: str = "erm", learner: str = "coop", dataset: str | list[str] = "toy-shapes", *,
          output: str | Path, model: str = "toy-clip", pretrained: str | None = None,
          learner_options: dict[str, Any] | None = None, method_options: dict[str, Any] | None = None,
          wordings: WordingProtocol | None = None, progress: ProgressFn | None = None,
          **settings: Any) -> dict[str, Any]:
    """Train as ``promptbench train`` does; return the result document of its final evaluation.

    The run folder `output` gets the checkpoint (``learner.safetensors``), the step log and the
    result (``docs/cli.md``).

    Args:
        **settings: `TrainConfig` fields (``epochs``, ``batch_size``, ``lr``, ``seed``, ...) and
            other `TrainRequest` fields (``shots``, ``subset``, ``init``, ``eval_templates``,
            ``eval_perturb``, ``bootstrap``, ``device``, ``overwrite``, ``resume``).

    Raises:
        UserError: bad input, a method that cannot train the learner, a finished run without
            ``overwrite=True``.
    """
    config_keys = {f.name for f in fields(TrainConfig)}
    request_keys = {f.name for f in fields(TrainRequest)} - {"config", "output"}
    if unknown := sorted(set(settings) - config_keys - request_keys):
        raise UserError(f"train: unknown setting(s) {unknown}; valid: {', '.join(sorted(config_keys | request_keys))}")
    config = TrainConfig(**{k: v for k, v in settings.items() if k in config_keys})
    request = TrainRequest(method=method, learner=learner, dataset=dataset, output=str(output), model=model,
                           pretrained=pretrained, learner_options=dict(learner_options or {}),
                           method_options=dict(method_options or {}), wordings=wordings, config=config,
                           **{k: v for k, v in settings.items() if k in request_keys - config_keys})
    return run_training(request, progress=progress)


def compare_methods(methods: list[str], learners: list[str], datasets: list[str] | None = None, *, output: str | Path,
            progress: ProgressFn | None = None, skip_existing: bool = False, overwrite: bool = False,
            plot: bool = False, **sweep: Any) -> ComparisonResult:
    """Run a comparison grid as ``promptbench compare`` does; return its summaries and tests.

    Args:
        methods: Methods to compare; ``"zeroshot"`` is the untrained learner.
        learners: Learners (pairs that do not fit are left out).
        datasets: Dataset specs (default ``["toy-shapes"]``).
        output: Folder of the runs, ``summary.json`` and ``report.md``.
        **sweep: Any other sweep key (``docs/compare.md``): ``seeds``, ``shots``, ``epochs``,
            ``templates``, ``perturb``, ``bootstrap``, ``model``, ``reference``, ``wordings``,
            ``method`` (per-method tables), ``attack`` (e.g. ``{"budget": 300}``: every cell's
            worst-case accuracy, `compare.attacks`), ``protocol`` and ``targets`` (cross-dataset
            and domain-generalisation transfer, ``protocol="cross-dataset", targets=["toy-colours"]``), ...

    Raises:
        UserError: a bad sweep (unknown key, method or learner), or no run finished.
    """
    values = {"methods": methods, "learners": learners, "output": str(output), **sweep}
    if datasets is not None:
        values["datasets"] = datasets
    return run_comparison(build_sweep(values), source="Python API", skip_existing=skip_existing,
                          overwrite=overwrite, plot=plot, progress=progress)

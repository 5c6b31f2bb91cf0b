"""promptbench_vlm: how far do a prompt learner's predictions move when its prompt's wording moves?

The public Python API (``docs/api.md``)::

    import promptbench_vlm as pb

    backbone = pb.load_backbone("toy-clip")
    learner = pb.load_learner("coop", backbone)          # a name, a plug-in's name, or a checkpoint
    doc = pb.evaluate_learner(learner, "toy-shapes", subset="base-new")
    pb.render(doc)

Names are imported on first use, so ``import promptbench_vlm`` stays cheap (no torch) until one
is touched. (The verbs carry a noun, ``evaluate_learner`` rather than ``evaluate``: the
submodules ``evaluate``, ``train`` and ``compare`` own those attribute names of the package.)
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("promptbench_vlm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

_EXPORTS = {
    # load
    "load_backbone": "backbone", "Backbone": "backbone",
    "load_learner": "api", "PromptLearner": "learners.base", "LEARNERS": "learners",
    "load_dataset": "data", "DatasetOptions": "data", "ImageDataset": "data",
    # evaluate, train, compare
    "evaluate_learner": "api", "EvalRequest": "evaluation", "run_evaluation": "evaluation",
    "train_learner": "api", "TrainRequest": "train.run", "TrainConfig": "train.loop", "run_training": "train.run",
    "METHODS": "train.method",
    "compare_methods": "api", "run_comparison": "compare.run", "build_sweep": "compare.sweep",
    "WordingProtocol": "wordings",
    # read and show a result
    "read_result": "results", "write_csv": "results", "result_schema": "results", "render": "report",
    "UserError": "errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .api import compare_methods, evaluate_learner, load_learner, train_learner
    from .backbone import Backbone, load_backbone
    from .compare.run import run_comparison
    from .compare.sweep import build_sweep
    from .data import DatasetOptions, ImageDataset, load_dataset
    from .errors import UserError
    from .evaluation import EvalRequest, run_evaluation
    from .learners import LEARNERS
    from .learners.base import PromptLearner
    from .report import render
    from .results import read_result, result_schema, write_csv
    from .train.loop import TrainConfig
    from .train.method import METHODS
    from .train.run import TrainRequest, run_training
    from .wordings import WordingProtocol


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'promptbench_vlm' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

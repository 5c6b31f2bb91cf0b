"""Learners: the registry (entry-point group `promptbench_vlm.learners`) and how to build one.

Built-in learners are declared in this package's own `pyproject.toml` under the same group a
plug-in uses, so `promptbench list learners` shows both the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..backbone import Backbone, load_backbone
from ..errors import UserError
from ..options import parse_given
from ..registry import Registry
from .base import Capabilities, PromptLearner, read_checkpoint

LEARNERS: Registry[type[PromptLearner]] = Registry("promptbench_vlm.learners", "learner")


def is_checkpoint(spec: str) -> bool:
    """True when a --learner value names a checkpoint file rather than a registered learner.

    A registered name wins over a file of that name in the working directory unless the value
    looks like a path (``./zeroshot``, ``runs/x/learner.safetensors``): a stray file called
    ``zeroshot`` must not turn the zero-shot learner into a checkpoint.
    """
    if spec.endswith(".safetensors") or "/" in spec or os.sep in spec:
        return True
    return spec not in LEARNERS.names() and Path(spec).is_file()


def learner_class(name: str) -> type[PromptLearner]:
    """The registered learner class `name`.

    Raises:
        UserError: an unknown name (listing the valid ones) or an object that is no PromptLearner.
    """
    cls = LEARNERS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, PromptLearner)):
        raise UserError(f"learner '{name}' ({LEARNERS.origin(name)}) is not a PromptLearner subclass")
    return cls


def check_learner_options(name: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """`options` of learner `name` checked against its declaration and typed (only the keys
    given), before any model loads.

    Raises:
        UserError: unknown learner, unknown option (with "did you mean") or a value of the wrong type.
    """
    return parse_given(f"learner '{name}'", learner_class(name).Options, options)


def build_learner(name: str, backbone: Backbone, options: dict[str, Any] | None = None) -> PromptLearner:
    """Instantiate the registered learner `name` on `backbone` with `options` (checked against
    its declared options; a TypeError from the learner's own code names the place it was raised)."""
    cls = learner_class(name)
    try:
        learner = cls(backbone, **(options or {}))
    except TypeError as err:
        raise LEARNERS.raised_inside(name, err) from err
    return learner.to(backbone.device)


def load_learner_checkpoint(path: str | Path, backbone: Backbone | None = None, device: str = "auto") -> PromptLearner:
    """Rebuild a learner from its checkpoint alone (or on `backbone` if given, which must match).

    Raises:
        UserError: unreadable file, unknown learner, or a checkpoint made for another backbone.
    """
    tensors, meta = read_checkpoint(path)
    recorded = meta["backbone"]
    if backbone is None:
        backbone = load_backbone(recorded.get("model", ""), recorded.get("pretrained"), device)
    if recorded.get("weights_sha256") and recorded["weights_sha256"] != backbone.weights_hash():
        raise UserError(
            f"checkpoint {path} was trained on backbone {recorded.get('model')} "
            f"(weights {recorded['weights_sha256']}), not on {backbone.name} (weights {backbone.weights_hash()})"
        )
    learner = build_learner(meta["learner"], backbone, meta["options"])
    learner.load_learned_state(tensors, str(path))
    learner.checkpoint_path = str(path)
    return learner


__all__ = ["LEARNERS", "Capabilities", "PromptLearner", "build_learner", "check_learner_options", "is_checkpoint",
           "learner_class", "load_learner_checkpoint"]

"""The papers' three evaluation protocols, and how a result file names the target datasets.

- ``base2new``: train on the base classes of a dataset, evaluate on its base and new classes (H).
- ``cross-dataset``: train on a source dataset with all its classes, evaluate on the source's
  test split and on each target dataset with the target's own classes (ImageNet -> the 10
  other CoOp datasets; on the toy world toy-shapes -> toy-colours, toy-forms).
- ``domain-generalization``: the same, on targets that hold the source's classes (or a subset of
  them) in another domain (ImageNet -> -V2, -Sketch, -A, -R; toy-shapes -> toy-shapes:DOMAIN).

One evaluation scores the source and every target (`evaluation.EvalRequest.targets`): each
target is a subset of the result file named ``target:LABEL`` (`target_subset`), scored by the
same evaluator as ``all``, ``base`` and ``new``.
"""

from __future__ import annotations

import re
from pathlib import PurePath

from .data.base import ImageDataset
from .errors import UserError
from .names import unknown_name_error

BASE2NEW, CROSS_DATASET, DOMAIN_GENERALIZATION = "base2new", "cross-dataset", "domain-generalization"
PROTOCOLS = (BASE2NEW, CROSS_DATASET, DOMAIN_GENERALIZATION)
TARGET_PREFIX = "target:"
TARGET_AVERAGE = "target-average"
"""The pseudo-subset of the comparison tables: the mean over the targets of their accuracies."""


def check_protocol(protocol: str, targets: list[str]) -> None:
    """Refuse an unknown protocol, a transfer protocol without targets, or base-to-new with them.

    Raises:
        UserError: as above, naming the valid protocols.
    """
    if protocol not in PROTOCOLS:
        raise unknown_name_error("protocol", protocol, PROTOCOLS)
    if protocol == BASE2NEW and targets:
        raise UserError(f"targets {targets} need protocol = \"{CROSS_DATASET}\" or \"{DOMAIN_GENERALIZATION}\"; "
                        f"{BASE2NEW} scores the source's base and new classes only")
    if protocol != BASE2NEW and not targets:
        raise UserError(f"protocol \"{protocol}\" needs targets (a list of dataset specs, or --target), e.g. "
                        + ('["toy-colours", "toy-forms"]' if protocol == CROSS_DATASET
                           else '["toy-shapes:v2", "toy-shapes:sketch"]'))


def target_label(spec: str) -> str:
    """A short, file-name-safe name of a target spec: what precedes ``@ROOT``, a path's last part.

    ``coop:imagenet_a@/data`` -> ``coop-imagenet_a``, ``toy-shapes:sketch`` -> ``toy-shapes-sketch``,
    ``folder:/data/pets`` -> ``folder-pets``.
    """
    head = spec.partition("@")[0]
    kind, sep, argument = head.partition(":")
    if "/" in argument or "\\" in argument:
        argument = PurePath(argument.rstrip("/\\")).name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{kind}{sep}{argument}").strip("-")


def target_subsets(specs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Result subset name (``target:LABEL``) -> target spec, in order.

    Raises:
        UserError: two targets with the same label (the result file could not tell them apart).
    """
    out: dict[str, str] = {}
    for spec in specs:
        name = target_subset(spec)
        if name in out:
            raise UserError(f"targets '{out[name]}' and '{spec}' have the same name '{name}': give one of them "
                            "another path")
        out[name] = spec
    return out


def target_subset(spec: str) -> str:
    """The result subset of one target: ``target:`` and its `target_label`."""
    return TARGET_PREFIX + target_label(spec)


def is_target(subset: str) -> bool:
    """Whether a result subset (``target:toy-colours@held-out`` too) is a target dataset."""
    return subset.startswith(TARGET_PREFIX)


def check_domain_targets(source: ImageDataset, targets: dict[str, ImageDataset]) -> None:
    """Refuse a domain-generalisation target whose classes are not the source's (or a subset of them).

    Under ``domain-generalization`` the learner is scored on the classes it was trained on, in a
    shifted domain; a target with other classes belongs to ``cross-dataset``.

    Raises:
        UserError: naming the target and a class the source lacks.
    """
    known = set(source.classnames)
    for spec, dataset in targets.items():
        if foreign := [c for c in dataset.classnames if c not in known]:
            raise UserError(f"domain-generalization target '{spec}' has classes the source '{source.name}' lacks "
                            f"(e.g. '{foreign[0]}'): use protocol = \"{CROSS_DATASET}\" for other classes")

"""The sweep: which methods, learners, datasets and seeds to run, from a TOML file or flags.

Every name is checked against the registries before anything runs, so a typo in the last
method of a sweep fails in a second, not after an hour of training.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..attack import AttackSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from ..errors import UserError
from ..files import read_user_text
from ..names import unknown_name_error
from ..protocols import BASE2NEW, check_protocol, target_subsets

ZEROSHOT = "zeroshot"
"""The method entry that evaluates the zero-shot learner without training."""
MULTI_TEMPLATE_CONTROL = "erm-multi"
"""The registered method that robust methods are compared against by default."""


@dataclass(frozen=True)
class MethodSettings:
    """Per-method overrides from a ``[method.NAME]`` table: some methods need other budgets, or
    fit other learners (PromptSRC trains IVLP only). With `method`, NAME is a label of its own
    for a registered method with these options (the Promise ladder's ``promise-plain``). With
    `preset` (``presets.PRESETS``), the preset's method, learner, options, epochs, batch size and
    rate fill what the table does not set (the sweep's backbone, shots and data stay the sweep's);
    `preset_record` is what the runs record."""

    method: str | None = None
    learners: list[str] | None = None
    epochs: int | None = None
    lr: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None
    batch_size: int | None = None
    learner_options: dict[str, Any] = field(default_factory=dict)
    preset_record: dict[str, Any] | None = None


@dataclass(frozen=True)
class Sweep:
    """A comparison grid; field names are the TOML keys (docs/compare.md)."""

    methods: list[str]
    learners: list[str] = field(default_factory=lambda: ["coop"])
    datasets: list[str] = field(default_factory=lambda: ["toy-shapes"])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    shots: int = 16
    epochs: int = 5
    batch_size: int = 8
    lr: float | None = None
    templates: str = "promptsrc60"
    perturb: str = "default"
    bootstrap: int = 1000
    model: str = "toy-clip"
    pretrained: str | None = None
    device: str = "auto"
    output: str = "runs/compare"
    reference: str | None = None
    wordings: str = "split"
    held_out: float = 1 / 3
    wording_seed: int = 0
    out_of_family: str = "out_of_family"
    protocol: str = "base2new"  # or cross-dataset, domain-generalization (`protocols`), with `targets`
    targets: list[str] = field(default_factory=list)
    method: dict[str, MethodSettings] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)  # submitit parameters of each run (--launcher)
    attack: AttackSettings | None = None  # worst-case accuracy of every cell (compare/attacks.py)

    def settings(self, method: str) -> MethodSettings:
        """The overrides of `method` (none when it has no table)."""
        return self.method.get(method, MethodSettings())

    def registered(self, method: str) -> str:
        """The registered method a sweep entry runs: its table's `method`, else its own name."""
        return self.settings(method).method or method

    def reference_name(self) -> str:
        """The reference of the paired tests: as given, else the multi-template control
        (``erm-multi``) when run, else zeroshot when run, else the first method."""
        if self.reference:
            return self.reference
        controls = [m for m in self.methods if self.registered(m) == MULTI_TEMPLATE_CONTROL]
        if controls:
            return controls[0]
        return ZEROSHOT if ZEROSHOT in self.methods else self.methods[0]

    @property
    def train_subset(self) -> str:
        """The classes a trained cell trains on: base for base-to-new, all for the transfer protocols."""
        return "base" if self.protocol == BASE2NEW else "all"

    @property
    def eval_subset(self) -> str:
        """The source classes a cell is scored on (the targets come after them)."""
        return "base-new" if self.protocol == BASE2NEW else "all"

    def wording_protocol(self):
        """The sweep's wording protocol (`wordings.WordingProtocol`), or None for ``wordings = "all"``."""
        from ..wordings import protocol_for

        return protocol_for(self.wordings, self.templates, self.held_out, self.wording_seed, self.out_of_family)


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid: a method training a learner on a dataset with a seed."""

    method: str
    learner: str
    dataset: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}/{self.learner}/{self.dataset}/seed{self.seed}"


_LISTS = {"methods": str, "learners": str, "datasets": str, "seeds": int, "targets": str}
_SCALARS = {"protocol": str, "shots": int, "epochs": int, "batch_size": int, "lr": float, "templates": str, "perturb": str,
            "bootstrap": int, "model": str, "pretrained": str, "device": str, "output": str, "reference": str,
            "wordings": str, "held_out": float, "wording_seed": int, "out_of_family": str}


def read_sweep_file(path: str | Path) -> dict[str, Any]:
    """The raw tables of a sweep TOML file.

    Raises:
        UserError: missing file, a folder, or invalid TOML (with the parser's line and column).
    """
    if not Path(path).exists():
        raise UserError(f"sweep file not found: {path}")
    text = read_user_text(path, "sweep file")  # a folder or unreadable file: one line; Latin-1: a warning
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"sweep file {path} is not valid TOML: {err}") from None


def _typed(key: str, value: Any, kind: type) -> Any:
    """`value` as `kind`, refusing what TOML would let through (a string seed, a bool epoch count)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UserError(f"sweep key '{key}' must be {kind.__name__}, got {value!r}")
    return value


def build_sweep(values: dict[str, Any]) -> Sweep:
    """Validate raw sweep values (file tables merged with flags) into a `Sweep`.

    Raises:
        UserError: an unknown key, a wrong type, an empty list, an unknown method or learner
            (listing the registered ones), or a method table for a method not in the sweep.
    """
    from ..learners import LEARNERS
    from ..train.method import METHODS, check_method_options

    known = set(_LISTS) | set(_SCALARS) | {"method", "resources", "attack"}
    for key in values:
        if key not in known:
            raise unknown_name_error("sweep key", key, known)
    if "methods" not in values:
        raise UserError("a sweep needs 'methods' (a list, e.g. [\"zeroshot\", \"erm\"]) or --method")
    kwargs: dict[str, Any] = {}
    for key, kind in _LISTS.items():
        if key in values:
            items = values[key] if isinstance(values[key], list) else [values[key]]
            if not items:
                raise UserError(f"sweep key '{key}' is an empty list")
            kwargs[key] = list(dict.fromkeys(_typed(key, v, kind) for v in items))
    for key, kind in _SCALARS.items():
        if values.get(key) is not None:
            kwargs[key] = _typed(key, values[key], kind)
    tables = values.get("method", {})
    if not isinstance(tables, dict):
        raise UserError("sweep key 'method' must be tables: [method.NAME] with method, learners, epochs, lr, options")
    for name in kwargs["methods"]:
        if name != ZEROSHOT:  # an unknown name lists the registered ones
            entry = tables.get(name) if isinstance(tables.get(name), dict) else {}
            if "method" not in entry and "preset" in entry:
                from ..presets import get_preset

                entry = {"method": get_preset(str(entry["preset"])).method}
            METHODS.get(entry.get("method", name))
    if name_errors := [n for n in kwargs.get("learners", []) if n not in LEARNERS.names()]:
        raise unknown_name_error("learner", name_errors[0], LEARNERS.names())
    kwargs["method"] = {}
    for name, table in tables.items():
        if name not in kwargs["methods"]:
            raise unknown_name_error("method in [method.NAME] (not in 'methods')", name, kwargs["methods"])
        allowed = {f.name for f in fields(MethodSettings)} - {"preset_record"}
        if not isinstance(table, dict) or set(table) - allowed:
            raise UserError(f"[method.{name}] may set only {', '.join(sorted(allowed))}; got {table!r}")
        learners = table.get("learners")
        if learners is not None:
            if not isinstance(learners, list) or not learners:
                raise UserError(f"[method.{name}] learners must be a non-empty list of learner names")
            learners = [_typed(f"method.{name}.learners", v, str) for v in learners]
            if bad := [n for n in learners if n not in LEARNERS.names()]:
                raise unknown_name_error("learner", bad[0], LEARNERS.names())
        registered = _typed(f"method.{name}.method", table["method"], str) if "method" in table else None
        preset = _typed(f"method.{name}.preset", table["preset"], str) if "preset" in table else None
        if preset and registered is None:
            from ..presets import get_preset

            registered = get_preset(preset).method
        settings = MethodSettings(
            method=registered,
            learners=learners,
            epochs=_typed(f"method.{name}.epochs", table["epochs"], int) if "epochs" in table else None,
            lr=_typed(f"method.{name}.lr", table["lr"], float) if "lr" in table else None,
            options=check_method_options(registered or name,
                                         _typed(f"method.{name}.options", table.get("options", {}), dict)),
            preset=preset,
            batch_size=_typed(f"method.{name}.batch_size", table["batch_size"], int) if "batch_size" in table else None,
            learner_options=_typed(f"method.{name}.learner_options", table.get("learner_options", {}), dict))
        kwargs["method"][name] = with_preset(settings) if settings.preset else settings
    kwargs["resources"] = _typed("resources", values.get("resources", {}), dict)
    if "attack" in values:
        from .attacks import attack_settings

        kwargs["attack"] = attack_settings(values["attack"])
    sweep = Sweep(**kwargs)
    if sweep.epochs < 1 or sweep.shots < 0 or sweep.bootstrap < 0 or sweep.batch_size < 1:
        raise UserError("sweep: epochs and batch_size must be >= 1, shots and bootstrap >= 0")
    sweep.wording_protocol()  # an unknown wordings mode fails here
    check_protocol(sweep.protocol, sweep.targets)
    target_subsets(sweep.targets)  # two targets of one name fail here
    if negative := [s for s in sweep.seeds if s < 0]:
        raise UserError(f"sweep: seeds must be 0 or more, got {negative[0]}")
    for where, lr in [("lr", sweep.lr), *((f"method.{m}.lr", t.lr) for m, t in sweep.method.items())]:
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            raise UserError(f"sweep: {where} must be a positive number, got {lr}")
    if sweep.reference:
        cells = {name for spec in plan(sweep)[0] for name in (spec.method, f"{spec.method}/{spec.learner}")}
        if sweep.reference not in cells:
            raise unknown_name_error("--reference (METHOD or METHOD/LEARNER of the grid)", sweep.reference, cells)
    return sweep


def with_preset(settings: MethodSettings) -> MethodSettings:
    """`settings` with its preset's values where the table sets none, and the preset record."""
    from dataclasses import replace

    from ..presets import apply_preset

    given = {"method": settings.method, "learner": settings.learners[0] if settings.learners else None,
             "epochs": settings.epochs, "batch_size": settings.batch_size, "lr": settings.lr,
             "learner_options": settings.learner_options, "method_options": settings.options}
    explicit = {k for k, v in given.items() if v not in (None, {})}
    merged, record = apply_preset(settings.preset, given, explicit)
    return replace(settings, method=merged["method"], learners=settings.learners or [merged["learner"]],
                   epochs=merged["epochs"], batch_size=merged["batch_size"], lr=merged["lr"],
                   options=merged["method_options"], learner_options=merged["learner_options"],
                   preset_record=record)


def missing(method: str, learner: str) -> list[str]:
    """The capabilities `method` needs that `learner` lacks (``trainable parameters`` for zeroshot);
    empty when it fits."""
    from ..learners import learner_class
    from ..train.method import METHODS

    return ["trainable parameters"] if learner == ZEROSHOT else METHODS.get(method).missing(learner_class(learner))


def plan(sweep: Sweep) -> tuple[list[RunSpec], list[str]]:
    """The grid's runs in order, and the method/learner pairs left out because they do not fit.

    ``zeroshot`` runs once per dataset and seed (the seed fixes its perturbation draws and
    bootstrap), whatever the learners.

    Raises:
        UserError: a trained method that fits none of the sweep's learners.
    """
    runs: list[RunSpec] = []
    left_out: list[str] = []
    for method in sweep.methods:
        if method == ZEROSHOT:
            learners = [ZEROSHOT]
        else:
            wanted = sweep.settings(method).learners or sweep.learners
            lacking = {lr: missing(sweep.registered(method), lr) for lr in wanted}
            learners = [lr for lr in wanted if not lacking[lr]]
            left_out += [f"{method}/{lr}" for lr in wanted if lacking[lr]]
            if not learners:
                reasons = "; ".join(f"{lr} lacks {', '.join(lacking[lr])}" for lr in wanted)
                raise UserError(f"method '{method}' fits none of the learners {wanted} ({reasons})")
        runs += [RunSpec(method, lr, ds, seed) for ds in sweep.datasets for lr in learners for seed in sweep.seeds]
    return runs, left_out

"""Worst-case accuracy in a sweep: `attack.run_attack` on every finished cell, beside its result.

A cell's attack runs on the cell's own checkpoint (the zero-shot learner for ``zeroshot``), on
the split and each class subset its result was scored on (``base`` and ``new`` for base-to-new),
starting from the sweep's templates, with the sweep's ``attack`` settings. The search / report
halves and the candidate order follow the attack's seed, never the cell's: every cell of a
dataset is reported on the same report images, so its per-image worst-case correctness pairs
with the reference's (`stats`). Each result is ``attack-SUBSET.json`` in the cell folder. A
later sweep reuses it only when what it records (settings, start templates, checkpoint hash,
backbone, data, seed, bootstrap) equals what the sweep asks now; otherwise it is rerun and the
differing keys are named. Attacks run in the process that runs the grid, after the cells, and
share one `cache.MemoryCache`. See docs/compare.md ("Worst-case accuracy").
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..files import FolderBusy, claim_folder, release_folder, sha256_file
from ..names import unknown_name_error
from ..results import read_result
from ..train.run import CHECKPOINT, RESULT
from ..wordings import split_subset_name
from .sweep import ZEROSHOT, RunSpec, Sweep

if TYPE_CHECKING:
    from ..attack import AttackSettings
    from ..evaluate import ProgressFn
    from .grid import RunRecord

ATTACK_FILES: dict[str, str] = {subset: f"attack-{subset}.json" for subset in ("all", "base", "new")}
"""The attack result of each class subset in a cell folder (the files a cell's rerun may remove)."""
_TEXT_KEYS = ("objective", "search_split")


def attack_settings(table: Any) -> AttackSettings:
    """The sweep's ``attack = { budget = ..., ... }`` table as `attack.AttackSettings` (unset keys
    keep their defaults).

    Raises:
        UserError: not a table, an unknown key (with "did you mean"), a wrong type or a bad value.
    """
    from ..attack import AttackSettings

    if not isinstance(table, dict):
        raise UserError(f"sweep key 'attack' must be a table, e.g. attack = {{ budget = 300 }}; got {table!r}")
    allowed = [f.name for f in fields(AttackSettings)]
    for key, value in table.items():
        if key not in allowed:
            raise unknown_name_error("attack setting", key, allowed)
        kind = str if key in _TEXT_KEYS else int
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"sweep key 'attack.{key}' must be {kind.__name__}, got {value!r}")
    return AttackSettings(**table)


def attack_subsets(result: dict[str, Any]) -> list[str]:
    """The class subsets a cell's result was scored on (``base``, ``new`` or ``all``), wording pools aside."""
    return [s for s in dict.fromkeys(split_subset_name(name)[0] for name in result["subsets"]) if s in ATTACK_FILES]


def attack_request(sweep: Sweep, spec: RunSpec, folder: Path, run: dict[str, Any], subset: str):
    """The `EvalRequest` of a cell's attack on one class subset: its checkpoint, data and split as
    its result records them, the sweep's templates and bootstrap, the cell's seed for the intervals."""
    from ..data import DatasetOptions
    from ..evaluation import EvalRequest, literal

    learner = ZEROSHOT if spec.method == ZEROSHOT else str(folder / CHECKPOINT)
    return EvalRequest(model=sweep.model, pretrained=sweep.pretrained, learner=learner, dataset=run["dataset"],
                       dataset_options=DatasetOptions(split=run["split"]), subset=subset, templates=sweep.templates,
                       seed=spec.seed, bootstrap=sweep.bootstrap, device=sweep.device, cache=False,
                       output=literal(folder / ATTACK_FILES[subset]))


def wanted_record(sweep: Sweep, spec: RunSpec, folder: Path, run: dict[str, Any], subset: str) -> dict[str, Any]:
    """What the attack file of a cell's subset must record to be reused: the attack settings, the
    learner (the checkpoint's hash for a trained cell), the backbone and data the cell's result
    records, the start templates, the seed and the bootstrap."""
    from ..attack import DETERMINERS
    from ..templates import load_templates

    assert sweep.attack is not None
    trained = spec.method != ZEROSHOT
    return {"attack": {**asdict(sweep.attack), "determiners": list(DETERMINERS)},
            **({} if trained else {"learner": ZEROSHOT}),
            "checkpoint_sha256": sha256_file(folder / CHECKPOINT) if trained else None,
            "model": run["model"], "pretrained": run["pretrained"], "backbone_sha256": run["backbone_sha256"],
            "dataset": run["dataset"], "split": run["split"], "subset": subset,
            "templates": list(load_templates(sweep.templates).templates), "lexicon": "shipped",
            "seed": spec.seed, "bootstrap": sweep.bootstrap}


def _differences(doc: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The keys of `wanted` the attack document records otherwise (``attack.budget`` for a setting)."""
    out = []
    for key, value in json.loads(json.dumps(wanted)).items():
        recorded = doc["run"].get(key)
        if key == "attack" and isinstance(recorded, dict):
            out += [f"attack.{k}" for k in sorted(set(value) | set(recorded)) if value.get(k) != recorded.get(k)]
        elif recorded != value:
            out.append(key)
    return out


def _ours(path: Path) -> bool:
    """Whether `path` is an attack result this package wrote (any version, valid or not)."""
    from ..attack import ATTACK_SCHEMA

    try:
        return json.loads(path.read_text(encoding="utf-8")).get("schema") == ATTACK_SCHEMA
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def cell_attacks(sweep: Sweep, spec: RunSpec, folder: Path, result: dict[str, Any]
                 ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The attack results of a finished cell (whose result document is `result`) that fit the
    sweep, and why the others do not.

    Returns:
        Per class subset, the attack document that records what the sweep asks; and one
        ``SUBSET: reason`` per subset without one (``missing``, or the keys that differ).

    Raises:
        UserError: an attack file that this package did not write (it is never replaced).
    """
    from ..attack import read_attack

    found, stale = {}, []
    for subset in attack_subsets(result):
        path = folder / ATTACK_FILES[subset]
        if not path.exists():
            stale.append(f"{subset}: missing")
            continue
        if not _ours(path):
            raise UserError(f"{path} is not an attack result of promptbench_vlm; it is left alone: move it away")
        try:
            doc = read_attack(path)
        except UserError as err:
            stale.append(f"{subset}: {err}")
            continue
        differing = _differences(doc, wanted_record(sweep, spec, folder, result["run"], subset))
        if differing:
            stale.append(f"{subset}: recorded {', '.join(differing)} differ")
        else:
            found[subset] = doc
    return found, stale


def attack_cell(sweep: Sweep, spec: RunSpec, folder: Path, features: Any, progress: ProgressFn | None,
                note: Callable[[str], None]) -> str:
    """Attack each class subset of a finished cell whose attack file does not fit the sweep.

    Returns:
        ``existing`` when every subset's attack was reused, else ``done``.
    """
    from ..attack import run_attack

    result = read_result(folder / RESULT)
    found, stale = cell_attacks(sweep, spec, folder, result)
    if not stale:
        return "existing"
    if reasons := [s for s in stale if not s.endswith(": missing")]:
        note(f"warning: rerunning the attack of {spec.name}: its recorded settings differ ({'; '.join(reasons)})")
    assert sweep.attack is not None
    for subset in attack_subsets(result):
        if subset not in found:
            run_attack(attack_request(sweep, spec, folder, result["run"], subset), sweep.attack, features=features,
                       progress=progress, note=note)
    return "done"


def our_attack_files(folder: Path) -> list[str]:
    """The attack files in a cell folder that this package wrote (a cell's rerun removes them)."""
    return [name for name in ATTACK_FILES.values() if _ours(folder / name)]


def attack_cells(sweep: Sweep, records: list[RunRecord], progress: ProgressFn | None = None,
                 note: Callable[[str], None] | None = None) -> None:
    """Run the attack of every finished cell (`attack_cell`), one after another in this process,
    and set each record's ``attack`` status: ``done``, ``existing`` (reused), ``not applicable:
    ...`` (the learner lacks a capability the attack needs) or ``failed: ...``.

    One `MemoryCache` serves every cell, so images and prompts are encoded once wherever their
    cache key is the same (the zero-shot cells of every seed; the images of learners whose image
    side is not learned).
    """
    from ..cache import MemoryCache

    told: set[str] = set()

    def say(message: str) -> None:  # each cell's attack loads its learner: one backbone warning is enough
        if note and message not in told:
            told.add(message)
            note(message)

    features = MemoryCache()
    for record in records:
        if record.status not in ("done", "existing"):
            continue
        spec = RunSpec(record.method, record.learner, record.dataset, record.seed)
        folder = Path(record.folder)
        if (why := _refusal(spec)) is not None:
            record.attack = f"not applicable: {why}"
            continue
        try:
            claim_folder(folder, wait=True)
            record.attack = attack_cell(sweep, spec, folder, features, progress, say)
        except (KeyboardInterrupt, FolderBusy):
            raise
        except Exception as err:  # one broken attack must not cost the others
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            record.attack = f"failed: {message}" if isinstance(err, UserError) else \
                f"failed: {type(err).__name__}: {message}"
        finally:
            release_folder(folder)
        say(f"{record.attack.partition(':')[0]:>11} attack of {spec.name}"
            + (f": {record.attack.partition(': ')[2]}" if record.attack.startswith("failed") else ""))


def _refusal(spec: RunSpec) -> str | None:
    """Why a cell's learner cannot be attacked (`attack.attack_refusal`), or None."""
    from ..attack import attack_refusal
    from ..learners import learner_class

    return attack_refusal(learner_class(spec.learner))


def attack_status(sweep: Sweep, spec: RunSpec, folder: Path) -> str:
    """A finished cell's attack as it lies on disk (nothing runs): ``existing`` when every subset's
    attack fits the sweep, else ``mismatched: ...`` or ``missing``."""
    if (why := _refusal(spec)) is not None:
        return f"not applicable: {why}"
    try:
        _, stale = cell_attacks(sweep, spec, folder, read_result(folder / RESULT))
    except UserError as err:
        return f"failed: {err}"
    if not stale:
        return "existing"
    return "missing" if all(s.endswith(": missing") for s in stale) else f"mismatched: {'; '.join(stale)}"


def read_cell_attacks(folder: Path, result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The attack documents of a cell (result document `result`) whose attack status is ``done``
    or ``existing``."""
    from ..attack import read_attack

    return {s: read_attack(folder / ATTACK_FILES[s]) for s in attack_subsets(result)}

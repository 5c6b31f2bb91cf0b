"""The result file: a versioned JSON document with a shipped JSON Schema, and its CSV export.

One file per run holds the metrics of each evaluated subset and everything needed to rerun it
(versions, backbone, learner, checkpoint hash, dataset, templates, perturbation settings, seed,
device, timing). The schema is ``schemas/result.schema.json`` in this package, described field by
field in ``docs/results.md``. `read_result` checks a current file against it, reads version-1
files (their missing ``run`` fields become None) and refuses any other version.
"""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .files import atomic_path
from .wordings import POOLS, subset_templates

if TYPE_CHECKING:  # reading and rendering a result needs no torch
    from .evaluate import SubsetResult

SCHEMA = "promptbench_vlm/result"
SCHEMA_VERSION = 2
SCHEMA_FILE = Path(__file__).resolve().parent / "schemas" / "result.schema.json"
V1_MISSING_RUN_FIELDS = ("checkpoint_sha256", "dataset_fingerprint", "lexicon", "mask_token", "precision", "started",
                         "wall_time_s", "wordings")
"""Run fields a version-1 file may lack (trained and compared results never had some of them)."""


def backbone_fields(backbone) -> dict[str, Any]:
    """The backbone's identity as result-file fields: enough to rebuild and verify it."""
    return {"model": backbone.spec, "pretrained": backbone.pretrained, "backbone_sha256": backbone.weights_hash()}


def subset_to_dict(result: SubsetResult) -> dict[str, Any]:
    """The JSON form of one subset's results."""
    return {
        "n_images": result.n_images,
        "n_classes": result.n_classes,
        "n_skipped": len(result.skipped),
        "skipped": result.skipped,
        "metrics": {k: v.to_dict() for k, v in result.metrics.items()},
        "per_template_acc": result.per_template_acc,
        "perturbations": [
            {
                "label": p.spec.label,
                "op": p.spec.op,
                "rate": p.spec.rate,
                "level": p.spec.level,
                "draws": p.draws,
                "metrics": {k: v.to_dict() for k, v in p.metrics.items()},
            }
            for p in result.perturbations
        ],
        "timings": result.timings,
        "counts": result.counts,
        "per_image": result.per_image,
    }


def build_result(run: dict[str, Any], subsets: list[SubsetResult], complete: bool = True,
                 earlier: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Assemble the result document; with base and new subsets, add base/new accuracy and H.

    Args:
        earlier: Subsets already in JSON form, finished by an interrupted run being resumed;
            they come first, in their order.
    """
    from .metrics import harmonic_mean

    bodies = {**(earlier or {}), **{r.subset: subset_to_dict(r) for r in subsets}}
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "complete": complete,
        "run": run,
        "subsets": bodies,
    }
    def base_new(base_key: str, new_key: str) -> dict[str, float]:
        base = bodies[base_key]["metrics"]["acc_mean"]["value"]
        new = bodies[new_key]["metrics"]["acc_mean"]["value"]
        return {"base": base, "new": new, "H": harmonic_mean(base, new)}

    if "base" in bodies and "new" in bodies:
        doc["base_new"] = base_new("base", "new")
    by_wording = {pool: base_new(f"base@{pool}", f"new@{pool}") for pool in POOLS
                  if f"base@{pool}" in bodies and f"new@{pool}" in bodies}
    if by_wording:  # the wording protocol: base, new and H on each pool of wordings
        doc["base_new_by_wording"] = by_wording
    return doc


def write_json(doc: dict[str, Any], path: str | Path) -> Path:
    """Write `doc` atomically (temporary file, then rename): a crash never leaves half a file."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, allow_nan=True)
        f.write("\n")
    return path


@functools.cache
def read_schema_file(path: Path) -> dict[str, Any]:
    """A JSON Schema shipped in the package (read once)."""
    return json.loads(path.read_text(encoding="utf-8"))


def result_schema() -> dict[str, Any]:
    """The JSON Schema of the current result version, as shipped in the package."""
    return read_schema_file(SCHEMA_FILE)


def schema_errors(doc: Any, schema: dict[str, Any] | None = None) -> list[str]:
    """Where `doc` departs from `schema` (the current result schema by default), one
    ``at /json/path: message`` per problem."""
    from jsonschema import Draft202012Validator, FormatChecker

    validator = Draft202012Validator(schema or result_schema(), format_checker=FormatChecker())
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"at /{'/'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in errors]


def read_result(path: str | Path) -> dict[str, Any]:
    """Read a result file, checking it against its schema.

    A version-1 file is read as it is, with the ``run`` fields it may lack set to None (unknown)
    and ``schema_version`` left at 1.

    Raises:
        UserError: missing file, invalid JSON, a file that departs from its schema, or a schema
            version this package cannot read.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"result file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not a result file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a promptbench_vlm result file (not UTF-8 JSON text)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read result file {path}: {err}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise UserError(f"{path} is not a promptbench_vlm result file")
    version = doc.get("schema_version")
    if version == 1:
        missing = _v1_missing(doc)
        if missing:
            raise UserError(f"{path} is an incomplete result file (schema version 1): it lacks {', '.join(missing[:4])}")
        for key in V1_MISSING_RUN_FIELDS:
            doc["run"].setdefault(key, None)
        return doc
    if version != SCHEMA_VERSION:
        raise UserError(f"{path} has result schema version {version}; this version reads 1 and {SCHEMA_VERSION}")
    errors = schema_errors(doc)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UserError(f"{path} is not a valid result file (schema version {SCHEMA_VERSION}) {errors[0]}{more}")
    return doc


def _v1_missing(doc: dict[str, Any]) -> list[str]:
    """What a version-1 file (no JSON schema of its own) lacks that every reader needs."""
    run, subsets = doc.get("run"), doc.get("subsets")
    missing = [key for key, value in (("run", run), ("subsets", subsets)) if not isinstance(value, dict)]
    missing += [f"run.{key}" for key in ("learner", "model", "dataset", "split", "templates")
                if isinstance(run, dict) and key not in run]
    missing += [f"subsets.{name}.{key}" for name, body in (subsets.items() if isinstance(subsets, dict) else ())
                for key in ("metrics", "perturbations", "per_template_acc", "n_images", "n_skipped")
                if not isinstance(body, dict) or key not in body]
    return missing


def is_result_file(path: str | Path) -> bool:
    """True when `path` is a readable result file of this package (one `--overwrite` may replace)."""
    try:
        read_result(path)
    except UserError:
        return False
    return True


def result_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten a result into long-format rows: subset, group, metric, value, ci_low, ci_high, name
    (what the metric key stands for; empty for a template's row)."""
    from .metrics import METRIC_NAMES

    rows = []
    for subset, body in doc["subsets"].items():
        groups = [("clean", body["metrics"])] + [(p["label"], p["metrics"]) for p in body["perturbations"]]
        for group, values in groups:
            for metric, est in values.items():
                ci = est.get("ci") or [None, None]
                rows.append({"subset": subset, "group": group, "metric": metric, "value": est["value"],
                             "ci_low": ci[0], "ci_high": ci[1], "name": METRIC_NAMES.get(metric, "")})
        for template, acc in zip(subset_templates(doc, subset), body["per_template_acc"]):
            rows.append({"subset": subset, "group": "template", "metric": template,
                         "value": acc, "ci_low": None, "ci_high": None, "name": ""})
    for key, value in (doc.get("base_new") or {}).items():
        rows.append({"subset": "base_new", "group": "clean", "metric": key,
                     "value": value, "ci_low": None, "ci_high": None, "name": METRIC_NAMES.get(key, "")})
    for pool, values in (doc.get("base_new_by_wording") or {}).items():
        rows += [{"subset": f"base_new@{pool}", "group": "clean", "metric": key, "value": value,
                  "ci_low": None, "ci_high": None, "name": METRIC_NAMES.get(key, "")} for key, value in values.items()]
    return rows


def write_csv(doc: dict[str, Any], path: str | Path) -> Path:
    """Export `doc` as a long-format CSV (one row per metric, group and subset)."""
    path = Path(path)
    rows = result_rows(doc)
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["subset", "group", "metric", "value", "ci_low", "ci_high", "name"])
        writer.writeheader()
        writer.writerows(rows)
    return path

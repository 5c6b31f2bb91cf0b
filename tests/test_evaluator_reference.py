"""Every metric of a 60-template evaluation equals a stored reference from the pre-optimisation code.

`tests/data/evaluator-reference.json` was written by the evaluator *before* its speed work
(length-sorted text batches, ftfy-free tokenisation, the cached prompt table, the shared
bootstrap resample): tiny random model, 60 shipped templates, four explicit perturbation rates
with two draws, 200 bootstrap resamples, 32 generated images. Values and interval ends must agree
to 1e-7 (float summation order may change), predictions-derived counts exactly.

Regenerate only when a metric's definition changes on purpose:
``python tests/test_evaluator_reference.py --write``. The perturbation entries were regenerated
once, for issue 20 (class-unit protection, shuffle moves that never cancel, article repair, the
reviewed lexicon, the new ``JSD`` and ``edits`` metrics); the clean entries are still the
pre-optimisation ones (the new run matched them to 1e-7), and mask:0.2, whose prompts did not
change, matched its old values and per-image counts exactly (interval ends to 1e-14).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_equal_up_to_float_order

from promptbench_vlm.backbone import load_backbone
from promptbench_vlm.evaluate import EvalSettings, Evaluator
from promptbench_vlm.learners import build_learner
from promptbench_vlm.perturb import load_lexicon, parse_perturbations
from promptbench_vlm.templates import load_templates

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_CONFIG, ColourDataset  # noqa: E402

REFERENCE = Path(__file__).parent / "data" / "evaluator-reference.json"
# explicit rates, not level names, so a change of what "weak" means does not move the reference
PERTURBATIONS = "synonym:0.3,mask:0.2,shuffle:0.4,drop:0.5"


def reference_run() -> dict:
    """The evaluation the reference holds, as plain JSON-ready data."""
    torch.manual_seed(0)
    learner = build_learner("zeroshot", load_backbone(str(TINY_CONFIG), device="cpu"))
    settings = EvalSettings(templates=load_templates().templates, perturbations=tuple(parse_perturbations(PERTURBATIONS)),
                            draws=2, seed=3, bootstrap=200, lexicon=load_lexicon())
    result = Evaluator(learner, settings).run(ColourDataset(per_class=8))
    return {
        "metrics": {name: est.to_dict() for name, est in result.metrics.items()},
        "per_template_acc": result.per_template_acc,
        "perturbations": {p.spec.label: {name: est.to_dict() for name, est in p.metrics.items()}
                          for p in result.perturbations},
        "per_image": result.per_image,
    }


def assert_metrics_close(got: dict, expected: dict, where: str) -> None:
    assert set(got) == set(expected), where
    for name, est in expected.items():
        assert got[name]["value"] == pytest.approx(est["value"], abs=1e-7), (where, name)
        if est["ci"] is None:
            assert got[name]["ci"] is None, (where, name)
        else:
            assert got[name]["ci"] == pytest.approx(est["ci"], abs=1e-7), (where, name)


def test_every_metric_equals_the_stored_pre_optimisation_reference():
    expected = json.loads(REFERENCE.read_text())
    got = json.loads(json.dumps(reference_run()))
    assert_metrics_close(got["metrics"], expected["metrics"], "clean")
    assert got["per_template_acc"] == pytest.approx(expected["per_template_acc"], abs=1e-9)
    assert set(got["perturbations"]) == set(expected["perturbations"])
    for label, values in expected["perturbations"].items():
        assert_metrics_close(got["perturbations"][label], values, label)
    assert_equal_up_to_float_order(got["per_image"], expected["per_image"])  # counts exactly, JSD to 1e-7


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    REFERENCE.write_text(json.dumps(reference_run(), indent=1) + "\n")
    print(f"wrote {REFERENCE}")

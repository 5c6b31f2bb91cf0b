"""On the toy world, ERM training of CoOp and MaPLe learns: the loss falls and base accuracy
rises above zero-shot (small settings, CPU)."""

from __future__ import annotations

import json

import pytest

from promptbench_vlm.backbone import load_backbone
from promptbench_vlm.data import load_dataset
from promptbench_vlm.evaluate import EvalSettings, Evaluator
from promptbench_vlm.learners import build_learner
from promptbench_vlm.train.loop import TrainConfig
from promptbench_vlm.train.run import TrainRequest, run_training


@pytest.fixture(scope="module")
def zeroshot_base_acc() -> float:
    learner = build_learner("zeroshot", load_backbone("toy-clip", device="cpu"))
    settings = EvalSettings(templates=("a photo of a {}.",), bootstrap=0)
    return Evaluator(learner, settings).run(load_dataset("toy-shapes", subset="base")).metrics["acc_mean"].value


@pytest.mark.parametrize(("learner", "lr"), [("coop", 0.02), ("maple", 0.02)])
def test_erm_lowers_loss_and_beats_zeroshot_on_base(tmp_path, zeroshot_base_acc, learner, lr):
    request = TrainRequest(
        method="erm", learner=learner, model="toy-clip", dataset="toy-shapes", shots=4, output=str(tmp_path / learner),
        config=TrainConfig(epochs=3, batch_size=8, lr=lr, warmup_epochs=0, seed=1),
        eval_templates="classname", eval_perturb="none", bootstrap=0, device="cpu", fewshot_cache=None,
    )
    doc = run_training(request, {})
    losses = [json.loads(line)["loss"] for line in (tmp_path / learner / "log.jsonl").read_text().splitlines()]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    trained = doc["subsets"]["base"]["metrics"]["acc_mean"]["value"]
    assert trained > zeroshot_base_acc + 2, (trained, zeroshot_base_acc)

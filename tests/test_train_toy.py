"""On the toy world, ERM training of CoOp and MaPLe learns: the full-batch training loss falls and
base accuracy rises over zero-shot with the hand-written "a photo of a {}." (small settings, CPU).

The room to rise comes from the toy world's domain gap: the splits are warm-lit, toy-clip was
pretrained under neutral light, and a linear probe on its frozen features beats its zero-shot
on the base classes (`promptbench_vlm.toy.probe`; docs/toy-world.md)."""

from __future__ import annotations

import pytest
import torch

from promptbench_vlm.backbone import load_backbone
from promptbench_vlm.data import DatasetOptions, load_dataset
from promptbench_vlm.evaluate import EvalSettings, Evaluator
from promptbench_vlm.learners import build_learner, load_learner_checkpoint
from promptbench_vlm.train.fewshot import few_shot
from promptbench_vlm.train.loop import TrainConfig
from promptbench_vlm.train.method import build_method
from promptbench_vlm.train.run import TrainRequest, run_training

SHOTS, SEED = 4, 1


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("toy-clip", device="cpu")


@pytest.fixture(scope="module")
def zeroshot_base_acc(backbone) -> float:
    settings = EvalSettings(templates=("a photo of a {}.",), bootstrap=0)
    learner = build_learner("zeroshot", backbone)
    return Evaluator(learner, settings).run(load_dataset("toy-shapes", subset="base")).metrics["acc_mean"].value


@torch.no_grad()
def full_batch_loss(learner, dataset) -> float:
    """ERM's loss over every few-shot training image at once: a deterministic training loss."""
    images = torch.stack([learner.backbone.preprocess(dataset.load(i)) for i in range(len(dataset))])
    method = build_method("erm", learner, dataset.classnames)
    return method.loss(images, torch.as_tensor(dataset.labels))[0].item()


@pytest.mark.parametrize(("learner_name", "lr"), [("coop", 0.05), ("maple", 0.05)])
def test_erm_lowers_the_training_loss_and_raises_base_accuracy_over_zeroshot(tmp_path, backbone, zeroshot_base_acc, learner_name, lr):
    request = TrainRequest(
        method="erm", learner=learner_name, model="toy-clip", dataset="toy-shapes", shots=SHOTS,
        output=str(tmp_path / learner_name),
        config=TrainConfig(epochs=5, batch_size=8, lr=lr, warmup_epochs=0, seed=SEED),
        eval_templates="classname", eval_perturb="none", bootstrap=0, device="cpu", fewshot_cache=None,
    )
    doc = run_training(request, {})
    train_set = few_shot(load_dataset("toy-shapes", DatasetOptions(split="train"), "base"), SHOTS, SEED, None)
    torch.manual_seed(SEED)
    before = full_batch_loss(build_learner(learner_name, backbone), train_set)
    after = full_batch_loss(load_learner_checkpoint(doc["run"]["checkpoint"], backbone), train_set)
    assert after < 0.97 * before, (before, after)
    trained = doc["subsets"]["base"]["metrics"]["acc_mean"]["value"]
    assert trained >= zeroshot_base_acc + 1.0, (trained, zeroshot_base_acc)

"""On the toy world, ERM training of CoOp and MaPLe learns: the full-batch training loss falls and
base accuracy does not drop below zero-shot (small settings, CPU).

On the ViT toy-clip, prompt learning does not raise base accuracy over zero-shot within the
few-shot budget (seeds 1-3, 16 shots, 5 epochs: CoOp 62.9 %, MaPLe 63.6 % against 64.5 %; see
docs/methods.md): a linear probe on the frozen image features (`promptbench_vlm.toy.probe`, 64
images per class) does not beat zero-shot either, so the frozen features leave no accuracy to
gain. So this test asserts what does hold, and the README says so."""

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
def test_erm_lowers_the_training_loss_without_losing_base_accuracy(tmp_path, backbone, zeroshot_base_acc, learner_name, lr):
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
    assert trained >= zeroshot_base_acc - 1.5, (trained, zeroshot_base_acc)

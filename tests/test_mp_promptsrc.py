"""MP-PromptSRC (maml-clip with loss=promptsrc) and MP-CoCoOp's inner batch."""

from __future__ import annotations

import pytest
import torch

from promptbench_vlm.learners import build_learner
from promptbench_vlm.train.method import build_method

CLASSES = ["dog", "red car", "tree", "blue square"]


def test_mp_promptsrc_task_loss_is_promptsrc_loss(tiny_backbone):
    torch.manual_seed(0)
    learner = build_learner("ivlp", tiny_backbone, {"n_ctx": 4, "n_ctx_v": 4, "depth": 2, "depth_v": 2})
    maml = build_method("maml-clip", learner, CLASSES, {"loss": "promptsrc"})
    src = build_method("promptsrc", learner, CLASSES[1:3])  # a task of two classes
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 1])
    with torch.no_grad():
        ours = maml(images, labels, [f"{c}." for c in CLASSES[1:3]])
        want, parts = src.loss(images, labels)
    assert float(ours) == pytest.approx(float(want), rel=1e-6)
    assert parts["l1_text"] > 0 and parts["l1_image"] > 0  # the regulation terms are in it
    with torch.no_grad():
        plain = build_method("maml-clip", learner, CLASSES)(images, labels, [f"{c}." for c in CLASSES[1:3]])
    assert float(plain) == pytest.approx(parts["ce"], rel=1e-6) and float(plain) < float(ours)


def test_inner_batch_defaults(tiny_backbone):
    cocoop = build_method("maml-clip", build_learner("cocoop", tiny_backbone), CLASSES)
    coop = build_method("maml-clip", build_learner("coop", tiny_backbone), CLASSES)
    assert cocoop.options["inner_batch"] == 8 == cocoop.options["query_batch"]  # MP-CoCoOp
    assert coop.options["inner_batch"] == 32


def test_mp_promptsrc_meta_trains_and_initialises_promptsrc(tmp_path):
    import json

    from conftest import TINY_CONFIG, write_train_test_folders

    from promptbench_vlm.train.loop import TrainConfig
    from promptbench_vlm.train.run import TrainRequest, run_training

    data = write_train_test_folders(tmp_path / "colours", train=6, test=1)
    common = {"model": str(TINY_CONFIG), "dataset": f"folder:{data}", "shots": 6, "subset": "all",
              "eval_templates": "single", "eval_perturb": "none", "bootstrap": 0, "device": "cpu",
              "fewshot_cache": None}
    meta = run_training(TrainRequest(method="maml-clip", learner="ivlp", output=str(tmp_path / "meta"),
                                     learner_options={"depth": 2, "depth_v": 2, "n_ctx": 4, "n_ctx_v": 4},
                                     method_options={"loss": "promptsrc", "support_shots": 2, "task_classes": 2,
                                                     "inner_batch": 4},
                                     config=TrainConfig(epochs=1, seed=1), **common), {})
    assert meta["run"]["training"]["steps"] == 2
    assert meta["run"]["training"]["method_options"]["loss"] == "promptsrc"
    checkpoint = tmp_path / "meta" / "learner.safetensors"
    tuned = run_training(TrainRequest(method="promptsrc", learner="", init=str(checkpoint),
                                      output=str(tmp_path / "ft"), config=TrainConfig(epochs=1, seed=1), **common), {})
    settings = json.loads((tmp_path / "ft" / "train.json").read_text())
    assert settings["request"]["init"] == str(checkpoint) and tuned["run"]["learner"] == "ivlp"

"""The training core on a tiny model: schedule, few-shot, determinism, errors, PromptSRC pieces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_CONFIG, write_train_test_folders

from promptbench_vlm.errors import InputWarning, UserError
from promptbench_vlm.files import LOCK, RUN_MARKER
from promptbench_vlm.learners import build_learner
from promptbench_vlm.train.fewshot import few_shot, sample_indices
from promptbench_vlm.train.loop import TrainConfig, lr_at
from promptbench_vlm.train.method import METHODS, TrainingMethod, build_method
from promptbench_vlm.train.promptsrc import gaussian_epoch_weights
from promptbench_vlm.train.run import TrainRequest, run_training


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory) -> Path:
    """train/ and test/ folders of 4 colour classes."""
    return write_train_test_folders(tmp_path_factory.mktemp("colours"), train=6, test=3)


def request(folder: Path, out: Path, **kw) -> TrainRequest:
    defaults = dict(method="erm", learner="coop", model=str(TINY_CONFIG), dataset=f"folder:{folder}", shots=4,
                    output=str(out), config=TrainConfig(epochs=2, batch_size=4, lr=0.02, warmup_epochs=0, seed=3),
                    eval_templates="single", eval_perturb="none", bootstrap=0, device="cpu", fewshot_cache=None)
    defaults.update(kw)
    return TrainRequest(**defaults)


def test_schedule_warms_up_then_decays_to_zero():
    config = TrainConfig(warmup_lr=1e-5)
    rates = [lr_at(s, 10, 2, config, 0.1) for s in range(10)]
    assert rates[:2] == [1e-5, 1e-5] and rates[2] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(rates[2:], rates[3:])) and rates[-1] < 0.01


def test_few_shot_per_class_seeded_and_cached(tmp_path):
    labels = [c for c in range(3) for _ in range(10)]
    a, b = sample_indices(labels, 4, seed=1), sample_indices(labels, 4, seed=1)
    assert a == b and len(a) == 12 and sample_indices(labels, 4, seed=2) != a
    assert [sum(labels[i] == c for i in a) for c in range(3)] == [4, 4, 4]
    from conftest import ColourDataset

    data = ColourDataset(per_class=6)
    subset = few_shot(data, 2, seed=5, cache_dir=tmp_path)
    (cached,) = tmp_path.glob("*.json")
    assert json.loads(cached.read_text())["indices"] == subset.indices and len(subset) == 8
    assert few_shot(data, 2, seed=5, cache_dir=tmp_path).indices == subset.indices
    cached.write_text("{broken")
    with pytest.warns(InputWarning, match="cannot be read"):
        assert few_shot(data, 2, seed=5, cache_dir=tmp_path).indices == subset.indices

    entry = json.loads(cached.read_text())
    edited = {**entry, "indices": [i + 1 if i % 6 == 0 else i for i in entry["indices"]]}  # same classes, other images
    for bad, problem in ((edited, "checksum"), ({"indices": 5}, "not written for this dataset"),
                         ({**entry, "fingerprint": "0" * 16}, "not written for this dataset")):
        cached.write_text(json.dumps(bad))
        with pytest.warns(InputWarning, match=problem):
            assert few_shot(data, 2, seed=5, cache_dir=tmp_path).indices == subset.indices
        assert json.loads(cached.read_text()) == entry  # redrawn and rewritten


def test_erm_run_writes_everything_and_is_bitwise_reproducible(split_folder, tmp_path):
    doc = run_training(request(split_folder, tmp_path / "a"), {})
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert files == {"learner.safetensors", "log.jsonl", "train.json", "result.json", RUN_MARKER, LOCK}
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert len(log) == doc["run"]["training"]["steps"] == 4  # 2 base classes x 4 shots / batch 4, 2 epochs
    assert {"loss", "lr", "images_per_s", "acc"} <= set(log[0])
    assert set(doc["subsets"]) == {"base", "new"} and "H" in doc["base_new"]
    run_training(request(split_folder, tmp_path / "b"), {})
    assert (tmp_path / "a" / "learner.safetensors").read_bytes() == (tmp_path / "b" / "learner.safetensors").read_bytes()


def test_finished_run_is_not_overwritten(split_folder, tmp_path):
    run_training(request(split_folder, tmp_path / "r"), {})
    with pytest.raises(UserError, match="--overwrite"):
        run_training(request(split_folder, tmp_path / "r"), {})
    run_training(request(split_folder, tmp_path / "r", overwrite=True), {})


def test_method_learner_mismatch_is_clear(tiny_backbone):
    with pytest.raises(UserError, match="'promptsrc' cannot train learner 'coop': it lacks the capability "
                                        "'image_side_learned'"):
        build_method("promptsrc", build_learner("coop", tiny_backbone), ["red", "blue"])
    with pytest.raises(UserError, match="no trainable parameters"):
        build_method("erm", build_learner("zeroshot", tiny_backbone), ["red", "blue"])
    with pytest.raises(UserError, match="Did you mean 'erm'"):
        METHODS.get("ermm")


class ExplodingMethod(TrainingMethod):
    """Returns a finite loss for one epoch, then NaN."""

    name = "exploding"

    def loss(self, images, labels, image_features=None):
        params = self.trainable_parameters()
        finite = sum(p.sum() for p in params) * 0.0 + 1.0
        return (finite if self.epoch == 1 else finite * float("nan")), {}

    epoch = 1

    def on_epoch_end(self, epoch, epochs):
        self.epoch = epoch + 1


def test_nan_loss_stops_with_the_step_and_keeps_last_good_checkpoint(split_folder, tmp_path):
    METHODS.register("exploding", ExplodingMethod)
    with pytest.raises(UserError, match=r"at step 3 \(epoch 2\).*end of epoch 1"):
        run_training(request(split_folder, tmp_path / "x", method="exploding"), {})
    from promptbench_vlm.learners.base import read_checkpoint

    _, meta = read_checkpoint(tmp_path / "x" / "learner.safetensors")
    assert meta["extra"]["epoch"] == 1
    assert not (tmp_path / "x" / "result.json").exists()


def test_gaussian_prompt_aggregation_weights():
    w = gaussian_epoch_weights(20, 15, 1)
    assert sum(w) == pytest.approx(1) and max(range(20), key=w.__getitem__) == 14
    assert w[13] == pytest.approx(w[15]) and w[0] < 1e-20


def test_init_from_checkpoint_and_wrong_learner(split_folder, tmp_path, tiny_backbone):
    first = run_training(request(split_folder, tmp_path / "m"), {})
    ckpt = first["run"]["checkpoint"]
    second = run_training(request(split_folder, tmp_path / "n", learner="", init=ckpt), {})
    assert second["run"]["learner"] == "coop"
    with pytest.raises(UserError, match="holds a 'coop' learner, not 'ivlp'"):
        run_training(request(split_folder, tmp_path / "o", learner="ivlp", init=ckpt), {})

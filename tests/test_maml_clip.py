"""MAML meta-prompts on the tiny model: the second-order outer gradient against finite differences
(float64), the first-order formula, exact clipping, disjoint support/query, and short runs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import COLOURS, TINY_CONFIG, colour_image

from promptbench_vlm.backbone import load_backbone
from promptbench_vlm.data import DatasetOptions, load_dataset
from promptbench_vlm.errors import UserError
from promptbench_vlm.learners import build_learner, load_learner_checkpoint
from promptbench_vlm.train.loop import TrainConfig, TrainingDiverged
from promptbench_vlm.train.maml_clip import Episode, MAMLClip, clip_gradient
from promptbench_vlm.train.maml_tasks import (
    JointDataset,
    draw_batches,
    partition_classes,
    split_task,
)
from promptbench_vlm.train.run import TrainRequest, run_training

CLASSES = list(COLOURS)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: fanning each op out over threads only costs, the more so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def float64_method(learner: str, **options) -> MAMLClip:
    """A MAMLClip on a fresh tiny backbone in float64 (the shared fixture must stay float32)."""
    torch.manual_seed(0)
    backbone = load_backbone(str(TINY_CONFIG), device="cpu")
    return MAMLClip(build_learner(learner, backbone), CLASSES, **options).double()


def episodes(method: MAMLClip, n_tasks: int = 2) -> list[Episode]:
    """Fixed tasks of 3 classes: random unit features (frozen image side) or random images."""
    gen = torch.Generator().manual_seed(1)

    def inputs(n: int) -> torch.Tensor:
        if method.learner.image_side_learned:
            return torch.randn(n, 3, 32, 32, generator=gen, dtype=torch.float64)
        return torch.nn.functional.normalize(torch.randn(n, 32, generator=gen, dtype=torch.float64), dim=-1)

    out = []
    for t in range(n_tasks):
        texts = [f"{c}." for c in CLASSES[t:t + 3]]
        support = [(inputs(6), torch.tensor([0, 1, 2, 0, 1, 2])) for _ in range(method.inner_steps)]
        out.append(Episode(texts, support, (inputs(6), torch.tensor([2, 1, 0, 0, 1, 2]))))
    return out


def objective(method: MAMLClip, values: dict[str, torch.Tensor], tasks: list[Episode]) -> float:
    """Σ_i L(D'_i; p'_i) at meta-prompt `values`, by the method's own inner loop."""
    total = 0.0
    for episode in tasks:
        point = {n: v.detach().clone().requires_grad_(True) for n, v in values.items()}
        adapted, _ = method.adapt(point, episode)
        total += method.task_loss(adapted, episode.query, episode.texts).item()
    return total


@pytest.mark.parametrize("learner", ["coop", "cocoop", "ivlp"])
def test_second_order_gradient_matches_finite_differences_and_first_order_does_not(learner):
    method = float64_method(learner, inner_lr=2.0, inner_steps=2)
    tasks = episodes(method)
    params = {n: p.detach().clone() for n, p in method.learned().items()}
    gen = torch.Generator().manual_seed(2)
    direction = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}
    eps = 1e-6  # central differences: the truncation error ~ eps² stays far below the tolerance
    plus = objective(method, {n: p + eps * direction[n] for n, p in params.items()}, tasks)
    minus = objective(method, {n: p - eps * direction[n] for n, p in params.items()}, tasks)
    numeric = (plus - minus) / (2 * eps)

    def along(grads: dict[str, torch.Tensor]) -> float:
        return sum((grads[n] * direction[n]).sum().item() for n in params)

    second, _, _ = method.meta_gradient(tasks)
    assert along(second) == pytest.approx(numeric, rel=1e-6, abs=1e-9)
    method.first_order = True
    first, _, _ = method.meta_gradient(tasks)
    assert abs(along(first) - numeric) > 1e-3 * abs(numeric)


def test_first_order_gradient_is_the_query_gradient_at_the_adapted_prompt():
    method = float64_method("coop", inner_lr=2.0, inner_steps=3, first_order=True)
    tasks = episodes(method)
    expected = {n: torch.zeros_like(p) for n, p in method.learned().items()}
    for episode in tasks:  # by hand: plain gradient steps, then ∇_{p'} L(D'; p') at the end point
        point = {n: p.detach().clone() for n, p in method.learned().items()}
        for batch in episode.support:
            point = {n: t.requires_grad_(True) for n, t in point.items()}
            grads = torch.autograd.grad(method.task_loss(point, batch, episode.texts), list(point.values()))
            point = {n: (t - 2.0 * g).detach() for (n, t), g in zip(point.items(), grads)}
        point = {n: t.requires_grad_(True) for n, t in point.items()}
        grads = torch.autograd.grad(method.task_loss(point, episode.query, episode.texts), list(point.values()))
        for n, g in zip(point, grads):
            expected[n] += g
    got, _, _ = method.meta_gradient(tasks)
    for n, want in expected.items():
        torch.testing.assert_close(got[n], want, rtol=1e-10, atol=1e-12)


def test_clipping_bounds_the_update_norm_exactly():
    grads = {"a": torch.tensor([3.0, 4.0], dtype=torch.float64), "b": torch.tensor([[12.0]], dtype=torch.float64)}
    clipped, norm = clip_gradient(grads, 5.0)
    assert norm == pytest.approx(13.0)
    assert torch.sqrt(sum((g ** 2).sum() for g in clipped.values())).item() == pytest.approx(5.0, rel=1e-12)
    torch.testing.assert_close(clipped["a"] * 13 / 5, grads["a"])
    same, _ = clip_gradient(grads, 20.0)
    assert all(torch.equal(same[n], grads[n]) for n in grads)

    for gamma in (1e-4, 1e6):  # a plain SGD meta-step moves p by exactly β · clip(G)
        method = float64_method("coop", inner_lr=0.5, clip_norm=gamma, optimizer="sgd")
        tasks = episodes(method)
        before = {n: p.detach().clone() for n, p in method.learned().items()}
        grads, _, _ = method.meta_gradient(tasks)
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values())).item()
        record = method.meta_step(tasks, method.make_optimizer(0.1))
        step = torch.sqrt(sum(((p - before[n]) ** 2).sum() for n, p in method.learned().items())).item()
        assert record["grad_norm"] == pytest.approx(norm, rel=1e-12)
        assert record["clipped"] == (norm > gamma)
        assert step == pytest.approx(0.1 * min(norm, gamma), rel=1e-9)


def test_support_and_query_never_share_an_image():
    labels = [c for c in range(11) for _ in range(16)]
    by_class = {c: [i for i, y in enumerate(labels) if y == c] for c in range(11)}
    rng = random.Random(0)
    for _ in range(50):
        tasks = partition_classes([0] * 11, 5, rng)  # 5 + 5 + 1: the lone class joins a task
        flat = [c for t in tasks for c in t]
        assert sorted(flat) == list(range(11)) and sorted(len(t) for t in tasks) == [5, 6]
        for classes in tasks:
            split = split_task(classes, by_class, 5, rng)
            assert not set(split.support) & set(split.query)
            assert len(split.support) == 5 * len(classes) and len(split.query) == 11 * len(classes)
            assert all(classes[y] == labels[i] for i, y in zip(split.support + split.query,
                                                               split.support_labels + split.query_labels))
            for batch, _ in draw_batches(split.support, split.support_labels, 8, 4, rng):
                assert set(batch) <= set(split.support) and len(batch) == 8
    # the method's episodes, with the dataset index standing in for the image
    method = MAMLClip(build_learner("coop", load_backbone(str(TINY_CONFIG), device="cpu")), [str(c) for c in range(11)],
                      inner_batch=4)
    episode = method.episode(lambda idx: torch.tensor(idx), [0, 3, 7], by_class, rng)
    support = {i for batch, _ in episode.support for i in batch.tolist()}
    assert support and not support & set(episode.query[0].tolist())
    with pytest.raises(UserError, match="support_shots"):
        split_task([0, 1], {0: [0, 1, 2], 1: [3, 4, 5, 6, 7, 8]}, 3, rng)


def test_tasks_stay_within_one_source():
    sources = [0] * 4 + [1] * 3
    tasks = partition_classes(sources, 0, random.Random(1))
    assert sorted(map(sorted, tasks)) == [[0, 1, 2, 3], [4, 5, 6]]
    tasks = partition_classes(sources, 2, random.Random(1))
    assert all(len({sources[c] for c in t}) == 1 for t in tasks) and sorted(c for t in tasks for c in t) == list(range(7))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """Two train/test colour folders (the second with renamed classes)."""
    roots = []
    for k in range(2):
        root = tmp_path_factory.mktemp(f"colours{k}")
        for split, n in (("train", 7), ("test", 2)):
            for c, (name, rgb) in enumerate(COLOURS.items()):
                (root / split / f"{name}{k}").mkdir(parents=True)
                for i in range(n):
                    colour_image(rgb, seed=100 * c + i + 50 * (split == "test") + 1000 * k).save(
                        root / split / f"{name}{k}" / f"{i}.png")
        roots.append(root)
    return roots[0], roots[1]


def request(dataset, out: Path, **kw) -> TrainRequest:
    defaults = {"method": "maml-clip", "learner": "coop", "model": str(TINY_CONFIG), "dataset": dataset, "shots": 6,
                "subset": "all", "output": str(out), "config": TrainConfig(epochs=2, seed=3),
                "method_options": {"support_shots": 2, "task_classes": 2, "inner_batch": 4},
                "eval_templates": "single", "eval_perturb": "none", "bootstrap": 0, "device": "cpu",
                "fewshot_cache": None}
    defaults.update(kw)
    return TrainRequest(**defaults)


@pytest.mark.parametrize("learner", ["coop", "cocoop", "ivlp"])
def test_meta_training_run_logs_clipping_and_gives_an_init(folders, tmp_path, learner):
    doc = run_training(request(f"folder:{folders[0]}/", tmp_path / "meta", learner=learner), {})
    log = [json.loads(line) for line in (tmp_path / "meta" / "log.jsonl").read_text().splitlines()]
    assert len(log) == doc["run"]["training"]["steps"] == 4  # 4 classes -> 2 tasks of 2, 2 epochs
    assert {"grad_norm", "clipped", "clip_rate", "loss", "support_loss"} <= set(log[0])
    assert log[-1]["clip_rate"] == sum(r["clipped"] for r in log) / len(log)
    checkpoint = tmp_path / "meta" / "learner.safetensors"
    assert load_learner_checkpoint(checkpoint, load_backbone(str(TINY_CONFIG), device="cpu")).name == learner
    run_training(request(f"folder:{folders[0]}/", tmp_path / "erm", method="erm", learner="", init=str(checkpoint),
                         method_options={}), {})


def test_several_datasets_are_task_sources(folders, tmp_path):
    datasets = [f"folder:{folders[0]}/", f"folder:{folders[1]}/"]
    doc = run_training(request(datasets, tmp_path / "two", method_options={"support_shots": 2, "task_classes": 0},
                               config=TrainConfig(epochs=1, seed=3)), {})
    assert doc["run"]["training"]["steps"] == 2 and doc["run"]["dataset"] == datasets[0]
    joint = JointDataset([load_dataset(d, DatasetOptions(split="train"), "all") for d in datasets])
    assert joint.class_sources == [0] * 4 + [1] * 4 and len(joint) == 56
    assert joint.labels[30] >= 4 and joint.classnames[joint.labels[30]].endswith("1")


def test_bad_options_are_refused(tiny_backbone):
    learner = build_learner("coop", tiny_backbone)
    for bad in ({"task_classes": 1}, {"clip_norm": 0}, {"optimizer": "rmsprop"}, {"inner_steps": 0}):
        with pytest.raises(UserError, match="maml-clip"):
            MAMLClip(learner, CLASSES, **bad)
    with pytest.raises(UserError, match="no trainable parameters"):
        MAMLClip(build_learner("zeroshot", tiny_backbone), CLASSES)


def test_a_nan_query_loss_stops_before_the_prompt_moves():
    method = float64_method("coop")
    tasks = episodes(method, n_tasks=1)
    tasks[0].query[0][0] = float("nan")
    before = method.learner.ctx.detach().clone()
    with pytest.raises(TrainingDiverged, match="query losses"):
        method.meta_step(tasks, method.make_optimizer(0.1))
    assert torch.equal(method.learner.ctx, before)

"""torchrun data parallelism on the CPU (gloo, 2 processes) gives the single-process result."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, ColourDataset, write_colour_folder, write_train_test_folders
from test_cli import run_cli
from test_evaluate import ConditionalLearner
from test_resume import comparable, evaluate_args

from promptbench_vlm.evaluate import encode_images, merge_scores, score_conditional
from promptbench_vlm.learners.base import read_checkpoint
from promptbench_vlm.perturb import load_lexicon, parse_perturbations
from promptbench_vlm.prompts import build_prompt_table
from promptbench_vlm.results import read_result
from promptbench_vlm.train import run as train_run


@pytest.fixture
def large_folder(tmp_path):
    """65 images per class: 260 images, two cache chunks, so both ranks encode images."""
    return write_colour_folder(tmp_path / "colours", per_class=65, class_stride=100)


def test_two_gloo_processes_match_one(monkeypatch, capsys, large_folder, tmp_path):
    cache_dir = tmp_path / "cache"
    args = evaluate_args(large_folder, tmp_path, "--batch-size", "64", "--device", "cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
         "promptbench_vlm", *args, "--cache-dir", str(cache_dir), "--output", str(tmp_path / "two.json")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("accuracy, mean over templates") == 1  # only rank 0 prints
    two = read_result(tmp_path / "two.json")
    assert two["subsets"]["all"]["counts"]["images_encoded"] == 260
    assert len(list((cache_dir / "images").rglob("*.safetensors"))) == 2

    code, _, err = run_cli(monkeypatch, capsys, *args, "--no-cache", "--output", str(tmp_path / "one.json"))
    assert code == 0, err
    assert comparable(tmp_path / "two.json") == comparable(tmp_path / "one.json")

    # the cache the two ranks wrote is whole: one process then encodes nothing
    code, _, err = run_cli(monkeypatch, capsys, *args, "--cache-dir", str(cache_dir), "--output",
                           str(tmp_path / "warm.json"))
    assert code == 0, err
    counts = read_result(tmp_path / "warm.json")["subsets"]["all"]["counts"]
    assert counts["images_encoded"] == counts["texts_encoded"] == 0
    assert comparable(tmp_path / "warm.json") == comparable(tmp_path / "one.json")


def test_merged_image_shards_of_a_conditional_learner_equal_the_whole(tiny_backbone):
    learner = ConditionalLearner(tiny_backbone)
    dataset = ColourDataset()
    feats, labels_np, _ = encode_images(learner, dataset)
    labels = torch.as_tensor(labels_np)
    table = build_prompt_table(("a photo of a {}.", "itap of the {}."), dataset.classnames,
                               parse_perturbations("drop:strong,shuffle:weak"), 2, 0, load_lexicon())
    whole = score_conditional(learner, feats, labels, table, 512)
    halves = [score_conditional(learner, feats[s], labels[s], table, 512) for s in (slice(0, 5), slice(5, 12))]
    merged = merge_scores([halves[0], None, halves[1]], [5, 0, 7], conditional=True)
    for name in ("pred", "p_true", "cos_true"):
        np.testing.assert_allclose(getattr(merged.clean, name), getattr(whole.clean, name), atol=1e-6)
    np.testing.assert_array_equal(merged.pred_ens, whole.pred_ens)
    for got, expected in zip(merged.pert_pred + merged.text_cos, whole.pert_pred + whole.text_cos):
        np.testing.assert_allclose(got, expected, atol=1e-6)
    assert merged.texts_encoded == whole.texts_encoded


def test_two_gloo_processes_train_like_one(monkeypatch, capsys, tmp_path):
    """--batch-size is global: 2 ranks with 3-image batches (shares of 1 and 2, the last batch 1
    and 1) take the very steps of one process with 3-image batches, up to float rounding."""
    root = tmp_path / "colours"
    write_train_test_folders(root, train=4, test=2)
    args = ["train", "--model", str(TINY_CONFIG), "--dataset", f"folder:{root}", "--shots", "4", "--epochs", "2",
            "--batch-size", "3", "--lr", "0.02", "--warmup-epochs", "0", "--seed", "3", "--eval-templates", "single",
            "--eval-perturb", "none", "--bootstrap", "0", "--device", "cpu"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
         "promptbench_vlm", *args, "--output", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("trained 6 steps") == 1  # only rank 0 prints

    # the CLI's few-shot cache default is fixed at import: keep this process off the user cache
    monkeypatch.setattr(train_run, "TrainRequest", functools.partial(train_run.TrainRequest, fewshot_cache=None))
    code, _, err = run_cli(monkeypatch, capsys, *args, "--output", str(tmp_path / "one"))
    assert code == 0, err
    two, _ = read_checkpoint(tmp_path / "two" / "learner.safetensors")
    one, _ = read_checkpoint(tmp_path / "one" / "learner.safetensors")
    assert two.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0)
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("two", "one")]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == list(range(1, 7))
    np.testing.assert_allclose([r["loss"] for r in logs[0]], [r["loss"] for r in logs[1]], rtol=1e-4)
    np.testing.assert_allclose([r["acc"] for r in logs[0]], [r["acc"] for r in logs[1]], rtol=1e-6)
    assert read_result(tmp_path / "two" / "result.json")["run"]["training"]["ranks"] == 2
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_maml_under_two_gloo_processes_matches_one(monkeypatch, capsys, tmp_path):
    """maml-clip on the shared loop: each rank takes its share of a meta-step's tasks (2 tasks of
    2 classes, one per rank), the meta-gradients are summed over ranks, and the run is the
    single-process run: same steps, same clipping, same checkpoint up to float rounding."""
    root = tmp_path / "colours"
    write_train_test_folders(root, train=5, test=1)
    args = ["train", "--method", "maml-clip", "--model", str(TINY_CONFIG), "--dataset", f"folder:{root}",
            "--subset", "all", "--shots", "5", "--epochs", "2", "--seed", "3", "--eval-templates", "single",
            "--eval-perturb", "none", "--bootstrap", "0", "--device", "cpu", "--method-opt", "support_shots=2",
            "--method-opt", "task_classes=2", "--method-opt", "meta_batch=2", "--method-opt", "inner_batch=3",
            "--method-opt", "inner_steps=2"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
         "promptbench_vlm", *args, "--output", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.setattr(train_run, "TrainRequest", functools.partial(train_run.TrainRequest, fewshot_cache=None))
    code, _, err = run_cli(monkeypatch, capsys, *args, "--output", str(tmp_path / "one"))
    assert code == 0, err
    two, _ = read_checkpoint(tmp_path / "two" / "learner.safetensors")
    one, _ = read_checkpoint(tmp_path / "one" / "learner.safetensors")
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0)
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("two", "one")]
    assert [r["tasks"] for r in logs[0]] == [r["tasks"] for r in logs[1]] == [2, 2]
    np.testing.assert_allclose([r["loss"] for r in logs[0]], [r["loss"] for r in logs[1]], rtol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in logs[0]], [r["grad_norm"] for r in logs[1]], rtol=1e-4)
    assert [r["clipped"] for r in logs[0]] == [r["clipped"] for r in logs[1]]
    assert read_result(tmp_path / "two" / "result.json")["run"]["training"]["ranks"] == 2


def _share_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One of two gloo ranks: build the prompt table and run the metrics, counting the work done."""
    import torch.distributed as dist

    from promptbench_vlm import evaluate, metrics, prompts
    from promptbench_vlm.evaluate import EvalSettings, Scores, TemplateScores

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls = {"perturb": 0, "resample": 0}
    perturb_many, resample = prompts.perturb_many, metrics.resample_means

    def counting_perturb(filled, *args, **kwargs):
        calls["perturb"] += len(filled)
        return perturb_many(filled, *args, **kwargs)

    def counting_resample(*args, **kwargs):
        calls["resample"] += 1
        return resample(*args, **kwargs)

    prompts.perturb_many, metrics.resample_means = counting_perturb, counting_resample
    specs = tuple(parse_perturbations(SHARE_SPECS))
    table = prompts.build_prompt_table(SHARE_TEMPLATES, SHARE_CLASSES, specs, 2, 0, load_lexicon())
    settings = EvalSettings(templates=SHARE_TEMPLATES, perturbations=specs, draws=2, bootstrap=50)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 40)
    clean = TemplateScores(rng.integers(0, 3, (2, 40)), rng.random((2, 40), dtype=np.float32),
                           rng.random((2, 40), dtype=np.float32))
    scores = Scores(clean, rng.integers(0, 3, 40), [rng.integers(0, 3, (2, 2, 40)) for _ in specs],
                    [rng.random((2, 2, 40)) for _ in specs], [rng.random((2, 2, 3)) for _ in specs], 0)
    clean_m, _, _ = evaluate.distributed.main_only(lambda: evaluate.run_metrics(scores, labels, table, settings))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"calls": calls, "texts": table.texts, "acc_ci": clean_m["acc_mean"].ci}, f)
    dist.destroy_process_group()


SHARE_TEMPLATES = ("a photo of a {}.", "itap of the {}.")
SHARE_CLASSES = ("red", "green", "blue")
SHARE_SPECS = "drop:strong,shuffle:weak,mask:0.3"


def test_ranks_share_the_prompt_table_and_rank_0_alone_bootstraps(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_share_worker, args=(2, port, str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    one = build_prompt_table(SHARE_TEMPLATES, SHARE_CLASSES, parse_perturbations(SHARE_SPECS), 2, 0, load_lexicon())
    assert ranks[0]["texts"] == ranks[1]["texts"] == one.texts
    n_cells = 3 * 2 * 2 * 3  # specs x templates x draws x classes
    assert [r["calls"]["perturb"] for r in ranks] == [n_cells // 2, n_cells // 2]
    assert [r["calls"]["resample"] for r in ranks] == [1, 0]  # one shared resample, on rank 0
    assert ranks[0]["acc_ci"] == ranks[1]["acc_ci"]

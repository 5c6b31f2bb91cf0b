"""Interrupted training runs continue with --resume and end exactly where an uninterrupted run ends."""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import TINY_CONFIG, run_cli, write_train_test_folders

from promptbench_vlm.errors import UserError
from promptbench_vlm.train import run as train_run
from promptbench_vlm.train.erm import ERM
from promptbench_vlm.train.loop import TrainConfig
from promptbench_vlm.train.maml_clip import MAMLClip
from promptbench_vlm.train.method import METHODS
from promptbench_vlm.train.promise import Promise
from promptbench_vlm.train.run import TrainRequest, run_training
from promptbench_vlm.train.train_state import STATE, load_state

PROMISE_OPTS = ("templates_in=3", "templates_out=3", "inner_steps=1", "track_improvement=false")


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    """train/ (6 per class) and test/ (2 per class) folders of 4 colour classes."""
    return write_train_test_folders(tmp_path_factory.mktemp("colours"), train=6, test=2)


def erm_request(folder: Path, out: Path, **kw) -> TrainRequest:
    """ERM on CoOp, 8 training images in batches of 3 with 2 batches per step: 3 batches an epoch,
    so a half-accumulated step crosses each epoch end."""
    config = TrainConfig(epochs=3, batch_size=3, accumulate=2, lr=0.02, warmup_epochs=0, seed=3)
    defaults = dict(method="erm", learner="coop", model=str(TINY_CONFIG), dataset=f"folder:{folder}", shots=4,
                    output=str(out), config=config, eval_templates="single", eval_perturb="none", bootstrap=0,
                    device="cpu", fewshot_cache=None)
    return TrainRequest(**{**defaults, **kw})


def steps(folder: Path) -> list[dict]:
    """The log lines without their timing."""
    lines = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "images_per_s"} for line in lines]


def without_timings(doc: dict) -> dict:
    """A result document without its timings, start time and run folder."""
    doc = json.loads(json.dumps(doc))
    for key in ("checkpoint", "started", "wall_time_s"):
        doc["run"].pop(key)
    doc["run"]["training"].pop("train_wall_time_s")
    for body in doc["subsets"].values():
        body.pop("timings")
    return doc


def interrupt_at_call(patch: pytest.MonkeyPatch, cls: type, call: int, interrupt) -> None:
    """Make `cls.loss` call `interrupt()` on its `call`-th call."""
    real, calls = cls.loss, []

    def loss(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            interrupt()
        return real(self, *args, **kwargs)

    patch.setattr(cls, "loss", loss)


def test_erm_interrupted_mid_epoch_resumes_to_the_same_checkpoint(monkeypatch, colours, tmp_path):
    reference = run_training(erm_request(colours, tmp_path / "straight"), {})

    def power_cut():
        raise KeyboardInterrupt

    # epoch 1: batches 1-2 make step 1, batch 3 is pending at the epoch end; batch 4 makes step 2
    # (logged, then lost), batch 5 is cut off
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        interrupt_at_call(patch, ERM, 5, power_cut)
        run_training(erm_request(colours, tmp_path / "cut"), {})
    state = load_state(tmp_path / "cut" / STATE)
    assert (state.epoch, state.step, state.window["batches"]) == (1, 1, 1)
    assert all(g is not None for g in state.pending)
    assert [s["step"] for s in steps(tmp_path / "cut")] == [1, 2]

    notes = []
    resumed = run_training(erm_request(colours, tmp_path / "cut", resume=True), {}, note=notes.append)
    assert notes == [f"resuming {tmp_path / 'cut'} after epoch 1 of 3"]
    assert (tmp_path / "cut" / "learner.safetensors").read_bytes() == \
        (tmp_path / "straight" / "learner.safetensors").read_bytes()
    assert steps(tmp_path / "cut") == steps(tmp_path / "straight")
    assert without_timings(resumed) == without_timings(reference)
    assert not (tmp_path / "cut" / STATE).exists()

    before = (tmp_path / "cut" / "result.json").read_bytes()
    again = run_training(erm_request(colours, tmp_path / "cut", resume=True), {}, note=notes.append)
    assert notes[-1].endswith("is already complete: nothing to resume")
    assert again == json.loads(before) and (tmp_path / "cut" / "result.json").read_bytes() == before


def test_resume_refuses_another_request_and_a_damaged_state(colours, tmp_path):
    with pytest.raises(UserError, match="pass one of them"):
        run_training(erm_request(colours, tmp_path / "r", resume=True, overwrite=True), {})
    notes = []
    run_training(erm_request(colours, tmp_path / "r", resume=True), {}, note=notes.append)  # nothing to resume
    assert notes == [f"--resume: no finished epoch in {tmp_path / 'r'}; starting afresh"]
    changed = erm_request(colours, tmp_path / "r", resume=True, shots=2,
                          config=TrainConfig(epochs=3, batch_size=3, accumulate=2, lr=0.03, warmup_epochs=0, seed=3))
    with pytest.raises(UserError, match=r"holds another run \(config\.lr, shots differ\)"):
        run_training(changed, {})
    (tmp_path / "r" / "result.json").unlink()
    (tmp_path / "r" / STATE).write_bytes(b"not a state")
    with pytest.raises(UserError, match="cannot read training state .*: damaged"):
        run_training(erm_request(colours, tmp_path / "r", resume=True), {})


def test_promise_sigterm_then_resume_matches_an_uninterrupted_run(monkeypatch, capsys, colours, tmp_path):
    # the CLI's few-shot cache would be the real user cache (its default is fixed at import)
    monkeypatch.setattr(train_run, "TrainRequest", functools.partial(TrainRequest, fewshot_cache=None))
    args = ["train", "--method", "promise", "--learner", "coop", "--model", str(TINY_CONFIG), "--dataset",
            f"folder:{colours}", "--shots", "4", "--epochs", "3", "--batch-size", "4", "--lr", "0.02",
            "--warmup-epochs", "0", "--seed", "3", "--eval-templates", "single", "--eval-perturb", "none",
            "--bootstrap", "0", "--device", "cpu", *(x for opt in PROMISE_OPTS for x in ("--method-opt", opt))]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    code, _, err = run_cli(monkeypatch, capsys, *args, "--output", str(straight))
    assert code == 0, err

    def sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at once; never reached

    with monkeypatch.context() as patch:
        interrupt_at_call(patch, Promise, 4, sigterm)  # epoch 2, second batch
        code, _, err = run_cli(monkeypatch, capsys, *args, "--output", str(cut))
    assert code == 143, err
    assert "keeps the checkpoint and training state" in err and "--resume" in err and "Traceback" not in err
    assert load_state(cut / STATE).epoch == 1 and not (cut / "result.json").exists()

    code, _, err = run_cli(monkeypatch, capsys, *args, "--output", str(cut), "--lr", "0.03", "--resume")
    assert code == 2 and "config.lr differ" in err and "Traceback" not in err
    code, _, err = run_cli(monkeypatch, capsys, *args, "--output", str(cut), "--resume")
    assert code == 0, err
    assert "after epoch 1 of 3" in err
    assert (cut / "learner.safetensors").read_bytes() == (straight / "learner.safetensors").read_bytes()
    assert steps(cut) == steps(straight)
    code, _, err = run_cli(monkeypatch, capsys, *args, "--output", str(cut), "--resume")
    assert code == 0 and "already complete" in err


@pytest.mark.parametrize("method", ["promptsrc", "anprompt"])
def test_method_python_state_survives_resume(monkeypatch, colours, tmp_path, method):
    """PromptSRC's Gaussian aggregate and ANPrompt's noise-draw counter live outside the
    parameters: they travel in the state through ``get_extra_state``."""
    config = TrainConfig(epochs=3, batch_size=4, lr=0.02, warmup_epochs=0, seed=3)
    request = functools.partial(erm_request, colours, method=method, learner="ivlp", config=config,
                                method_options={"gpa": True, "gpa_std": 1.0, "frozen_templates": "single"})
    run_training(request(tmp_path / "straight"), {})

    def power_cut():
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        interrupt_at_call(patch, METHODS.get(method), 4, power_cut)  # epoch 2, second batch
        run_training(request(tmp_path / "cut"), {})
    run_training(request(tmp_path / "cut", resume=True), {})
    assert (tmp_path / "cut" / "learner.safetensors").read_bytes() == \
        (tmp_path / "straight" / "learner.safetensors").read_bytes()


def test_maml_interrupted_mid_epoch_resumes_to_the_same_checkpoint(monkeypatch, colours, tmp_path):
    """MAML-clip's episodic steps run on the shared loop: its task generator, clipping count and
    Adam state travel in the training state, so a resumed meta-training ends where one run ends."""
    config = TrainConfig(epochs=3, seed=3)
    request = functools.partial(erm_request, colours, method="maml-clip", subset="all", config=config,
                                method_options={"support_shots": 2, "task_classes": 2, "inner_batch": 3,
                                                "inner_steps": 2})
    run_training(request(tmp_path / "straight"), {})

    def power_cut():
        raise KeyboardInterrupt

    real, calls = MAMLClip.meta_gradient, []

    def meta_gradient(self, episodes):
        calls.append(1)
        if len(calls) == 4:  # 2 tasks of 2 classes a meta-step each: epoch 2, second meta-step
            power_cut()
        return real(self, episodes)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(MAMLClip, "meta_gradient", meta_gradient)
        run_training(request(tmp_path / "cut"), {})
    assert load_state(tmp_path / "cut" / STATE).epoch == 1
    run_training(request(tmp_path / "cut", resume=True), {})
    assert (tmp_path / "cut" / "learner.safetensors").read_bytes() == \
        (tmp_path / "straight" / "learner.safetensors").read_bytes()
    assert steps(tmp_path / "cut") == steps(tmp_path / "straight")
    assert [s["step"] for s in steps(tmp_path / "cut")] == list(range(1, 7))

"""Declared, typed options and learner capabilities.

Options: every bad option value is refused through the installed console script in one line,
before any model loads (the runs name a model file that does not exist: were it loaded first,
the error would be about the model); booleans spelt in any accepted way train the same run.
Capabilities: a plug-in learner that is no subclass of a built-in learner, built from the
building blocks and declaring MaPLe-like capabilities, is trained by erm, promise and anprompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CONFIG, ColourDataset, assert_one_line_error, run_console, write_train_test_folders
from torch import nn

from promptbench_vlm.errors import UserError
from promptbench_vlm.learners import LEARNERS, Capabilities, PromptLearner, build_learner
from promptbench_vlm.learners import text as text_side
from promptbench_vlm.learners.anprompt import AntiNoiseLearner, AntiNoiseOptions
from promptbench_vlm.learners.base import read_checkpoint
from promptbench_vlm.learners.checks import check_text_tower, check_vision_tower
from promptbench_vlm.learners.coop import initial_context
from promptbench_vlm.learners.deep import random_prompts
from promptbench_vlm.learners.vision import encode_image
from promptbench_vlm.options import NoOptions, declared, option, parse_options
from promptbench_vlm.train.loop import TrainConfig, train
from promptbench_vlm.train.method import METHODS, TrainingMethod, build_method

MISSING_MODEL = "/nonexistent/tiny-clip.json"
TRAIN = ["train", "--model", MISSING_MODEL, "--epochs", "1"]


def write_sweep(path: Path, body: str) -> Path:
    path.write_text(body, encoding="utf-8")
    return path


OPTION_ERRORS = [
    ([*TRAIN, "--method", "promise", "--method-opt", "wieghting=false"],
     ["unknown method 'promise' option 'wieghting'", "did you mean 'weighting'", "valid:", "templates_in"]),
    ([*TRAIN, "--method", "promise", "--method-opt", "inner_steps=two"],
     ["method 'promise'", "option inner_steps must be an integer", "'two'"]),
    ([*TRAIN, "--method", "promise", "--method-opt", "weighting=maybe"],
     ["option weighting must be a boolean", "true/false", "'maybe'"]),
    ([*TRAIN, "--method", "promise", "--method-opt", "meta_update=sgd"],
     ["option meta_update must be one of fomaml, reptile", "'sgd'"]),
    ([*TRAIN, "--learner", "coop", "--learner-opt", "n_cxt=2"],
     ["unknown learner 'coop' option 'n_cxt'", "did you mean 'n_ctx'"]),
    (["evaluate", "--model", MISSING_MODEL, "--learner", "maple", "--learner-opt", "detph=1"],
     ["unknown learner 'maple' option 'detph'", "did you mean 'depth'", "n_ctx"]),
    (["evaluate", "--model", MISSING_MODEL, "--learner", "zeroshot", "--learner-opt", "n_ctx=2"],
     ["learner 'zeroshot' takes no options", "n_ctx"]),
]


@pytest.mark.parametrize(("args", "needles"), OPTION_ERRORS, ids=[" ".join(a[-2:]) for a, _ in OPTION_ERRORS])
def test_a_bad_option_is_one_line_before_any_model_loads(args, needles, tmp_path):
    assert_one_line_error(run_console(*args, cwd=tmp_path, timeout=120), *needles)


def test_a_sweep_option_typo_is_one_line(tmp_path):
    sweep = write_sweep(tmp_path / "s.toml", 'methods = ["erm", "promise"]\nmodel = "/nonexistent.json"\n'
                                             '[method.promise]\noptions = { wieghting = false }\n')
    assert_one_line_error(run_console("compare", str(sweep), cwd=tmp_path, timeout=120),
                          "unknown method 'promise' option 'wieghting'", "did you mean 'weighting'")
    sweep = write_sweep(tmp_path / "t.toml", 'methods = ["promise"]\n[method.promise]\noptions = { weighting = "off" }\n')
    assert_one_line_error(run_console("compare", str(sweep), cwd=tmp_path, timeout=120),
                          "option weighting must be a boolean", "'off'")


# --- booleans: the same run however they are spelt -----------------------------------------

@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return write_train_test_folders(tmp_path_factory.mktemp("colours"), train=2, test=1)


@pytest.mark.parametrize("spelling", ["false", "False", "0"])
def test_promise_weighting_off_however_spelt(spelling, colours, tmp_path):
    out = tmp_path / "run"
    proc = run_console(
        "train", "--method", "promise", "--learner", "coop", "--model", str(TINY_CONFIG), "--dataset",
        f"folder:{colours}", "--shots", "2", "--epochs", "1", "--batch-size", "8", "--warmup-epochs", "0",
        "--eval-templates", "single", "--eval-perturb", "none", "--bootstrap", "0", "--device", "cpu",
        "--output", str(out), "--method-opt", f"weighting={spelling}", "--method-opt", "templates_in=3",
        "--method-opt", "templates_out=3", "--method-opt", "inner_steps=1", "--method-opt", "track_improvement=no",
        cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    request = json.loads((out / "train.json").read_text())["request"]
    assert request["method_options"]["weighting"] is False and request["method_options"]["track_improvement"] is False
    result = json.loads((out / "result.json").read_text())
    assert result["run"]["training"]["method_options"]["weighting"] is False
    _, meta = read_checkpoint(out / "learner.safetensors")
    assert meta["extra"]["method_options"]["weighting"] is False
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log and all("w_entropy" not in r and "top1_template" not in r for r in log)  # no template weights
    assert all("alpha_min" in r for r in log)  # the other parts stay on


def test_weighting_on_logs_the_weights(tiny_backbone):
    """The control of the test above: with weighting on, a step reports the template weights."""
    method = build_method("promise", build_learner("coop", tiny_backbone), list(ColourDataset().classnames),
                          {"weighting": "TRUE", "templates_in": 3, "templates_out": 3, "inner_steps": 1,
                           "track_improvement": "0"})
    assert method.options["weighting"] is True and method.scores is not None
    images = torch.randn(4, 3, 32, 32)
    _, diagnostics = method.loss(images, torch.tensor([0, 1, 2, 3]), method.learner.encode_images(images).detach())
    assert {"w_entropy", "top1_template"} <= set(diagnostics)


# --- the option parser itself ---------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    flag: bool = option(True, "A switch.")
    count: int = option(2, "A count.")
    rate: float | None = option(None, "A rate or none.")
    kind: Literal["a", "b"] = option("a", "A choice.")
    names: list[str] | None = option(None, "Names.")


@pytest.mark.parametrize("spelling,value", [("true", True), ("YES", True), ("1", True), (1, True), (True, True),
                                            ("False", False), ("no", False), ("0", False), (0, False)])
def test_booleans_accept_every_spelling(spelling, value):
    assert parse_options("x", Example, {"flag": spelling}).flag is value


def test_values_are_typed_or_refused():
    parsed = parse_options("x", Example, {"count": "3", "rate": "0.5", "kind": "b", "names": "red, blue"})
    assert (parsed.count, parsed.rate, parsed.kind, parsed.names) == (3, 0.5, "b", ["red", "blue"])
    assert parse_options("x", Example, {"rate": "none", "count": 4, "names": '["a,b"]'}).names == ["a,b"]
    assert parse_options("x", Example, {"rate": 1}).rate == 1.0
    for bad, message in [({"count": "2.5"}, "count must be an integer"), ({"count": True}, "integer"),
                         ({"count": 2.0}, "integer"), ({"flag": 2}, "boolean"), ({"kind": "c"}, "one of a, b"),
                         ({"rate": "fast"}, "rate must be a number or none"), ({"count": None}, "integer"),
                         ({"names": 3}, "list of strings")]:
        with pytest.raises(UserError, match=message):
            parse_options("x", Example, bad)
    assert [i.name for i in declared(Example)] == ["flag", "count", "rate", "kind", "names"]
    assert declared(Example)[2].type == "number or none" and declared(Example)[0].help == "A switch."


def test_every_builtin_declares_every_option_with_help():
    for registry in (LEARNERS, METHODS):
        for name in registry.names():
            for info in declared(registry.get(name).Options):
                assert info.help and info.type, (name, info)


def test_list_verbose_shows_options_and_capabilities(tmp_path):
    proc = run_console("list", "methods", "--verbose", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "weighting" in proc.stdout and "boolean" in proc.stdout and "needs: text_tokens, unconditional" in proc.stdout
    proc = run_console("list", "learners", "-v", cwd=tmp_path, timeout=120)
    assert "n_ctx_v" in proc.stdout and "layer_prompts=True" in proc.stdout and "(no options)" in proc.stdout


# --- a plug-in learner with MaPLe-like capabilities -------------------------------------------

@dataclass(frozen=True)
class CoupledOptions:
    n_ctx: int = option(2, "Prompt tokens per layer.")
    depth: int = option(2, "Layers with prompts, on both towers.")


class CoupledPrompts(PromptLearner):
    """A MaPLe-like plug-in built from the building blocks, no subclass of a built-in learner:
    text prompts per layer, the image tower's prompts a learned projection of them."""

    name = "test-coupled"
    Options = CoupledOptions
    image_side_learned = True
    capabilities = Capabilities(text_tokens=("prompts.",), layer_prompts=True, deep=True, default_lr=0.0035,
                                anti_noise="test-coupled-anti")

    def __init__(self, backbone: Any, **options: Any):
        super().__init__(backbone, **options)
        n_ctx, depth = self.config.n_ctx, self.config.depth
        check_text_tower(self.name, backbone, n_ctx)
        visual = check_vision_tower(self.name, backbone)
        first, self.fixed = initial_context(self, n_ctx, "a photo of a")
        width = self.clip.transformer.width
        self.prompts = nn.ParameterList([first, *(random_prompts(n_ctx, width) for _ in range(depth - 1))])
        self.proj = nn.ModuleList([nn.Linear(width, int(visual.transformer.width)) for _ in range(depth)])
        self.n_ctx = n_ctx

    def text_layer_prompts(self) -> list[torch.Tensor]:
        return list(self.prompts)

    def vision_layer_prompts(self) -> list[torch.Tensor]:
        return [proj(p) for proj, p in zip(self.proj, self.prompts)]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(encode_image(self.clip.visual, images, self.vision_layer_prompts()), dim=-1)

    def encode_texts(self, texts: list[str], image_features: torch.Tensor | None = None) -> torch.Tensor:
        batch = text_side.prepare(self.clip, self.tokenize(texts), self.n_ctx, self.fixed)
        return F.normalize(text_side.encode(self.clip, batch, self.text_layer_prompts()), dim=-1)


@dataclass(frozen=True)
class CoupledAntiOptions(AntiNoiseOptions, CoupledOptions):
    """The plug-in's options plus the anti-noise ones."""


class CoupledAntiNoise(AntiNoiseLearner, CoupledPrompts):
    """The plug-in's anti-noise counterpart, which ANPrompt turns it into."""

    name = "test-coupled-anti"
    Options = CoupledAntiOptions


@pytest.fixture
def plugin(monkeypatch) -> str:
    monkeypatch.setitem(LEARNERS._local, CoupledPrompts.name, CoupledPrompts)
    monkeypatch.setitem(LEARNERS._local, CoupledAntiNoise.name, CoupledAntiNoise)
    return CoupledPrompts.name


@pytest.mark.parametrize("method_name,options", [
    ("erm", {}),
    ("promise", {"templates_in": 3, "templates_out": 3, "inner_steps": 1}),
    ("anprompt", {"frozen_templates": "single", "noise_draws": 2, "clusters": 2}),
])
def test_a_plugin_learner_with_maple_like_capabilities_is_trained(plugin, tiny_backbone, method_name, options):
    torch.manual_seed(0)
    dataset = ColourDataset(per_class=2)
    learner = build_learner(plugin, tiny_backbone)
    method = build_method(method_name, learner, dataset.classnames, options)
    assert method.default_lr() == 0.0035  # the learner's reference rate (anprompt's own is the same)
    before = {n: p.detach().clone() for n, p in learner.named_parameters() if p.requires_grad}
    outcome = train(method, dataset, TrainConfig(epochs=1, batch_size=4, warmup_epochs=0, seed=1), lr=0.01)
    assert outcome.steps == 2 and all(torch.isfinite(torch.tensor(outcome.losses)))
    moved = [n for n, p in learner.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any(n.startswith("prompts.") for n in moved) and any(n.startswith("proj.") for n in moved)
    if method_name == "anprompt":  # turned into its declared anti-noise counterpart, whose tokens train too
        assert learner.name == "test-coupled-anti" and learner.options["clusters"] == 2
        assert any(n.startswith("anti_noise.") for n in moved)


class CoupledWithoutAntiNoise(CoupledPrompts):
    name = "test-coupled-plain"
    capabilities = replace(CoupledPrompts.capabilities, anti_noise=None)


def test_a_method_says_which_capability_is_missing(tiny_backbone, monkeypatch):
    with pytest.raises(UserError, match="cannot train learner 'cocoop': it lacks the capability 'unconditional'"):
        build_method("promise", build_learner("cocoop", tiny_backbone), ["a", "b"])
    with pytest.raises(UserError, match="cannot train learner 'coop': it lacks the capability 'layer_prompts'"):
        build_method("anprompt", build_learner("coop", tiny_backbone), ["a", "b"])
    monkeypatch.setitem(LEARNERS._local, CoupledWithoutAntiNoise.name, CoupledWithoutAntiNoise)
    plain = build_learner(CoupledWithoutAntiNoise.name, tiny_backbone)
    with pytest.raises(UserError, match="lacks the capability 'anti_noise'.*noise_prompts=false"):
        build_method("anprompt", plain, ["a", "b"])
    method = build_method("anprompt", plain, ["a", "b"], {"noise_prompts": False, "frozen_templates": "single"})
    assert method.learner.name == "test-coupled-plain"  # the ablation without anti-noise prompts fits


def test_a_type_error_inside_a_plugin_is_its_own_error(tiny_backbone, monkeypatch):
    class Broken(TrainingMethod):
        name = "test-broken"
        Options = NoOptions

        def __init__(self, learner, classnames, **options):
            super().__init__(learner, classnames, **options)
            len(5)  # a bug in the plug-in, not a bad option

    monkeypatch.setitem(METHODS._local, Broken.name, Broken)
    with pytest.raises(UserError, match=r"method 'test-broken' \(registered in code\) raised TypeError: .*"
                                        r"test_options\.py:\d+, in __init__"):
        build_method("test-broken", build_learner("coop", tiny_backbone), ["a", "b"])


def test_a_warm_up_covering_the_whole_run_is_a_warning(colours, tmp_path):
    from promptbench_vlm.train.run import TrainRequest, run_training

    notes: list[str] = []
    request = TrainRequest(method="erm", learner="coop", model=str(TINY_CONFIG), dataset=f"folder:{colours}", shots=2,
                           output=str(tmp_path / "run"), config=TrainConfig(epochs=1, batch_size=8, seed=1),
                           eval_templates="single", eval_perturb="none", bootstrap=0, device="cpu", fewshot_cache=None)
    run_training(request, note=notes.append)  # --epochs 1 with the default --warmup-epochs 1
    assert [n for n in notes if n.startswith("warning: the warm-up (1 epoch(s) at 1e-05) covers the whole run")]
    notes.clear()
    request.config = TrainConfig(epochs=2, batch_size=8, seed=1)
    request.overwrite = True
    run_training(request, note=notes.append)
    assert not [n for n in notes if "warm-up" in n]

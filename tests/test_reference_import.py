"""`promptbench import`: Dassl checkpoints of the five reference learners become ours, safely."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import TINY_CONFIG, assert_one_line_error, run_console

from promptbench_vlm.errors import UserError
from promptbench_vlm.learners import build_learner, load_learner_checkpoint
from promptbench_vlm.learners.reference_import import import_checkpoint

CLASSES = ["golden retriever", "red car", "tree"]
TEXTS = [f"a photo of a {c}." for c in CLASSES]


def half_values(shape, seed):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05).half()


def reference_state(name: str, learner) -> dict[str, torch.Tensor]:
    """The reference's parameter names (fp16) for the prompts `learner` has, plus frozen extras."""
    state: dict[str, torch.Tensor] = {}
    width = learner.clip.transformer.width
    if name in ("coop", "cocoop"):
        state["ctx"] = half_values(tuple(learner.ctx.shape), 1)
        state["token_prefix"] = torch.zeros(3, 1, width).half()
        state["token_suffix"] = torch.zeros(3, 27, width).half()
        if name == "cocoop":
            for k, v in learner.meta_net.state_dict().items():
                state[f"meta_net.{k}"] = half_values(tuple(v.shape), 2 + len(state))
        return state
    # IVLP / PromptSRC / MaPLe register the whole CustomCLIP
    state["prompt_learner.ctx"] = half_values(tuple(learner.text_prompts[0].shape), 1)
    state["prompt_learner.token_prefix"] = torch.zeros(3, 1, width).half()
    state["image_encoder.conv1.weight"] = torch.zeros(4, 3, 8, 8).half()  # frozen CLIP weights ride along
    state["text_encoder.positional_embedding"] = torch.zeros(32, width).half()
    state["logit_scale"] = torch.tensor(4.6)
    if name in ("ivlp", "promptsrc"):
        for i, p in enumerate(learner.text_prompts):
            if i:
                state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = half_values(tuple(p.shape), 10 + i)
        for i, p in enumerate(learner.vision_prompts):
            key = "image_encoder.VPT" if i == 0 else f"image_encoder.transformer.resblocks.{i}.VPT_shallow"
            state[key] = half_values(tuple(p.shape), 20 + i)
        if name == "promptsrc":
            state["prompt_learner.ZS_image_encoder.conv1.weight"] = torch.zeros(4, 3, 8, 8).half()
    else:
        for j, p in enumerate(learner.text_prompts[1:]):
            state[f"prompt_learner.compound_prompts_text.{j}"] = half_values(tuple(p.shape), 30 + j)
        for k, v in learner.vision_proj[0].state_dict().items():
            state[f"prompt_learner.proj.{k}"] = half_values(tuple(v.shape), 40 + len(k))
        for j, proj in enumerate(learner.vision_proj[1:]):
            for k, v in proj.state_dict().items():
                state[f"prompt_learner.compound_prompt_projections.{j}.{k}"] = half_values(tuple(v.shape), 50 + j)
    return state


def set_directly(name: str, learner, state: dict[str, torch.Tensor]) -> None:
    """Put the same values in by hand (the documented mapping, written independently)."""
    with torch.no_grad():
        if name in ("coop", "cocoop"):
            learner.ctx.copy_(state["ctx"].float())
            if name == "cocoop":
                for k, v in learner.meta_net.state_dict().items():
                    v.copy_(state[f"meta_net.{k}"].float())
            return
        learner.text_prompts[0].copy_(state["prompt_learner.ctx"].float())
        if name in ("ivlp", "promptsrc"):
            for i in range(1, len(learner.text_prompts)):
                learner.text_prompts[i].copy_(state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"].float())
            for i, p in enumerate(learner.vision_prompts):
                key = "image_encoder.VPT" if i == 0 else f"image_encoder.transformer.resblocks.{i}.VPT_shallow"
                p.copy_(state[key].float())
            return
        for j in range(len(learner.text_prompts) - 1):
            learner.text_prompts[j + 1].copy_(state[f"prompt_learner.compound_prompts_text.{j}"].float())
        for k, v in learner.vision_proj[0].state_dict().items():
            v.copy_(state[f"prompt_learner.proj.{k}"].float())
        for j, proj in enumerate(learner.vision_proj[1:]):
            for k, v in proj.state_dict().items():
                v.copy_(state[f"prompt_learner.compound_prompt_projections.{j}.{k}"].float())


def write_dassl(path, state, epoch=5):
    """A Dassl `save_checkpoint` file: plain dict of tensors and numbers."""
    torch.save({"state_dict": state, "epoch": epoch, "optimizer": {"state": {}, "param_groups": [
        {"lr": 0.0035, "momentum": 0.9, "params": [0]}]}, "scheduler": {"last_epoch": epoch, "base_lrs": [0.0035]},
        "val_result": 71.5}, path)
    return path


CASES = {
    "coop": ("coop", {"ctx_init": None}),
    "cocoop": ("cocoop", {"ctx_init": None}),
    "ivlp": ("ivlp", {"depth": 2, "depth_v": 2, "n_ctx": 2, "n_ctx_v": 2}),
    "promptsrc": ("ivlp", {"depth": 2, "depth_v": 2, "n_ctx": 4, "n_ctx_v": 4}),
    "maple": ("maple", {"depth": 2, "n_ctx": 2}),
}


@pytest.mark.parametrize("source", list(CASES))
def test_dassl_checkpoints_import_with_the_features_of_the_same_prompts(tiny_backbone, tmp_path, source):
    ours, options = CASES[source]
    template = build_learner(ours, tiny_backbone, options)
    state = reference_state(source, template)
    path = write_dassl(tmp_path / "model.pth.tar-5", state)
    imported, origin = import_checkpoint(path, tiny_backbone)
    assert imported.name == ours
    direct = build_learner(ours, tiny_backbone, options)
    set_directly(source, direct, state)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a_img, b_img = imported.encode_images(images), direct.encode_images(images)
        extra = {"image_features": a_img} if imported.conditional else {}
        a_txt = imported.encode_texts(TEXTS, **extra)
        b_txt = direct.encode_texts(TEXTS, **({"image_features": b_img} if direct.conditional else {}))
    assert torch.equal(a_img, b_img) and torch.equal(a_txt, b_txt)
    assert origin["epoch"] == 5 and origin["dtype"] == "torch.float16" and len(origin["sha256"]) == 64
    # and it round-trips as one of our checkpoints
    imported.save(tmp_path / "ours.safetensors", {"imported_from": origin})
    again = load_learner_checkpoint(tmp_path / "ours.safetensors", tiny_backbone)
    with torch.no_grad():
        assert torch.equal(again.encode_images(images), a_img)


class Payload:
    """Unpickling this runs a shell command: the import must refuse before that happens."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Custom:
    def __init__(self):
        self.value = 1


def test_a_checkpoint_needing_unpickling_is_refused_without_running_it(tiny_backbone, tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {"ctx": torch.zeros(4, 64)}, "epoch": 1, "extra": Payload(marker)}, path)
    with pytest.raises(UserError, match="refusing .*unpickle .*system"):
        import_checkpoint(path, tiny_backbone)
    assert not marker.exists()
    custom = tmp_path / "custom.pth.tar"
    torch.save({"state_dict": {"ctx": torch.zeros(4, 64)}, "meta": Custom()}, custom)
    with pytest.raises(UserError, match="Custom"):
        import_checkpoint(custom, tiny_backbone)


def test_unknown_names_and_wrong_learner_are_refused(tiny_backbone, tmp_path):
    path = write_dassl(tmp_path / "m.pth.tar-1", {"ctx": torch.zeros(4, 64).half(), "surprise": torch.zeros(2)})
    with pytest.raises(UserError, match="surprise"):
        import_checkpoint(path, tiny_backbone)
    coop = write_dassl(tmp_path / "c.pth.tar-1", {"ctx": torch.zeros(4, 64).half()})
    with pytest.raises(UserError, match="holds coop prompts, not maple"):
        import_checkpoint(coop, tiny_backbone, learner="maple")


def test_import_command_writes_a_checkpoint_that_evaluates(tiny_backbone, tmp_path):
    template = build_learner("maple", tiny_backbone, {"depth": 2})
    path = write_dassl(tmp_path / "model.pth.tar-5", reference_state("maple", template))
    out = tmp_path / "maple.safetensors"
    proc = run_console("import", str(path), "--output", str(out), "--model", str(TINY_CONFIG), "--pretrained", "")
    assert proc.returncode == 0, proc.stderr
    learner = load_learner_checkpoint(out, tiny_backbone)
    assert learner.name == "maple" and learner.options["depth"] == 2
    again = run_console("import", str(path), "--output", str(out), "--model", str(TINY_CONFIG), "--pretrained", "")
    assert_one_line_error(again, "exists", "--overwrite")


def test_a_real_dassl_file_with_its_scheduler_chain_reads_as_inert(tiny_backbone, tmp_path, monkeypatch):
    """Dassl's warm-up scheduler pickles the cosine scheduler and the SGD optimiser into
    `scheduler`, and `val_result` may be a numpy scalar: read as placeholders, never built."""
    import sys
    import types

    import numpy as np

    class ConstantWarmupScheduler(torch.optim.lr_scheduler.LRScheduler):
        def __init__(self, optimizer, successor):
            self.successor = successor
            super().__init__(optimizer)

        def get_lr(self):
            return [1e-5 for _ in self.base_lrs]

    ConstantWarmupScheduler.__module__ = "dassl.optim.lr_scheduler"
    ConstantWarmupScheduler.__qualname__ = "ConstantWarmupScheduler"
    fake = types.ModuleType("dassl.optim.lr_scheduler")
    fake.ConstantWarmupScheduler = ConstantWarmupScheduler
    for name in ("dassl", "dassl.optim"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "dassl.optim.lr_scheduler", fake)
    ctx = torch.nn.Parameter(torch.zeros(4, 64))
    optimizer = torch.optim.SGD([ctx], lr=0.002, momentum=0.9)
    ctx.sum().backward()
    optimizer.step()
    scheduler = ConstantWarmupScheduler(optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 5))
    path = tmp_path / "model.pth.tar-50"
    torch.save({"state_dict": {"ctx": ctx.detach().half(), "token_prefix": torch.zeros(3, 1, 64).half()},
                "epoch": 50, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "val_result": np.float64(71.2)}, path)
    monkeypatch.delitem(sys.modules, "dassl.optim.lr_scheduler")  # the reader cannot import it
    learner, origin = import_checkpoint(path, tiny_backbone)
    assert learner.name == "coop" and origin["epoch"] == 50
    assert torch.equal(learner.ctx.detach(), ctx.detach().half().float())

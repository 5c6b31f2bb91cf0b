"""OpenAI weights build the QuickGELU variant, by tag and by local OpenAI-format file."""

from __future__ import annotations

import json
import warnings

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file

from promptbench_vlm import backbone as backbone_module
from promptbench_vlm.backbone import load_backbone
from promptbench_vlm.errors import UserError

from reference_clip import TINY_CONFIG, tiny_clip, write_openai_file


def _activations(model: torch.nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))}


def _features(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    ids = open_clip.tokenize(["a photo of a dog.", "golden retriever"], context_length=32)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(ids)


def test_local_openai_file_builds_quickgelu_and_matches_the_reference_model(tmp_path):
    path = write_openai_file(tmp_path / "openai-tiny.pt")
    backbone = load_backbone(str(TINY_CONFIG), pretrained=str(path), device="cpu")
    assert backbone.quick_gelu and backbone.identity()["quick_gelu"] is True
    assert _activations(backbone.model) == {QuickGELU}
    reference = tiny_clip(quick_gelu=True)  # the weights as trained
    gelu = tiny_clip(quick_gelu=False)  # what the plain config would have built
    ours, ref, wrong = _features(backbone.model), _features(reference), _features(gelu)
    for a, b, c in zip(ours, ref, wrong):
        assert torch.allclose(a, b, atol=1e-6)
        assert (a - c).abs().max() > 1e-3  # the activation matters: this test could fail


def test_openai_tag_builds_quickgelu(tmp_path, monkeypatch):
    weights = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip(quick_gelu=True).state_dict().items()}, str(weights))
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "tiny-clip", {"openai": {"url": "", "hf_hub": "",
                                                                                  "quick_gelu": True}})
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, **_: str(weights))
    monkeypatch.setattr(backbone_module, "_offline_hub_weights", lambda name, tag: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backbone = load_backbone(str(TINY_CONFIG), pretrained="openai", device="cpu")
    assert not [w for w in caught if "QuickGELU" in str(w.message)]  # resolved, not warned about
    assert backbone.quick_gelu and _activations(backbone.model) == {QuickGELU}
    for a, b in zip(_features(backbone.model), _features(tiny_clip(quick_gelu=True))):
        assert torch.allclose(a, b, atol=1e-6)


def test_other_weights_keep_the_config_activation(tiny_backbone):
    assert not tiny_backbone.quick_gelu and _activations(tiny_backbone.model) == {torch.nn.GELU}


def test_forced_gelu_with_openai_weights_is_refused(tmp_path):
    path = write_openai_file(tmp_path / "openai-tiny.pt")
    config = tmp_path / "tiny-gelu.json"
    config.write_text(json.dumps({**json.loads(TINY_CONFIG.read_text()), "quick_gelu": False}))
    with pytest.raises(UserError, match="trained with QuickGELU.*explicitly builds GELU"):
        load_backbone(str(config), pretrained=str(path), device="cpu")


def test_torchscript_weights_are_refused_without_running_them(tmp_path):
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    with pytest.raises(UserError, match="TorchScript"):
        load_backbone(str(TINY_CONFIG), pretrained=str(path), device="cpu")

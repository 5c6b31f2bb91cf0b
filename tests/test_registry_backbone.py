"""The learner registry (entry points, did-you-mean) and backbone loading errors."""

import pytest
import torch

from promptbench_vlm.backbone import load_backbone, resolve_device
from promptbench_vlm.errors import UserError
from promptbench_vlm.learners import LEARNERS, build_learner
from promptbench_vlm.learners.zeroshot import ZeroShotLearner
from promptbench_vlm.registry import Registry


def test_builtin_zeroshot_comes_from_an_entry_point():
    assert "zeroshot" in LEARNERS.names()
    assert LEARNERS.get("zeroshot") is ZeroShotLearner
    assert "promptbench_vlm.learners.zeroshot:ZeroShotLearner" in LEARNERS.origin("zeroshot")


def test_unknown_learner_did_you_mean():
    with pytest.raises(UserError, match=r"unknown learner 'zeroshoot'.*Did you mean 'zeroshot'"):
        LEARNERS.get("zeroshoot")


def test_local_registration_and_broken_entry_point(monkeypatch):
    reg: Registry[object] = Registry("promptbench_vlm.no_such_group", "thing")
    reg.register("mine", ZeroShotLearner)
    assert reg.names() == ["mine"] and reg.get("mine") is ZeroShotLearner
    from importlib.metadata import EntryPoint

    broken = EntryPoint(name="broken", value="no_such_module_xyz:Thing", group=reg.group)
    monkeypatch.setattr(reg, "_entry_points", lambda: {"broken": broken})
    with pytest.raises(UserError, match="'broken'.*failed to load"):
        reg.get("broken")


def test_zeroshot_features_are_normalised(tiny_backbone):
    learner = build_learner("zeroshot", tiny_backbone)
    feats = learner.encode_texts(["a photo of a dog.", "a dog."])
    assert feats.shape == (2, 32)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2))
    assert not any(p.requires_grad for p in learner.parameters())


def test_backbone_errors(tmp_path):
    with pytest.raises(UserError, match="unknown open_clip model 'ViT-B-161'.*Did you mean"):
        load_backbone("ViT-B-161", device="cpu")
    with pytest.raises(UserError, match="model config file not found"):
        load_backbone(str(tmp_path / "missing.json"), device="cpu")
    with pytest.raises(UserError, match="weights file not found"):
        load_backbone("ViT-B-32", pretrained=str(tmp_path / "w.safetensors"), device="cpu")
    with pytest.raises(UserError, match="unknown pretrained tag for ViT-B-32 'opnai'.*Did you mean 'openai'"):
        load_backbone("ViT-B-32", pretrained="opnai", device="cpu")


def test_unreachable_hub_is_one_clear_line_without_retries(monkeypatch):
    from promptbench_vlm import backbone

    monkeypatch.setattr(backbone, "_host_reachable", lambda host, timeout=3.0: False)
    with pytest.raises(UserError) as err:
        load_backbone("ViT-B-32", pretrained="openai", device="cpu")
    message = str(err.value)
    assert "\n" not in message and "'openai'" in message and "--pretrained /path/to" in message


def test_failed_hub_download_is_one_clear_line(monkeypatch):
    import open_clip

    from promptbench_vlm import backbone

    def failing(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(backbone, "_host_reachable", lambda host, timeout=3.0: True)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", failing)
    with pytest.raises(UserError, match=r"could not get pretrained weights 'openai'.*--pretrained /path/to"):
        load_backbone("ViT-B-32", pretrained="openai", device="cpu")


def test_local_weights_file_round_trip(tmp_path, tiny_backbone):
    from conftest import TINY_CONFIG
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_backbone.model.state_dict().items()}, str(path))
    again = load_backbone(str(TINY_CONFIG), pretrained=str(path), device="cpu")
    assert again.weights_hash() == tiny_backbone.weights_hash()
    assert again.identity()["pretrained"] == str(path.resolve())


def test_device_choice():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("tpu")

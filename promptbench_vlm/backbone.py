"""Load an open_clip backbone: architecture by name or config JSON, weights by tag or local file.

The toy world's `toy-clip` is an ordinary open_clip model config shipped in this package; its
weights load from the shipped safetensors file when no `pretrained` is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import open_clip
import torch

from .errors import UserError
from .names import unknown_name_error

TOY_DIR = Path(__file__).resolve().parent / "toy"
TOY_MODEL = "toy-clip"
TOY_CONFIG = TOY_DIR / f"{TOY_MODEL}.json"
TOY_WEIGHTS = TOY_DIR / f"{TOY_MODEL}.safetensors"


@dataclass
class Backbone:
    """A frozen open_clip model with its tokenizer and evaluation preprocessing.

    Attributes:
        model: The open_clip ``CLIP`` module, in eval mode.
        tokenizer: Callable ``list[str] -> LongTensor[M, L]``.
        preprocess: PIL image -> tensor transform for evaluation.
        name: The architecture name.
        spec: What `load_backbone` was given as `model` (a name, or a config path made absolute).
        pretrained: The tag or absolute weights path it was loaded with; None for random init
            and for the shipped toy-clip weights.
    """

    model: torch.nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    preprocess: Callable[[Any], torch.Tensor]
    name: str
    spec: str
    pretrained: str | None
    _weights_hash: str | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def weights_hash(self) -> str:
        """SHA-256 (first 16 hex digits) over the backbone's tensors, computed once."""
        if self._weights_hash is None:
            h = hashlib.sha256()
            for key, tensor in sorted(self.model.state_dict().items()):
                h.update(key.encode())
                h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._weights_hash = h.hexdigest()[:16]
        return self._weights_hash

    def identity(self) -> dict[str, str | None]:
        """What a checkpoint or result file records: enough to rebuild and to verify the backbone."""
        return {"model": self.spec, "pretrained": self.pretrained, "weights_sha256": self.weights_hash()}


def resolve_device(device: str) -> torch.device:
    """Map ``auto|cpu|cuda[:i]`` to a torch device; ``auto`` picks CUDA when present."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but CUDA is not available on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"unknown device '{device}'. Valid: auto, cpu, cuda, cuda:N")
    return torch.device(device)


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype:
    """The compute precision of mixed precision: bf16 where the GPU supports it, else fp16;
    float32 on the CPU or with AMP off (AMP never runs on the CPU)."""
    if enabled and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def precision(device: torch.device, amp: bool) -> str:
    """Where and in which precision features are computed, e.g. ``cpu-float32``: part of a
    feature-cache key, since bf16 features differ from float32 ones."""
    return f"{device.type}-{str(amp_dtype(device, amp)).removeprefix('torch.')}"


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Autocast to `amp_dtype` on CUDA; a disabled autocast elsewhere."""
    dtype = amp_dtype(device, enabled)
    if dtype is torch.float32:
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cuda", dtype=dtype)


def _register_model(model: str) -> str:
    """Make `model` known to open_clip; a JSON path registers its config under the file's stem."""
    if model == TOY_MODEL:
        open_clip.add_model_config(TOY_CONFIG)
        return model
    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise UserError(f"model config file not found: {path}")
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        raise unknown_name_error("open_clip model", model, open_clip.list_models() + [TOY_MODEL])
    return model


def load_backbone(model: str = TOY_MODEL, pretrained: str | None = None, device: str = "auto") -> Backbone:
    """Build an open_clip backbone.

    Args:
        model: An open_clip architecture name (``"ViT-B-16"``), the path of an open_clip model
            config JSON, or ``"toy-clip"``.
        pretrained: A pretrained tag (``"openai"``; downloaded where the network allows), the
            path of a local weights file (``.safetensors``, or a torch file loaded with
            ``weights_only=True``), or None: random init, except for ``toy-clip`` whose shipped
            weights are used.
        device: ``auto``, ``cpu`` or ``cuda``.

    Raises:
        UserError: unknown model or tag, a missing file, or a hub download that failed.
    """
    torch_device = resolve_device(device)
    name = _register_model(model)
    spec = str(Path(model).resolve()) if model.endswith(".json") else model
    weights = pretrained
    if weights is None and name == TOY_MODEL:
        if not TOY_WEIGHTS.is_file():
            raise UserError(f"the shipped toy-clip weights are missing ({TOY_WEIGHTS}); reinstall the package")
        weights = str(TOY_WEIGHTS)
    local_file = weights is not None and _looks_like_path(weights)
    if local_file:
        if not Path(weights).is_file():
            raise UserError(f"weights file not found: {weights}")
        weights = str(Path(weights).resolve())
        if pretrained is not None:
            pretrained = weights
    elif pretrained:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise unknown_name_error(f"pretrained tag for {name}", pretrained, tags)
        cached = _offline_hub_weights(name, pretrained)
        if cached:
            weights, local_file = cached, True
    try:
        # A fixed seed makes a randomly initialised model (no pretrained) the same in every run;
        # open_clip logs its own "initialized randomly" warning to root: the CLI says it once.
        with _quiet_root_logger(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            clip_model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=None if local_file else weights, device=torch_device
            )
    except Exception as err:  # hub downloads fail in many ways; all mean the same to a user
        if pretrained and not local_file:
            reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            raise UserError(
                f"could not get pretrained weights '{pretrained}' for {name} from the hub ({reason}); "
                f"no network? download them elsewhere and pass --pretrained /path/to/weights.safetensors"
            ) from None
        raise
    if local_file:
        try:
            open_clip.load_checkpoint(clip_model, weights, weights_only=True, device=str(torch_device))
        except Exception as err:
            raise UserError(f"cannot load weights {weights} into {name}: {str(err).splitlines()[0][:200]}") from None
    clip_model.eval()
    for p in clip_model.parameters():
        p.requires_grad_(False)
    return Backbone(
        model=clip_model,
        tokenizer=open_clip.get_tokenizer(name),
        preprocess=preprocess,
        name=name,
        spec=spec,
        pretrained=pretrained,
    )


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _host_reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_hub_weights(name: str, tag: str) -> str | None:
    """Fail fast offline: None if the weights' host answers (open_clip downloads as usual);
    else the path of a locally cached copy; else a one-line UserError.

    Without this, an offline machine spends about a minute in hub retries before failing.
    """
    cfg = open_clip.get_pretrained_cfg(name, tag)
    repo = (cfg.get("hf_hub") or "").strip("/")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint if repo else cfg.get("url", "")).hostname
    if not host or _host_reachable(host):
        return None
    if repo:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            path = try_to_load_from_cache(repo, filename)
            if isinstance(path, str):
                return path
    raise UserError(
        f"cannot reach {host} to download pretrained weights '{tag}' for {name}, and no cached copy was found; "
        f"download them elsewhere and pass --pretrained /path/to/weights.safetensors"
    )


def _looks_like_path(weights: str) -> bool:
    """A pretrained value is a file path (not a hub tag) if it exists or looks like one."""
    return Path(weights).exists() or "/" in weights or weights.endswith((".safetensors", ".pt", ".pth", ".bin"))

"""Load an open_clip backbone: architecture by name or config JSON, weights by tag or local file.

A package can ship a model: a `ShippedModel` (an open_clip config and default weights)
registered by name in `SHIPPED_MODELS` (entry-point group ``promptbench_vlm.models``). The toy
world's `toy-clip` is one such (`promptbench_vlm.toy.model`); this module names no model.

The activation follows the weights: OpenAI's CLIP was trained with QuickGELU, and open_clip's
plain configs (``ViT-B-16``) build ``nn.GELU``, which moves every feature (by about 4e-2 on a
tiny model). So OpenAI weights, named by tag or found in a local OpenAI-format file, always build
the QuickGELU variant; a model config that explicitly asks for the other activation than its
weights were trained with is refused (`activation_for`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import open_clip
import torch

from .errors import UserError
from .names import unknown_name_error
from .registry import Registry
from .tokenizer import fast_tokenizer

OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")
"""Non-tensor-weight entries of OpenAI's CLIP state dict (the reference `clip.build_model` drops them)."""
QUICKGELU_SUFFIX = "-quickgelu"


@dataclass
class Backbone:
    """A frozen open_clip model with its tokenizer and evaluation preprocessing.

    Attributes:
        model: The open_clip ``CLIP`` module, in eval mode.
        tokenizer: Callable ``list[str] -> LongTensor[M, L]``: open_clip's, skipping ftfy where it
            cannot change a string (`tokenizer.FastTokenizer`, the same token ids).
        preprocess: PIL image -> tensor transform for evaluation.
        name: The architecture name.
        spec: What `load_backbone` was given as `model` (a name, or a config path made absolute).
        pretrained: The tag or absolute weights path it was loaded with; None for random init
            and for the shipped toy-clip weights.
        quick_gelu: Whether the towers use QuickGELU (chosen by the weights, see `activation_for`).
        random_init: No weights were loaded (none given, none shipped with the model): its
            numbers describe an untrained network.
    """

    model: torch.nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    preprocess: Callable[[Any], torch.Tensor]
    name: str
    spec: str
    pretrained: str | None
    quick_gelu: bool = False
    random_init: bool = False
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
        return {"model": self.spec, "pretrained": self.pretrained, "weights_sha256": self.weights_hash(),
                "quick_gelu": self.quick_gelu}


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


@dataclass(frozen=True)
class ShippedModel:
    """A model a package ships: an open_clip model config, and the weights used without `pretrained`.

    Attributes:
        config: The open_clip model-config JSON (registered under its file's stem).
        weights: The default weights file; None: random init unless `pretrained` is given.
    """

    config: Path
    weights: Path | None = None


SHIPPED_MODELS: Registry[ShippedModel] = Registry("promptbench_vlm.models", "model",
                                                  builtin={"toy-clip": "promptbench_vlm.toy.model:TOY_CLIP"})


def _register_model(model: str) -> tuple[str, Path | None]:
    """Make `model` known to open_clip: return its open_clip name and its shipped default
    weights (if any). A JSON path registers its config under the file's stem."""
    if model in SHIPPED_MODELS.names():
        shipped = SHIPPED_MODELS.get(model)
        open_clip.add_model_config(shipped.config)
        return Path(shipped.config).stem, shipped.weights
    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise UserError(f"model config file not found: {path}")
        open_clip.add_model_config(path)
        return path.stem, None
    if model not in open_clip.list_models():
        raise unknown_name_error("open_clip model", model, open_clip.list_models() + SHIPPED_MODELS.names())
    return model, None


def load_backbone(model: str = "toy-clip", pretrained: str | None = None, device: str = "auto") -> Backbone:
    """Build an open_clip backbone.

    Args:
        model: An open_clip architecture name (``"ViT-B-16"``), the path of an open_clip model
            config JSON, or a shipped model's name (``"toy-clip"``, `SHIPPED_MODELS`).
        pretrained: A pretrained tag (``"openai"``; downloaded where the network allows), the
            path of a local weights file (``.safetensors``, or a torch file loaded with
            ``weights_only=True``), or None: random init, except for a shipped model with
            weights of its own, which are used.
        device: ``auto``, ``cpu`` or ``cuda``.

    Raises:
        UserError: unknown model or tag, a missing file, or a hub download that failed.
    """
    torch_device = resolve_device(device)
    name, shipped_weights = _register_model(model)
    spec = str(Path(model).resolve()) if model.endswith(".json") else model
    weights = pretrained
    if weights is None and shipped_weights is not None:
        if not Path(shipped_weights).is_file():
            raise UserError(f"the shipped weights of {model} are missing ({shipped_weights}); reinstall the package")
        weights = str(shipped_weights)
    local_file = weights is not None and _looks_like_path(weights)
    openai_state: dict[str, torch.Tensor] | None = None
    trained_quick_gelu: bool | None = None
    if local_file:
        if not Path(weights).is_file():
            raise UserError(f"weights file not found: {weights}")
        weights = str(Path(weights).resolve())
        if pretrained is not None:
            pretrained = weights
        openai_state = _openai_state_dict(weights)
        trained_quick_gelu = True if openai_state is not None or _in_openai_hub_cache(weights) else None
    elif pretrained:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise unknown_name_error(f"pretrained tag for {name}", pretrained, tags)
        trained_quick_gelu = bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))
        cached = _offline_hub_weights(name, pretrained)
        if cached:
            weights, local_file = cached, True
    quick_gelu = activation_for(model, name, trained_quick_gelu, pretrained or weights)
    try:
        # A fixed seed makes a randomly initialised model (no pretrained) the same in every run;
        # open_clip logs its own "initialized randomly" warning to root: the CLI says it once.
        with _quiet_root_logger(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="QuickGELU mismatch")  # resolved by activation_for
            torch.manual_seed(0)
            clip_model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=None if local_file else weights, device=torch_device, force_quick_gelu=quick_gelu
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
            if openai_state is not None:
                _load_openai_state_dict(clip_model, openai_state)
            else:
                open_clip.load_checkpoint(clip_model, weights, weights_only=True, device=str(torch_device))
        except Exception as err:
            raise UserError(f"cannot load weights {weights} into {name}: {str(err).splitlines()[0][:200]}") from None
    clip_model.eval()
    for p in clip_model.parameters():
        p.requires_grad_(False)
    return Backbone(
        model=clip_model,
        tokenizer=fast_tokenizer(open_clip.get_tokenizer(name)),
        preprocess=preprocess,
        name=name,
        spec=spec,
        pretrained=pretrained,
        quick_gelu=quick_gelu,
        random_init=weights is None,
    )


def activation_for(model: str, name: str, trained_quick_gelu: bool | None, weights: str | None) -> bool:
    """Whether to build QuickGELU: as the weights were trained, whatever the plain config says.

    Args:
        model: What the user passed as the model (a name or a config JSON path).
        name: The registered open_clip config name.
        trained_quick_gelu: The weights' activation: from the pretrained tag's config, True for an
            OpenAI-format file, None when unknown (another local file, random init).
        weights: The tag or file, for the error message.

    Raises:
        UserError: the user's model explicitly asks for the other activation (a ``-quickgelu``
            name, or a config JSON with a ``quick_gelu`` entry) than the weights were trained with.
    """
    config = bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))
    if trained_quick_gelu is None or trained_quick_gelu == config:
        return config
    if name.endswith(QUICKGELU_SUFFIX) or _json_sets_quick_gelu(model):
        want, got = ("QuickGELU", "GELU") if trained_quick_gelu else ("GELU", "QuickGELU")
        raise UserError(
            f"weights {weights} were trained with {want}, but model {model} explicitly builds {got}: every feature "
            f"would be off; use a model config with quick_gelu={str(trained_quick_gelu).lower()}"
            + ("" if trained_quick_gelu else f" (e.g. {name.removesuffix(QUICKGELU_SUFFIX)})")
        )
    return trained_quick_gelu


def _json_sets_quick_gelu(model: str) -> bool:
    if not model.endswith(".json"):
        return False
    try:
        return "quick_gelu" in json.loads(Path(model).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def _openai_state_dict(path: str) -> dict[str, torch.Tensor] | None:
    """The state dict of an OpenAI-format weights file (it holds `OPENAI_META_KEYS`), else None.

    OpenAI's own ``.pt`` files are TorchScript archives, which cannot be read without running
    their code; they are refused with the way out.

    Raises:
        UserError: a TorchScript archive.
    """
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                if not any(k in f.keys() for k in OPENAI_META_KEYS):
                    return None
        except Exception:
            return None  # open_clip's loader reports what is wrong with the file
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        if _is_torchscript(path):
            raise UserError(
                f"{path} is a TorchScript archive (OpenAI's original .pt format), which cannot be read without "
                "running its code; use --pretrained openai, or a safetensors/state-dict copy of the weights"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            return None  # not a zip-format state dict: open_clip's loader reports what is wrong
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not any(k in state for k in OPENAI_META_KEYS):
            return None
    return {k.removeprefix("module."): v for k, v in state.items()}


def _is_torchscript(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _in_openai_hub_cache(path: str) -> bool:
    """A file inside the hub cache of an open_clip `openai` tag's repository (its safetensors copy)."""
    repos = {
        (open_clip.get_pretrained_cfg(model, tag).get("hf_hub") or "").strip("/").replace("/", "--")
        for model, tag in open_clip.list_pretrained() if tag == "openai"
    }
    return any(f"models--{repo}" in path for repo in repos if repo)


def _load_openai_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an OpenAI-layout state dict: open_clip's CLIP keys plus the three meta entries."""
    state = {k: v for k, v in state.items() if k not in OPENAI_META_KEYS}
    if "logit_scale" in state:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    model.load_state_dict(state, strict=True)


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

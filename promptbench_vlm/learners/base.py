"""The learner contract: all the evaluator may assume about a prompt learner.

A learner wraps a frozen open_clip backbone plus learned prompt parameters. It encodes images
(never depending on the template) and complete, already-filled prompt texts (adding its learned
context). Checkpoints hold only the learned tensors (safetensors) plus JSON metadata naming the
learner, its options and the backbone it was built on: never a pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..errors import UserError
from ..files import atomic_path

if TYPE_CHECKING:
    from ..backbone import Backbone

CHECKPOINT_FORMAT = "promptbench_vlm.learner/1"
METADATA_KEY = "promptbench_vlm"


class PromptLearner(nn.Module):
    """Base class of every learner, built-in or plug-in.

    Subclasses set `name`, implement `encode_images` and `encode_texts`, and register their
    learned tensors as trainable parameters (or buffers named in `learned_buffers`). The
    constructor takes the backbone and keyword options; `options` must be JSON-serialisable so a
    checkpoint can rebuild the learner from the file alone.

    Attributes:
        name: The registry name (``"coop"``).
        conditional: True when text features depend on the image (CoCoOp); the evaluator then
            calls ``encode_texts(texts, image_features=...)`` and gets ``[N, M, D]``.
        image_side_learned: True when image features depend on learned parameters (deep vision
            prompts); False lets caches reuse image features across learner states.
    """

    name: ClassVar[str] = ""
    conditional: ClassVar[bool] = False
    image_side_learned: ClassVar[bool] = False

    def __init__(self, backbone: Backbone, **options: Any):
        super().__init__()
        self.backbone = backbone
        self.clip = backbone.model
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.options: dict[str, Any] = dict(options)

    def train(self, mode: bool = True) -> PromptLearner:
        """Switch the learner's own modules; the frozen backbone always stays in eval mode
        (no dropout or patch dropout from the backbone while prompts train)."""
        super().train(mode)
        self.clip.eval()
        return self

    # --- the contract -------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Return L2-normalised image features ``[N, D]`` for preprocessed images."""
        raise NotImplementedError

    def encode_texts(self, texts: list[str], image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Return L2-normalised features ``[M, D]`` (``[N, M, D]`` if conditional) of filled prompts."""
        raise NotImplementedError

    @property
    def logit_scale(self) -> torch.Tensor:
        """The multiplier of cosine similarities, CLIP's learned temperature (exp'd)."""
        return self.clip.logit_scale.exp().detach()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Tokenise with the backbone's own tokenizer, on the learner's device.

        ``_`` reads as a space, as the reference code writes class names and init phrases
        (``golden_retriever``); the datasets' class names already come that way.
        """
        return self.backbone.tokenizer([t.replace("_", " ") for t in texts]).to(self.device)

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    # --- checkpoints --------------------------------------------------------------------
    def learned_state(self) -> dict[str, torch.Tensor]:
        """The learned tensors: every parameter outside the frozen backbone."""
        return {
            k: v.detach().cpu().contiguous()
            for k, v in self.state_dict().items()
            if not k.startswith("clip.") and not k.startswith("backbone.")
        }

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the learned tensors and metadata to a safetensors file."""
        meta = {
            "format": CHECKPOINT_FORMAT,
            "learner": self.name,
            "options": self.options,
            "backbone": self.backbone.identity(),
            "package_version": __version__,
            "extra": extra or {},
        }
        # One sorted JSON string under one key: safetensors keeps metadata in an unordered map,
        # so several keys would make two saves of the same tensors differ byte for byte.
        metadata = {METADATA_KEY: json.dumps(meta, sort_keys=True)}
        with atomic_path(path) as tmp:
            save_file(self.learned_state(), str(tmp), metadata=metadata)
        return Path(path)

    def load_learned_state(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Copy `tensors` into the learned parameters, with clear errors on any mismatch."""
        expected = self.learned_state()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise UserError(
                f"checkpoint {source} does not fit learner '{self.name}': "
                f"missing tensors {missing or 'none'}, unexpected {unexpected or 'none'}"
            )
        for k, v in tensors.items():
            if v.shape != expected[k].shape:
                raise UserError(
                    f"checkpoint {source}: tensor '{k}' has shape {tuple(v.shape)}, "
                    f"learner expects {tuple(expected[k].shape)} (another backbone or options?)"
                )
        self.load_state_dict(tensors, strict=False)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a learner checkpoint: tensors and decoded metadata. Never unpickles anything."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"cannot read checkpoint {path}: not a valid safetensors file ({err})") from None
    try:
        meta = json.loads(raw[METADATA_KEY])
    except (KeyError, ValueError):
        meta = {}
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a promptbench_vlm learner checkpoint (no '{METADATA_KEY}' metadata)")
    return tensors, meta

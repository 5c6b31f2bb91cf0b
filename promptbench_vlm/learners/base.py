"""The learner contract: all the evaluator may assume about a prompt learner.

A learner wraps a frozen open_clip backbone plus learned prompt parameters. It encodes images
(never depending on the template) and complete, already-filled prompt texts (adding its learned
context). Checkpoints hold only the learned tensors (safetensors) plus JSON metadata naming the
learner, its options and the backbone it was built on: never a pickle.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..errors import UserError
from ..files import atomic_path
from ..options import NoOptions, parse_options

if TYPE_CHECKING:
    from ..backbone import Backbone

CHECKPOINT_FORMAT = "promptbench_vlm.learner/1"
METADATA_KEY = "promptbench_vlm"


@dataclass(frozen=True)
class Capabilities:
    """What a training method may rely on about a learner, declared by the learner (class level,
    so a sweep can tell which method fits which learner before any model loads).

    Attributes:
        text_tokens: Names of the parameters that are text-side prompt tokens ``[n, W]``
            (``"ctx"``), or name prefixes ending in ``.`` (``"text_prompts."``, every tensor of a
            ParameterList). `encode_texts` reads them and also accepts one copy per text,
            ``[M, n, W]``, in their place (Promise takes each template's own gradient that way).
        vision_tokens: The same for image-side prompt tokens ``[n, W_v]`` (IVLP's vision prompts).
        layer_prompts: Both towers are built from ``text_layer_prompts()`` and
            ``vision_layer_prompts()`` (lists per layer, as `learners.text.encode` and
            `learners.vision.encode_image` take them), so extra tokens can join a layer
            (ANPrompt's anti-noise prompts, its NRVPP prototype).
        deep: Prompts at the input of deeper layers too (IVLP/MaPLe-style), not only at the input.
        default_lr: The reference peak learning rate for training this learner with plain
            cross-entropy (CoOp 0.002, MaPLe/IVLP 0.0035); a method may override it.
        anti_noise: Registry name of this learner's counterpart with ANPrompt's anti-noise
            prompts (``"anprompt-ivlp"``), which ANPrompt turns the learner into; None: none.
        optimizer: The reference optimiser of the shared training loop: ``"sgd"`` (with
            momentum, CoOp's recipe) or ``"adamw"`` (MMRL); a method may pin its own.
    """

    text_tokens: tuple[str, ...] = ()
    vision_tokens: tuple[str, ...] = ()
    layer_prompts: bool = False
    deep: bool = False
    default_lr: float = 0.002
    anti_noise: str | None = None
    optimizer: str = "sgd"


def matches(name: str, declared: tuple[str, ...]) -> bool:
    """Whether parameter `name` is among `declared` names or under a declared ``prefix.``."""
    return any(name == d or (d.endswith(".") and name.startswith(d)) for d in declared)


class PromptLearner(nn.Module):
    """Base class of every learner, built-in or plug-in.

    Subclasses set `name`, declare their options (`Options`, a dataclass of `options.option`
    fields) and capabilities, implement `encode_images` and `encode_texts`, and register their
    learned tensors as trainable parameters (or buffers). The constructor takes the backbone and
    keyword options, checked against `Options` here; the typed result is `config`, and
    `options` (its dict, plus any value the learner resolves, e.g. a default depth) is what a
    checkpoint records to rebuild the learner from the file alone.

    Attributes:
        name: The registry name (``"coop"``).
        Options: The declared options (`options.NoOptions`: none).
        capabilities: What methods may rely on (`Capabilities`).
        conditional: True when text features depend on the image (CoCoOp); the evaluator then
            calls ``encode_texts(texts, image_features=...)`` and gets ``[N, M, D]``.
        image_side_learned: True when image features depend on learned parameters (deep vision
            prompts); False lets caches reuse image features across learner states.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    capabilities: ClassVar[Capabilities] = Capabilities()
    conditional: ClassVar[bool] = False
    image_side_learned: ClassVar[bool] = False

    def __init__(self, backbone: Backbone, **options: Any):
        super().__init__()
        self.backbone = backbone
        self.clip = backbone.model
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.config = parse_options(f"learner '{self.name}'", type(self).Options, options)
        self.options: dict[str, Any] = asdict(self.config)

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

    def scoring(self, subset: str) -> AbstractContextManager[None]:
        """The context in which the evaluator scores `subset` (``all``, ``base``, ``new``, or a
        transfer target ``target:LABEL``, with an ``@pool`` suffix under the wording protocol). A
        learner whose inference path depends on whether the classes were seen in training
        switches here (MMRL: combined features for base, class token for new), so the evaluator
        need not know it; default: nothing changes."""
        return nullcontext()

    @property
    def feature_mode(self) -> str | None:
        """The inference path `scoring` selected (part of the image-feature cache key); None for
        a learner with a single path."""
        return None

    def extra_loss(self, images: torch.Tensor, labels: torch.Tensor, texts: list[str]
                   ) -> tuple[torch.Tensor, dict[str, float]] | None:
        """A learner's own training term, added by the methods to their loss (ERM, Promise at θ):
        e.g. MMRL's regularisation towards frozen CLIP. `texts` are the class texts of the
        method's template, in class order; None (the default): no term."""
        return None

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

    def token_parameters(self, side: str = "both") -> dict[str, nn.Parameter]:
        """The trainable prompt-token tensors the learner declares, by name: ``"text"``,
        ``"vision"`` or ``"both"`` sides (see `Capabilities`)."""
        caps = self.capabilities
        declared = {"text": caps.text_tokens, "vision": caps.vision_tokens,
                    "both": caps.text_tokens + caps.vision_tokens}[side]
        return {n: p for n, p in self.named_parameters() if p.requires_grad and matches(n, declared)}

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

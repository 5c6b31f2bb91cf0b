"""MMRL (Guo and Gu, CVPR 2025): multi-modal representation learning.

A shared, modality-agnostic space of ``n_rep_tokens`` learnable representation tokens ``[n, R]``
(R = ``rep_dim``, 512 in the paper) is projected, one ``Linear(R -> W)`` per layer and tower,
into the input of the higher layers (``first_layer`` .. the top, 1-indexed as the reference's
``REP_LAYERS``; 6-12 on ViT-B/16) of both encoders. The tokens join the sequence at the first of
those layers and are replaced at each later one; they carry no positional embedding. Text side:
inserted right after [SOS] under the causal mask (kept at the sequence's tail with the mask of an
insertion, `blocks.LayerPrompts`), features still read at EOS. Image side: next to the class and
patch tokens. The text template stays hand-written (no learned context).

Two image features come out of one forward: the class token through ``ln_post`` and CLIP's
``proj`` (the *class-token* feature), and the mean of the representation tokens after ``ln_post``
through a learned ``proj_rep`` ``[W_v, D]`` (the *representation* feature). Logits of the two
combine as ``alpha * cos(f_cls, t) + (1 - alpha) * cos(f_rep, t)`` for classes seen in training
(base) and the class-token logits alone for unseen ones (new). See docs/methods-mmrl.md for how
the evaluator's subset selects the path through the learner contract (`PromptLearner.scoring`).
Training (`extra_loss`): ``alpha * CE_cls + (1 - alpha) * CE_rep`` plus ``reg_weight`` times the
cosine distances of the class-token image features and the text features to frozen CLIP's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone
from ..errors import UserError
from ..options import option
from ..protocols import is_target
from . import text
from .base import Capabilities, PromptLearner
from .blocks import LayerPrompts
from .checks import check_count, check_text_tower, check_vision_tower
from .vision import encode_image_with_prompts

REFERENCE_LAYERS = 12
"""Blocks of ViT-B/16's towers, for which the paper's layers 6-12 are published."""
REFERENCE_FIRST_LAYER = 6
MMRL_LR = 0.001
"""The reference peak rate (AdamW, configs/trainers/MMRL/vit_b16.yaml)."""

Branch = Literal["auto", "fused", "cls"]


@dataclass(frozen=True)
class MMRLOptions:
    """Options of `mmrl` (defaults: the published ViT-B/16 base-to-new configuration)."""

    n_rep_tokens: int = option(5, "Representation tokens; 0 leaves both towers plain.")
    rep_dim: int = option(512, "Dimension R of the shared representation space.")
    first_layer: int | None = option(None, "First layer (1-indexed, >= 2) whose input gets the tokens; they stay "
                                     "up to the top. None: 6 on a 12-layer tower, else the same top 7/12 share "
                                     "of the shallower tower (at least its last layer).")
    alpha: float = option(0.7, "Weight of the class-token logits in the base-class combination and the loss.")
    reg_weight: float = option(1.0, "Weight of each cosine regulariser towards frozen CLIP's features.")
    branch: Branch = option("auto", "Image features scored: auto = combined for 'base' and 'all', class token "
                            "only for 'new'; fused / cls = that path for every subset (cls for "
                            "cross-dataset and domain-shift targets).")


def default_first_layer(layers: int) -> int:
    """The reference's top 7 of 12 layers (6-12) as the same share of a `layers`-deep tower."""
    share = REFERENCE_LAYERS - REFERENCE_FIRST_LAYER + 1
    top = max(1, round(share * layers / REFERENCE_LAYERS))
    return max(2, layers - top + 1) if layers >= 2 else 2


def projection(width: int, rep_dim: int) -> tuple[nn.Parameter, nn.Parameter]:
    """Weight ``[W, R]`` and bias ``[W]`` of one ``Linear(R -> W)``, drawn as torch draws them.

    Kept as bare tensors, not an ``nn.Linear``, so `project` also takes one copy per text.
    """
    layer = nn.Linear(rep_dim, width)
    return nn.Parameter(layer.weight.detach().clone()), nn.Parameter(layer.bias.detach().clone())


def project(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``tokens @ weight.T + bias``; any argument may carry a leading per-text dimension."""
    return tokens @ weight.transpose(-1, -2) + bias.unsqueeze(-2)


class MMRLLearner(PromptLearner):
    """Shared representation tokens projected into the upper layers of both towers.

    Args:
        backbone: A CLIP with open_clip's text transformer and VisionTransformer image tower.
        **options: See `MMRLOptions`.

    Attributes:
        rep_tokens: ``[n, R]`` the shared representation tokens, N(0, 0.02).
        text_proj_w, text_proj_b: Per text layer from `first_layer`, the map ``R -> W_text``.
        vision_proj_w, vision_proj_b: Per image layer from `first_layer`, the map ``R -> W_v``.
        proj_rep: ``[W_v, D]`` projection of the pooled representation tokens.
    """

    name = "mmrl"
    Options = MMRLOptions
    capabilities = Capabilities(text_tokens=("rep_tokens", "text_proj_w.", "text_proj_b."), deep=True,
                                default_lr=MMRL_LR, optimizer="adamw")
    image_side_learned = True

    def __init__(self, backbone: Backbone, **options: Any):
        super().__init__(backbone, **options)
        cfg = self.config
        check_count(self.name, "n_rep_tokens", cfg.n_rep_tokens)
        check_count(self.name, "rep_dim", cfg.rep_dim, low=1)
        check_text_tower(self.name, backbone, cfg.n_rep_tokens)
        visual = check_vision_tower(self.name, backbone)
        text_layers, vision_layers = len(self.clip.transformer.resblocks), len(visual.transformer.resblocks)
        first = cfg.first_layer if cfg.first_layer is not None else default_first_layer(min(text_layers, vision_layers))
        self.options["first_layer"] = first
        check_count(self.name, "first_layer", first, low=2)
        if first > min(text_layers, vision_layers):
            raise UserError(f"learner '{self.name}': first_layer={first} but this backbone's towers have "
                            f"{text_layers} (text) and {vision_layers} (image) layers; pass first_layer <= "
                            f"{min(text_layers, vision_layers)}")
        if not 0.0 <= cfg.alpha <= 1.0 or cfg.reg_weight < 0:
            raise UserError(f"learner '{self.name}': alpha must lie in [0, 1] and reg_weight be >= 0, "
                            f"got alpha={cfg.alpha}, reg_weight={cfg.reg_weight}")
        self.first = first
        n, r = cfg.n_rep_tokens, cfg.rep_dim
        self.rep_tokens = nn.Parameter(torch.empty(n, r).normal_(std=0.02))
        text_count = text_layers - first + 1 if n else 0
        vision_count = vision_layers - first + 1 if n else 0
        # As the reference: every layer's map starts as a copy of one draw (per tower).
        tw, tb = projection(self.clip.transformer.width, r)
        vw, vb = projection(visual.transformer.width, r)
        self.text_proj_w = nn.ParameterList([nn.Parameter(tw.detach().clone()) for _ in range(text_count)])
        self.text_proj_b = nn.ParameterList([nn.Parameter(tb.detach().clone()) for _ in range(text_count)])
        self.vision_proj_w = nn.ParameterList([nn.Parameter(vw.detach().clone()) for _ in range(vision_count)])
        self.vision_proj_b = nn.ParameterList([nn.Parameter(vb.detach().clone()) for _ in range(vision_count)])
        width, dim = visual.transformer.width, visual.proj.shape[1]
        self.proj_rep = nn.Parameter(torch.randn(width, dim) * width ** -0.5)  # the reference's fresh draw
        self.active_branch: str = "cls" if cfg.branch == "cls" else "fused"

    # --- inference paths -----------------------------------------------------------------
    @contextmanager
    def scoring(self, subset: str) -> Iterator[None]:
        """Score base classes (and 'all', the trained-on classes) with the combined features and
        new classes and transfer targets (``target:LABEL``) with the class token alone, as the
        reference does on cross-dataset and DG targets, unless the `branch` option fixes one path."""
        chosen = self.config.branch
        if chosen == "auto":
            chosen = "cls" if subset.split("@")[0] == "new" or is_target(subset) else "fused"
        previous, self.active_branch = self.active_branch, chosen
        try:
            yield
        finally:
            self.active_branch = previous

    @property
    def feature_mode(self) -> str | None:
        return self.active_branch

    def _layer_prompts(self, weights: nn.ParameterList, biases: nn.ParameterList, tokens: torch.Tensor
                       ) -> list[LayerPrompts | None]:
        """Per block from block 0 (block 0 unused by the towers' loops): None below the first
        layer, then that layer's projected tokens as extra tokens."""
        projected = [LayerPrompts(None, project(tokens, w, b)) for w, b in zip(weights, biases)]
        return [None] * (self.first - 1) + projected

    def image_branches(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised class-token and representation image features (None without tokens)."""
        visual = self.clip.visual
        prompts = self._layer_prompts(self.vision_proj_w, self.vision_proj_b, self.rep_tokens)
        pooled, rep = encode_image_with_prompts(visual, images, prompts if len(self.vision_proj_w) else [])
        if not rep.shape[1]:
            return F.normalize(pooled, dim=-1), None
        rep = visual.ln_post(rep).mean(dim=1) @ self.proj_rep.to(rep.dtype)
        return F.normalize(pooled, dim=-1), F.normalize(rep, dim=-1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Training: the class-token features. Scoring: those, or on the combined path the
        convex combination ``alpha f_cls + (1 - alpha) f_rep`` of the two unit features, left
        unnormalised so that cosine logits are exactly the reference's combined logits."""
        cls, rep = self.image_branches(images)
        if self.training or rep is None or self.active_branch == "cls":
            return cls
        alpha = self.config.alpha
        return alpha * cls + (1 - alpha) * rep

    def encode_texts(self, texts: list[str], image_features: torch.Tensor | None = None) -> torch.Tensor:
        batch = text.prepare(self.clip, self.tokenize(texts), 0)
        prompts = self._layer_prompts(self.text_proj_w, self.text_proj_b, self.rep_tokens)
        return F.normalize(text.encode(self.clip, batch, prompts if len(self.text_proj_w) else []), dim=-1)

    # --- training ------------------------------------------------------------------------
    def extra_loss(self, images: torch.Tensor, labels: torch.Tensor, texts: list[str]
                   ) -> tuple[torch.Tensor, dict[str, float]] | None:
        """MMRL's loss beyond the method's cross-entropy on the class-token logits (CE_cls):
        ``(1 - alpha) (CE_rep - CE_cls) + reg_weight (d_img + d_text)``, so that a method adding
        it to CE_cls trains on the reference's ``alpha CE_cls + (1 - alpha) CE_rep + reg``; d are
        one minus the mean cosine to frozen CLIP's image features and to its features of `texts`
        (the class texts of the method's template)."""
        cls, rep = self.image_branches(images)
        class_text = self.encode_texts(texts)
        with torch.no_grad():
            clip_image = F.normalize(self.clip.encode_image(images), dim=-1)
            clip_text = F.normalize(self.clip.encode_text(self.tokenize(texts)), dim=-1)
        d_img = 1 - F.cosine_similarity(cls, clip_image, dim=-1).mean()
        d_text = 1 - F.cosine_similarity(class_text, clip_text, dim=-1).mean()
        loss = self.config.reg_weight * (d_img + d_text)
        diagnostics = {"reg_image": d_img.item(), "reg_text": d_text.item()}
        if rep is not None:
            scale = self.logit_scale
            ce_cls = F.cross_entropy(scale * cls @ class_text.T, labels)
            ce_rep = F.cross_entropy(scale * rep @ class_text.T, labels)
            loss = loss + (1 - self.config.alpha) * (ce_rep - ce_cls)
            diagnostics["ce_rep"] = ce_rep.item()
        return loss, diagnostics

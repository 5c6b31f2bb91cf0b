"""ANPrompt's anti-noise prompts on the deep-prompt learners (IVLP, MaPLe).

K noise prompts (``[K, D]``: frozen cluster centres of weak-noise text features, which the
`anprompt` training method computes) pass through one learned ``Linear(D -> W)`` per tower;
joined with `anti_tokens` learnable tokens per layer they form that layer's anti-noise prompts
``[K + anti_tokens, W]``. They enter both towers at the input of the last `anti_layers` blocks as
extra tokens (`blocks.LayerPrompts`), beside the learner's own deep prompts.

`anprompt-ivlp` and `anprompt-maple` are those learners, registered so that a checkpoint (whose
tensors include the noise prompts) rebuilds them from its options alone. `add_anti_noise` turns
an already built learner into the anti-noise counterpart its capabilities name, in place: the
trainer keeps the learner object it built and saves and scores that object, so the method cannot
swap in a wrapper. A plug-in learner with the `layer_prompts` capability gets a counterpart the
same way: ``class Mine(AntiNoiseLearner, MyLearner)`` registered under the name it declares as
``Capabilities.anti_noise`` (docs/plugins.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone
from ..errors import UserError
from ..options import option, parse_options
from .base import PromptLearner
from .blocks import LayerPrompts
from .checks import check_count
from .deep import DeepOptions, random_prompts
from .ivlp import IVLPLearner, IVLPOptions
from .maple import MaPLeLearner
from .text import text_feature_dim
from .vision import encode_image_with_prompts

NrvppTokens = Literal["all", "deep", "anti"]
"""Which output prompt tokens the NRVPP prototype averages."""


class AntiNoisePrompts(nn.Module):
    """The noise prompts, their per-tower linear maps and the learnable tokens of each layer.

    Args:
        clusters: K, the number of noise prompts.
        dim: D, the joint embedding dimension the noise prompts live in.
        towers: Per tower name, its token width and how many layers get anti-noise prompts.
        tokens: Learnable tokens per layer and tower.

    Attributes:
        noise: ``[K, D]`` noise prompts; a buffer (no gradient) that checkpoints carry.
    """

    def __init__(self, clusters: int, dim: int, towers: dict[str, tuple[int, int]], tokens: int):
        super().__init__()
        self.register_buffer("noise", torch.zeros(clusters, dim))
        self.maps = nn.ModuleDict({name: nn.Linear(dim, width) for name, (width, _) in towers.items()})
        self.tokens = nn.ModuleDict({
            name: nn.ParameterList([random_prompts(tokens, width) for _ in range(layers)])
            for name, (width, layers) in towers.items()
        })

    def layer_prompts(self, tower: str) -> list[torch.Tensor]:
        """The anti-noise prompts ``[K + tokens, W]`` of each anti-noise layer of `tower`, in order."""
        noise = self.maps[tower](self.noise)
        return [torch.cat([noise, tokens]) for tokens in self.tokens[tower]]


@dataclass(frozen=True)
class AntiNoiseOptions:
    """The anti-noise options an anprompt learner adds to its base learner's."""

    clusters: int = option(4, "Number of noise prompts K.")
    anti_tokens: int = option(2, "Learnable tokens per anti-noise layer and tower.")
    anti_layers: int = option(2, "How many last layers of each tower get anti-noise prompts.")


class AntiNoiseLearner(PromptLearner):
    """Mixin: a learner with the `layer_prompts` capability whose last layers also carry
    anti-noise prompts (see module doc); list it before the base learner class.

    Attributes:
        anti_noise: The anti-noise part; ``anti_noise.noise`` holds the noise prompts.
    """

    def _add_anti_noise(self, clusters: int, anti_tokens: int, anti_layers: int) -> None:
        """Create the anti-noise part and record its settings in the learner's options."""
        check_count(self.name, "clusters", clusters, low=1)
        check_count(self.name, "anti_tokens", anti_tokens)
        check_count(self.name, "anti_layers", anti_layers, low=1)
        text_layers, vision_layers = len(self.clip.transformer.resblocks), self._vision_layers()
        if min(text_layers, vision_layers) < 2:
            raise UserError(f"learner '{self.name}': anti-noise prompts need towers of at least 2 layers")
        self.options.update(clusters=clusters, anti_tokens=anti_tokens, anti_layers=anti_layers)
        towers = {"text": (self.clip.transformer.width, len(self._anti_layers(text_layers))),
                  "vision": (int(self.clip.visual.transformer.width), len(self._anti_layers(vision_layers)))}
        self.anti_noise = AntiNoisePrompts(clusters, text_feature_dim(self.clip), towers, anti_tokens).to(self.device)

    def _vision_layers(self) -> int:
        return len(self.clip.visual.transformer.resblocks)

    def _anti_layers(self, layers: int) -> range:
        """The blocks whose input gets anti-noise prompts: the last `anti_layers`, never block 0
        (its input is the embedded sequence itself, where the learner's own prompts go)."""
        return range(max(1, layers - self.options["anti_layers"]), layers)

    def _with_anti_noise(self, prompts: list[torch.Tensor], tower: str, layers: int
                         ) -> list[torch.Tensor | LayerPrompts | None]:
        """`prompts` per layer, padded to every layer, with the anti-noise prompts joined in."""
        entries: list[torch.Tensor | LayerPrompts | None] = [*prompts, *[None] * (layers - len(prompts))]
        for layer, extra in zip(self._anti_layers(layers), self.anti_noise.layer_prompts(tower)):
            entries[layer] = LayerPrompts(entries[layer], extra)
        return entries

    def text_layer_prompts(self) -> list[torch.Tensor | LayerPrompts | None]:
        return self._with_anti_noise(super().text_layer_prompts(), "text", len(self.clip.transformer.resblocks))

    def vision_layer_prompts(self) -> list[torch.Tensor | LayerPrompts | None]:
        return self._with_anti_noise(super().vision_layer_prompts(), "vision", self._vision_layers())

    def __init__(self, backbone: Backbone, **options: Any):
        super().__init__(backbone, **options)
        self._add_anti_noise(self.config.clusters, self.config.anti_tokens, self.config.anti_layers)


@dataclass(frozen=True)
class ANPromptIVLPOptions(AntiNoiseOptions, IVLPOptions):
    """IVLP's options plus the anti-noise ones."""


@dataclass(frozen=True)
class ANPromptMaPLeOptions(AntiNoiseOptions, DeepOptions):
    """MaPLe's options plus the anti-noise ones."""


class ANPromptIVLP(AntiNoiseLearner, IVLPLearner):
    """IVLP with anti-noise prompts; options are IVLP's plus the anti-noise ones."""

    name = "anprompt-ivlp"
    Options = ANPromptIVLPOptions
    capabilities = replace(IVLPLearner.capabilities, anti_noise=name)


class ANPromptMaPLe(AntiNoiseLearner, MaPLeLearner):
    """MaPLe with anti-noise prompts; options are MaPLe's plus the anti-noise ones.

    The anti-noise prompts of the image tower are not projected from the text side as MaPLe's own
    prompts are: both towers map the shared noise prompts with their own linear map.
    """

    name = "anprompt-maple"
    Options = ANPromptMaPLeOptions
    capabilities = replace(MaPLeLearner.capabilities, anti_noise=name)


def add_anti_noise(learner: PromptLearner, clusters: int, anti_tokens: int, anti_layers: int) -> AntiNoiseLearner:
    """Turn a built learner into the anti-noise counterpart its capabilities name, in place.

    The result is what building that counterpart with the learner's options plus these would
    give (its checkpoint rebuilds it), keeping the prompts the learner already has.

    Raises:
        UserError: the learner declares no counterpart, or one that is not an `AntiNoiseLearner`
            extending the learner's own class.
    """
    from . import LEARNERS

    target = learner.capabilities.anti_noise
    if target is None:
        raise UserError(f"learner '{learner.name}' lacks the capability 'anti_noise' (no anti-noise counterpart "
                        "declared in its Capabilities)")
    counterpart = LEARNERS.get(target)
    if not (isinstance(counterpart, type) and issubclass(counterpart, AntiNoiseLearner)
            and issubclass(counterpart, type(learner))):
        raise UserError(f"learner '{learner.name}' names '{target}' as its anti-noise counterpart, which is not an "
                        f"AntiNoiseLearner subclass of {type(learner).__name__}")
    learner.__class__ = counterpart
    learner._add_anti_noise(clusters, anti_tokens, anti_layers)
    learner.config = parse_options(f"learner '{learner.name}'", counterpart.Options, learner.options)
    return learner


def encode_images_with_prototype(learner: PromptLearner, images: torch.Tensor, tokens: str = "all"
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image features ``[N, D]`` and the NRVPP prototype ``[N, D]``, from one forward.

    The prototype is the mean of the image tower's output prompt tokens, each through ``ln_post``
    and ``proj``, normalised: `tokens` picks ``all`` of them, the learner's own ``deep`` prompt
    slot, or the ``anti``-noise ones.
    """
    prompts = learner.vision_layer_prompts()
    feats, out = encode_image_with_prompts(learner.clip.visual, images, prompts)
    n_slot = prompts[0].shape[0] if prompts and prompts[0] is not None else 0
    chosen = {"all": out, "deep": out[:, :n_slot], "anti": out[:, n_slot:]}[tokens]
    if chosen.shape[1] == 0:
        raise UserError(f"learner '{learner.name}' has no '{tokens}' vision prompt tokens for the NRVPP prototype")
    visual = learner.clip.visual
    projected = visual.ln_post(chosen)
    if visual.proj is not None:
        projected = projected @ visual.proj
    return F.normalize(feats, dim=-1), F.normalize(projected.mean(dim=1), dim=-1)

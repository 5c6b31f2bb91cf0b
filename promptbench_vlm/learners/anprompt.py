"""ANPrompt's anti-noise prompts on the deep-prompt learners (IVLP, MaPLe).

K noise prompts (``[K, D]``: frozen cluster centres of weak-noise text features, which the
`anprompt` training method computes) pass through one learned ``Linear(D -> W)`` per tower;
joined with `anti_tokens` learnable tokens per layer they form that layer's anti-noise prompts
``[K + anti_tokens, W]``. They enter both towers at the input of the last `anti_layers` blocks as
extra tokens (`blocks.LayerPrompts`), beside the learner's own deep prompts.

`anprompt-ivlp` and `anprompt-maple` are those learners, registered so that a checkpoint (whose
tensors include the noise prompts) rebuilds them from its options alone. `add_anti_noise` turns
an already built ivlp/maple learner into its anprompt counterpart in place: the trainer keeps the
learner object it built and saves and scores that object, so the method cannot swap in a wrapper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone
from ..errors import UserError
from .blocks import LayerPrompts
from .checks import check_count
from .coop import DEFAULT_CTX_INIT
from .deep import DeepPromptLearner, random_prompts
from .ivlp import IVLPLearner
from .maple import MaPLeLearner
from .text import text_feature_dim
from .vision import encode_image_with_prompts

NRVPP_TOKENS = ("all", "deep", "anti")


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


class AntiNoiseLearner(DeepPromptLearner):
    """A deep-prompt learner whose last layers also carry anti-noise prompts (see module doc).

    Attributes:
        anti_noise: The anti-noise part; ``anti_noise.noise`` holds the noise prompts.
    """

    def _add_anti_noise(self, clusters: int, anti_tokens: int, anti_layers: int) -> None:
        """Create the anti-noise part and record its settings in the learner's options."""
        check_count(self.name, "clusters", clusters, low=1)
        check_count(self.name, "anti_tokens", anti_tokens)
        check_count(self.name, "anti_layers", anti_layers, low=1)
        text_layers = len(self.clip.transformer.resblocks)
        if min(text_layers, self.vision_layers) < 2:
            raise UserError(f"learner '{self.name}': anti-noise prompts need towers of at least 2 layers")
        self.options.update(clusters=clusters, anti_tokens=anti_tokens, anti_layers=anti_layers)
        towers = {"text": (self.clip.transformer.width, len(self._anti_layers(text_layers))),
                  "vision": (self.vision_width, len(self._anti_layers(self.vision_layers)))}
        self.anti_noise = AntiNoisePrompts(clusters, text_feature_dim(self.clip), towers, anti_tokens).to(self.device)

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
        return self._with_anti_noise(super().vision_layer_prompts(), "vision", self.vision_layers)


class ANPromptIVLP(AntiNoiseLearner, IVLPLearner):
    """IVLP with anti-noise prompts; options are IVLP's plus the anti-noise ones.

    Args:
        clusters: Number of noise prompts K (default 4).
        anti_tokens: Learnable tokens per anti-noise layer and tower (default 2).
        anti_layers: How many last layers of each tower get anti-noise prompts (default 2).
    """

    name = "anprompt-ivlp"

    def __init__(self, backbone: Backbone, n_ctx: int = 2, ctx_init: str | None = DEFAULT_CTX_INIT,
                 depth: int | None = None, n_ctx_v: int = 2, depth_v: int | None = None,
                 clusters: int = 4, anti_tokens: int = 2, anti_layers: int = 2):
        super().__init__(backbone, n_ctx, ctx_init, depth, n_ctx_v, depth_v)
        self._add_anti_noise(clusters, anti_tokens, anti_layers)


class ANPromptMaPLe(AntiNoiseLearner, MaPLeLearner):
    """MaPLe with anti-noise prompts; options are MaPLe's plus the anti-noise ones (see `ANPromptIVLP`).

    The anti-noise prompts of the image tower are not projected from the text side as MaPLe's own
    prompts are: both towers map the shared noise prompts with their own linear map.
    """

    name = "anprompt-maple"

    def __init__(self, backbone: Backbone, n_ctx: int = 2, ctx_init: str | None = DEFAULT_CTX_INIT,
                 depth: int | None = None, clusters: int = 4, anti_tokens: int = 2, anti_layers: int = 2):
        super().__init__(backbone, n_ctx, ctx_init, depth)
        self._add_anti_noise(clusters, anti_tokens, anti_layers)


ANTI_NOISE_LEARNERS: dict[str, type[AntiNoiseLearner]] = {"ivlp": ANPromptIVLP, "maple": ANPromptMaPLe}


def add_anti_noise(learner: DeepPromptLearner, clusters: int, anti_tokens: int, anti_layers: int
                   ) -> AntiNoiseLearner:
    """Turn a built ivlp/maple learner into its anprompt counterpart, in place.

    The result is what building ``anprompt-<name>`` with the learner's options plus these would
    give (its checkpoint rebuilds it), keeping the prompts the learner already has.
    """
    if learner.name not in ANTI_NOISE_LEARNERS:
        raise UserError(f"anti-noise prompts fit {', '.join(ANTI_NOISE_LEARNERS)}, not '{learner.name}'")
    learner.__class__ = ANTI_NOISE_LEARNERS[learner.name]
    learner._add_anti_noise(clusters, anti_tokens, anti_layers)
    return learner


def encode_images_with_prototype(learner: DeepPromptLearner, images: torch.Tensor, tokens: str = "all"
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

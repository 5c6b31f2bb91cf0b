"""ANPrompt: prompt tuning with mild semantic noise, on the deep-prompt learners (IVLP, MaPLe).

Components (docs/methods-anprompt.md says which follow the paper and which are our reading):
weak-noise frozen text features, fused and clustered into K noise prompts; anti-noise prompts
built from them in the last layers of both towers (`learners.anprompt`); the NRVPP visual
prototype as a second logit head; the variance-adaptive weak alignment loss (WALoss) between
clean and weakly perturbed predictions; and PromptSRC-style similarity losses to the frozen model
(the frozen text target and the optional GPA are PromptSRC's own, inherited).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.vq import kmeans2

from ..errors import UserError
from ..learners.anprompt import AntiNoiseLearner, NrvppTokens, add_anti_noise, encode_images_with_prototype
from ..learners.base import PromptLearner
from ..options import option
from ..perturb import LEVELS, OPS, fill_template, perturb
from .promptsrc import PromptSRC, PromptSRCOptions

ANTI_NOISE_DEFAULTS = {"clusters": 4, "anti_tokens": 2, "anti_layers": 2}


@dataclass(frozen=True)
class ANPromptOptions(PromptSRCOptions):
    """Options of `anprompt` (PromptSRC's, with ANPrompt's own weights and defaults)."""

    text_weight: float = option(1.0, "Weight of 1 - cos to the frozen text target.")
    image_weight: float = option(1.0, "Weight of 1 - cos to the frozen image feature.")
    kl_weight: float = option(0.0, "Weight of KL(zero-shot || prompted).")
    gpa: bool = option(False, "Gaussian prompt aggregation of the per-epoch prompts (PromptSRC's).")
    noise_prompts: bool = option(True, "Anti-noise prompts; off: the learner stays plain.")
    clusters: int | None = option(None, "K noise prompts; none: 4 (or the learner's own).")
    anti_tokens: int | None = option(None, "Learnable tokens per anti-noise layer; none: 2 (or the learner's).")
    anti_layers: int | None = option(None, "Last layers with anti-noise prompts; none: 2 (or the learner's).")
    noise_template: str = option("a photo of a {}.", "Main sentence of the frozen noise features.")
    noise_ops: str = option("context,synonym", "Perturbation ops applied in turn, comma-separated.")
    noise_rate: float = option(LEVELS["weak"], "Rate of the noise ops.")
    noise_draws: int = option(4, "Perturbed sentences per class.")
    fuse_weight: float = option(0.5, "lambda_f in normalise(f(main) + lambda_f * f(noise)).")
    cluster_seed: int | None = option(None, "k-means seed; none: the run's torch seed.")
    nrvpp: bool = option(True, "The NRVPP visual-prototype logit head.")
    nrvpp_weight: float = option(0.5, "Weight w_p of the prototype head's loss.")
    nrvpp_tokens: NrvppTokens = option("all", "Output prompt tokens the prototype averages.")
    waloss: bool = option(True, "The weak alignment loss between clean and noisy predictions.")
    waloss_weight: float = option(1.0, "Weight w_wa of WALoss.")
    waloss_detach_std: bool = option(True, "Hold WALoss's logit std constant.")


def weak_noise(text: str, classname: str, ops: tuple[str, ...], rate: float, seed: int) -> str:
    """`text` (holding `classname` once) after each op in turn; the class span is found anew
    after each op since an edit before the class name moves it."""
    for op in ops:
        found = re.search(rf"(?<!\w){re.escape(classname)}(?!\w)", text)
        if found is None:
            raise UserError(f"class name {classname!r} not found in the noise sentence {text!r}")
        text = perturb(text, found.span(), op, rate, seed).text
    return text


def noise_sentences(template: str, classnames: list[str], ops: tuple[str, ...], rate: float, draws: int
                    ) -> tuple[list[str], list[list[str]]]:
    """The main sentence of each class and `draws` weakly perturbed ones: ``noisy[r][c]`` (seed r)."""
    main = [fill_template(template, c)[0] for c in classnames]
    noisy = [[weak_noise(m, c, ops, rate, seed=r) for m, c in zip(main, classnames)] for r in range(draws)]
    return main, noisy


@torch.no_grad()
def fused_noise_features(learner: PromptLearner, main: list[str], noisy: list[list[str]], fuse_weight: float
                         ) -> torch.Tensor:
    """``normalise(f(main) + λ_f · f(noise))`` with f the FROZEN text encoder's normalised feature,
    one row per draw and class ``[R · C, D]``."""
    clip = learner.clip

    def encode(texts: list[str]) -> torch.Tensor:
        return F.normalize(clip.encode_text(learner.tokenize(texts)).float(), dim=-1)

    f_main = encode(main)
    return torch.cat([F.normalize(f_main + fuse_weight * encode(texts), dim=-1) for texts in noisy])


def cluster_noise(features: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """K noise prompts ``[K, D]``: k-means++ centres of `features` (scipy, seeded), normalised.

    Raises:
        UserError: fewer distinct features than K (the centres would repeat).
    """
    data = features.detach().cpu().double().numpy()
    distinct = len(np.unique(data, axis=0))
    if distinct < k:
        raise UserError(f"anprompt: clusters={k} needs at least {k} distinct noise features, got {distinct} "
                        "(lower clusters or raise noise_draws)")
    centres, _ = kmeans2(data, k, minit="++", seed=np.random.default_rng(seed))
    return F.normalize(torch.from_numpy(centres).float(), dim=-1)


def wa_loss(noisy_logits: torch.Tensor, clean_logits: torch.Tensor, detach_std: bool = True) -> torch.Tensor:
    """WALoss: per image KL(softmax(l_noise) ‖ softmax(l_clean)) / (std(l_clean) + 1e-6), batch mean.

    The std runs over the classes of each image (ddof 0): a wide logit spread (a confident
    prediction) tolerates more divergence. Detached by default, so it weights rather than
    rewards spreading the clean logits.
    """
    log_p = F.log_softmax(noisy_logits.float(), dim=-1)
    kl = (log_p.exp() * (log_p - F.log_softmax(clean_logits.float(), dim=-1))).sum(-1)
    std = clean_logits.float().std(dim=-1, unbiased=False)
    return (kl / ((std.detach() if detach_std else std) + 1e-6)).mean()


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean of 1 − cos between the rows of two normalised feature matrices."""
    return (1 - (a * b).sum(-1)).mean()


class ANPrompt(PromptSRC):
    """ANPrompt's losses (options in `ANPromptOptions`) on a learner built from per-layer prompts
    (IVLP, MaPLe, or a plug-in with the `layer_prompts` capability), which it gives anti-noise
    prompts.

    A plain learner becomes the anti-noise counterpart its capabilities name (``ivlp`` becomes
    ``anprompt-ivlp``, in place, see `learners.anprompt.add_anti_noise`); an anprompt learner
    (``--init``) keeps its own settings.
    """

    name = "anprompt"
    Options = ANPromptOptions
    requires = ("layer_prompts",)
    lr = 0.0035  # MaPLe/IVLP's reference rate, for every learner this method fits
    learner_defaults = {}  # the learners' own defaults, not PromptSRC's 4 + 4 tokens

    def __init__(self, learner: PromptLearner, classnames: list[str], **options: Any):
        super().__init__(learner, classnames, **options)
        c = self.config
        noise_prompts, noise_template, noise_rate, noise_draws = (c.noise_prompts, c.noise_template, c.noise_rate,
                                                                  c.noise_draws)
        ops = tuple(o.strip() for o in c.noise_ops.split(","))
        if not ops or any(op not in OPS for op in ops):
            raise UserError(f"anprompt: noise_ops must name ops among {', '.join(OPS)}, got {c.noise_ops!r}")
        if noise_draws < 1:
            raise UserError(f"anprompt: noise_draws must be at least 1, got {noise_draws}")
        self.options["noise_ops"] = ",".join(ops)
        nrvpp, nrvpp_tokens, waloss, waloss_detach_std = c.nrvpp, c.nrvpp_tokens, c.waloss, c.waloss_detach_std
        self.weights.update(nrvpp=c.nrvpp_weight, waloss=c.waloss_weight)
        self.nrvpp, self.nrvpp_tokens = nrvpp, nrvpp_tokens
        self.waloss, self.waloss_detach_std = waloss, waloss_detach_std
        settings = self._anti_noise_settings(noise_prompts, clusters=c.clusters, anti_tokens=c.anti_tokens,
                                             anti_layers=c.anti_layers)
        self.options.update(settings)
        if noise_prompts:
            seed = torch.initial_seed() if c.cluster_seed is None else c.cluster_seed
            self.options["cluster_seed"] = seed
            main, noisy = noise_sentences(noise_template, self.classnames, ops, noise_rate, noise_draws)
            features = fused_noise_features(self.learner, main, noisy, c.fuse_weight)
            self.learner.anti_noise.noise.copy_(cluster_noise(features, settings["clusters"], seed))
        self.noisy_texts = noise_sentences(c.template, self.classnames, ops, noise_rate, noise_draws)[1]
        self._draws = 0
        if nrvpp:
            self._check_prototype_tokens()

    def _anti_noise_settings(self, noise_prompts: bool, **given: int | None) -> dict[str, Any]:
        """Give a plain learner its anti-noise prompts (or not); return the settings in force."""
        learner = self.learner
        if isinstance(learner, AntiNoiseLearner):
            if not noise_prompts:
                raise UserError(f"anprompt: noise_prompts=false but learner '{learner.name}' carries anti-noise "
                                "prompts; train the plain ivlp/maple learner for this ablation")
            clash = {k: v for k, v in given.items() if v is not None and v != learner.options[k]}
            if clash:
                raise UserError(f"anprompt: options {clash} differ from the learner's own "
                                f"{ {k: learner.options[k] for k in clash} }")
            return {k: learner.options[k] for k in ANTI_NOISE_DEFAULTS}
        if not noise_prompts:
            return {k: None for k in ANTI_NOISE_DEFAULTS}
        if learner.capabilities.anti_noise is None:
            raise UserError(f"method 'anprompt' cannot give learner '{learner.name}' anti-noise prompts: it lacks the "
                            "capability 'anti_noise' (Capabilities.anti_noise names no counterpart); pass "
                            "--method-opt noise_prompts=false")
        settings = {k: ANTI_NOISE_DEFAULTS[k] if given[k] is None else given[k] for k in ANTI_NOISE_DEFAULTS}
        add_anti_noise(learner, **settings)
        return settings

    def _check_prototype_tokens(self) -> None:
        """Fail now, not at the first step, when NRVPP would average no token."""
        prompts = self.learner.vision_layer_prompts()
        deep = prompts[0].shape[0] if prompts and prompts[0] is not None else 0
        anti = isinstance(self.learner, AntiNoiseLearner)
        if not {"all": deep or anti, "deep": deep, "anti": anti}[self.nrvpp_tokens]:
            raise UserError(f"anprompt: learner '{self.learner.name}' has no '{self.nrvpp_tokens}' vision prompt "
                            "tokens for the NRVPP prototype; pass --method-opt nrvpp=false or give it vision prompts")

    def loss_terms(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Each weighted term of the loss, by name, and the clean logits."""
        if self.nrvpp:
            feats, prototype = encode_images_with_prototype(self.learner, images, self.nrvpp_tokens)
        else:
            feats, prototype = self.learner.encode_images(images), None
        logits, text = self.logits(feats)
        scale = self.learner.logit_scale
        terms = {"ce": F.cross_entropy(logits, labels)}
        if prototype is not None:
            terms["nrvpp"] = F.cross_entropy(scale * prototype @ text.T, labels) * self.weights["nrvpp"]
        if self.waloss:
            noisy = self.learner.encode_texts(self.noisy_texts[self._draws % len(self.noisy_texts)])
            self._draws += 1
            terms["waloss"] = wa_loss(scale * feats @ noisy.T, logits, self.waloss_detach_std) * self.weights["waloss"]
        if self.weights["text"]:
            terms["sim_text"] = cosine_distance(text, self.frozen_text) * self.weights["text"]
        if self.weights["image"] or self.weights["kl"]:
            with torch.no_grad():
                frozen_image = F.normalize(self.learner.clip.encode_image(images), dim=-1)
            if self.weights["image"]:
                terms["sim_image"] = cosine_distance(feats, frozen_image) * self.weights["image"]
            if self.weights["kl"]:
                zero_shot = scale * frozen_image @ self.frozen_text.T
                kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(zero_shot, 1), reduction="sum", log_target=True)
                terms["kl"] = kl / logits.numel() * self.weights["kl"]
        return terms, logits

    def get_extra_state(self) -> dict[str, Any]:
        """PromptSRC's aggregate and the noisy-sentence draw counter, for a resumed run."""
        return {**super().get_extra_state(), "draws": self._draws}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self._draws = state["draws"]

    def loss(self, images, labels, image_features=None):
        terms, logits = self.loss_terms(images, labels)
        diagnostics = {name: value.item() for name, value in terms.items()}
        diagnostics["acc"] = (logits.argmax(1) == labels).float().mean().item() * 100
        return sum(terms.values()), diagnostics

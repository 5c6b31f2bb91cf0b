"""Promise (ICLR 2026): bi-level meta-finetuning over prompt templates.

Templates are tasks. Each step draws disjoint template sets P_in and P_out; an inner loop of K
first-order steps adapts the prompts on P_in (template weights w = softmax(s / τ), one learned
rate per prompt token from a small network H); the outer loss is the cross-entropy on P_out at
the adapted prompts. Everything happens inside `loss()`, which returns a *surrogate* scalar:
its value is L_out and its gradient is the meta-gradient, so the shared loop's SGD step with
rate β is the meta-update:

- prompts θ: ∇_θ' L_out (FOMAML) or (θ − θ'_K) / (K · inner_lr) (Reptile, ε = β / (K · inner_lr)),
  plus `anchor` times ∇_θ Σ_i w_i L_i at θ itself (the first inner step's gradient, so free): our
  addition, which keeps θ usable as it is, the way the evaluator scores it (docs/methods-promise.md);
- scores s and the rate network H: the exact gradient of L_out through the linear dependence of
  θ'_K = θ − Σ_k α ⊙ Σ_i w_i g_i^(k) on w and α, the g_i^(k) held constant (methods spec).

Cost per step: K + 1 batched text forwards with one backward each. The per-template dot
products ⟨α ⊙ ∇L_out, g_i^(k)⟩ that the weight gradient needs cost no further text pass: each
template's text gradient is already in that backward, as the gradient of the per-row copies of
the prompt tokens (rows of template i sum to its gradient), and its image-side part is
⟨∂L_i/∂V, J_V (α ⊙ ∇L_out)⟩, where J_V is one forward-mode jvp of the image tower on the batch.
See docs/methods-promise.md for what follows the paper and what is our reading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from ..errors import UserError
from ..learners.base import PromptLearner
from ..options import option
from ..perturb import fill_template
from ..templates import load_templates
from .method import TrainingMethod
from .promise_parts import TokenRate, draw_split, forward_ad_ready

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PromiseOptions:
    """Options of `promise`; each part has a switch, for the paper's ablations (see `Promise`)."""

    templates: str = option("promptsrc60", "Template set the template tasks are drawn from.")
    templates_in: int = option(30, "Size of P_in, the templates of the inner loop, drawn each step.")
    templates_out: int = option(30, "Size of P_out, the disjoint templates of the outer loss.")
    inner_steps: int = option(3, "K, inner iterations per step.")
    inner_lr: float = option(0.01, "Base inner rate alpha_0 (also of non-token parameters).")
    weighting: bool = option(True, "Learn template scores s, w = softmax(s / tau) over P_in; off: uniform weights.")
    tau: float = option(1.0, "Temperature tau of the template-weight softmax.")
    entropy_reg: float = option(0.1, "lambda: the scores minimise L_out - lambda * H(w); 0.1 keeps the weights from "
                                "collapsing onto one template (chosen on validation wordings, docs/methods-promise.md).")
    token_lr: bool = option(True, "Learned inner rates from the rate network H; off: every parameter uses alpha_0.")
    rate_hidden: int = option(32, "Hidden width of the rate network H.")
    meta_update: Literal["fomaml", "reptile"] = option("fomaml", "The meta-update of the prompts.")
    anchor: float = option(1.0, "Weight of the loss at theta itself in theta's meta-gradient (0: the paper's).")
    score_lr_scale: float | None = option(None, "Rate of the scores as a multiple of the shared rate; none: "
                                          "templates_in / inner_lr.")
    rate_lr_scale: float | None = option(None, "Rate of H as a multiple of the shared rate; none: 1 / inner_lr.")
    track_improvement: bool = option(True, "Also log the share of inner updates that lowered L_out "
                                     "(K extra forwards).")
    rate_input: Literal["tokens", "template_features"] = option(
        "template_features", "What H reads: each learned prompt token (a rate per token), or each P_in template's "
        "text-encoder features (a rate per template, scaling its gradient).")


@dataclass
class TemplatePass:
    """Per-template losses on one template set, with the handles a weight hypergradient needs.

    Attributes:
        losses: Cross-entropy per template ``[T]``.
        acc: Batch accuracy over all templates, in percent.
        rows: Per text-side parameter, its copy per text row ``[T*C, n, W]`` (when captured).
        feats: Image features copied per template ``[T, B, D]`` (when captured and learned).
    """

    losses: torch.Tensor
    acc: float
    rows: Params = field(default_factory=dict)
    feats: torch.Tensor | None = None


@dataclass
class InnerStep:
    """What one inner step leaves for the hypergradients (all detached).

    Attributes:
        point: θ' where the gradients were taken.
        grad: Σ_i w_i g_i per parameter.
        rows: Per text-side parameter, w_i times template i's gradient, per text row.
        feats: w_i ∂L_i/∂V per template ``[T, B, D]``, when the image side is learned.
    """

    point: Params
    grad: Params
    rows: Params
    feats: torch.Tensor | None


class Promise(TrainingMethod):
    """Bi-level meta-finetuning over templates on an unconditional learner with declared prompt
    tokens (CoOp, IVLP, MaPLe or a plug-in with those capabilities).

    Options (each part has a switch, for the paper's ablations):
        templates: Template set drawn from (60 PromptSRC templates).
        templates_in, templates_out: Sizes of the disjoint P_in / P_out drawn each step (30 / 30).
        inner_steps: K, inner iterations per step (3).
        inner_lr: Base inner rate α₀ (also the rate of non-token parameters, MaPLe's projections).
        weighting: Learn template scores s, w = softmax(s / τ) over P_in; off: uniform weights.
        tau: Temperature τ of the softmax.
        entropy_reg: λ; the scores minimise L_out − λ·H(w) (λ > 0 keeps the weights spread; default 0.1,
            the smallest of 0, 0.01, 0.1, 1 that kept the weight entropy above half its maximum on
            validation wordings and images, examples/selection/promise_entropy.py).
        token_lr: Learned inner rates from the rate network H; off: every parameter uses α₀.
        rate_input: What H reads. ``"tokens"``: each learned prompt token e_k, one rate per token
            (α_k = H(e_k), our first reading); ``"template_features"``: each P_in template's
            text-encoder features at θ (mean over classes), one rate per template that scales
            that template's gradient, α_i = H(f_i), as the paper describes H's input
            (docs/methods-promise.md). Costs one text forward of P_in without backward.
        rate_hidden: Hidden width of H.
        meta_update: "fomaml" or "reptile".
        anchor: Weight of the loss at θ itself (Σ_i w_i L_i on P_in, before adaptation) in θ's
            meta-gradient. 0 is the paper's plain first-order update, which on the toy world
            turned θ into a starting point that only works after adaptation; 1 (default) keeps θ
            good as it is. Costs nothing: it is the first inner step's gradient.
        score_lr_scale, rate_lr_scale: Rate of s and of H as multiples of the shared rate β.
            Their exact hypergradients are small by construction (∂L/∂s_i carries w_i · α₀,
            ∂L/∂H carries softplus' ≈ α₀), so the defaults, templates_in / inner_lr and
            1 / inner_lr, bring both to the scale of the prompts' own gradient.
        track_improvement: Also evaluate L_out before each inner update (K forwards without
            backward) to log the share of inner updates that lowered it.
    """

    name = "promise"
    Options = PromiseOptions
    requires = ("text_tokens", "unconditional")
    template_options = ("templates",)
    optimizer = "sgd"  # the meta-update is the loop's SGD step on the surrogate's gradient

    def __init__(self, learner: PromptLearner, classnames: list[str], **options: Any):
        super().__init__(learner, classnames, **options)
        cfg = self.config
        templates_in, inner_lr = cfg.templates_in, cfg.inner_lr
        self.templates = load_templates(cfg.templates).templates
        _check_options(len(self.templates), templates_in, cfg.templates_out, cfg.inner_steps, inner_lr, cfg.tau, cfg.anchor)
        self.n_in, self.n_out, self.inner_steps, self.inner_lr = templates_in, cfg.templates_out, cfg.inner_steps, inner_lr
        self.tau, self.entropy_reg, self.meta_update, self.anchor = cfg.tau, cfg.entropy_reg, cfg.meta_update, cfg.anchor
        self.score_lr_scale = templates_in / inner_lr if cfg.score_lr_scale is None else cfg.score_lr_scale
        self.rate_lr_scale = 1 / inner_lr if cfg.rate_lr_scale is None else cfg.rate_lr_scale
        self.track_improvement = cfg.track_improvement
        self.texts = [[fill_template(t, c)[0] for c in self.classnames] for t in self.templates]
        self.scores = nn.Parameter(torch.zeros(len(self.templates))) if cfg.weighting else None
        self.token_names = frozenset(learner.token_parameters())
        self.template_rates = cfg.token_lr and cfg.rate_input == "template_features"
        self.text_names = self._text_side_names()
        if self.template_rates:
            with torch.no_grad():
                width = self.learner.encode_texts([self.texts[0][0]]).shape[-1]
            self.rates = nn.ModuleDict({"template": TokenRate(width, inner_lr, cfg.rate_hidden)})
        else:
            widths = sorted({p.shape[-1] for n, p in self.learned().items() if n in self.token_names})
            self.rates = (nn.ModuleDict({str(w): TokenRate(w, inner_lr, cfg.rate_hidden) for w in widths})
                          if cfg.token_lr else None)
        self.last_split: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- running the learner at other parameter values ------------------------------------
    def learned(self) -> Params:
        """The learner's trainable tensors θ by name (the prompts the meta-update moves)."""
        return {n: p for n, p in self.learner.named_parameters() if p.requires_grad}

    def forward(self, kind: str, inputs: Any) -> torch.Tensor:
        """The learner's text or image encoder; an entry point for `functional_call`, which runs
        it at parameter values θ' other than the learner's own."""
        return self.learner.encode_texts(inputs) if kind == "texts" else self.learner.encode_images(inputs)

    def _call(self, params: Params, kind: str, inputs: Any) -> torch.Tensor:
        return functional_call(self, {f"learner.{n}": t for n, t in params.items()}, (kind, inputs))

    @torch.enable_grad()
    def _text_side_names(self) -> frozenset[str]:
        """The learner's declared text-side prompt tokens, checked by a one-text probe: every
        parameter the text encoder reads must be one (the template weights' hypergradient takes
        each template's gradient through per-text copies of exactly these).

        Raises:
            UserError: the text encoder reads a parameter not declared in ``text_tokens``.
        """
        params = self.learned()
        feats = self.learner.encode_texts([self.texts[0][0]])
        grads = torch.autograd.grad(feats.sum(), list(params.values()), allow_unused=True)
        read = {n for n, g in zip(params, grads) if g is not None}
        declared = set(self.learner.token_parameters("text"))
        if read - declared:
            raise UserError(f"method 'promise' cannot train learner '{self.learner.name}': its text encoder reads "
                            f"{', '.join(sorted(read - declared))}, which its capabilities do not declare as "
                            "text-side prompt tokens (Capabilities.text_tokens)")
        return frozenset(read)

    def template_pass(self, params: Params, split: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                      image_features: torch.Tensor | None, capture: bool = False) -> TemplatePass:
        """Cross-entropy per template of `split` at `params`: one batched text forward.

        With `capture`, the text-side parameters enter as one copy per text row and the image
        features as one copy per template, so a single backward also yields every template's own
        gradient (the gradients of those copies).
        """
        n_templates, n_classes = len(split), len(self.classnames)
        texts = [text for t in split.tolist() for text in self.texts[t]]
        rows = {n: params[n].unsqueeze(0).expand(len(texts), *params[n].shape) for n in self.text_names} if capture else {}
        text = self._call({**params, **rows}, "texts", texts).view(n_templates, n_classes, -1)
        image = image_features if image_features is not None else self._call(params, "images", images)
        per_template = image.unsqueeze(0).expand(n_templates, *image.shape)
        logits = self.learner.logit_scale * torch.einsum("tbd,tcd->tbc", per_template, text)
        losses = F.cross_entropy(logits.transpose(1, 2), labels.expand(n_templates, -1), reduction="none").mean(1)
        acc = (logits.argmax(-1) == labels).float().mean().item() * 100
        feats = per_template if capture and per_template.requires_grad else None
        return TemplatePass(losses, acc, rows, feats)

    # --- the meta-step --------------------------------------------------------------------
    def token_rates(self, params: Params) -> dict[str, torch.Tensor | float]:
        """α per parameter: ``[n, 1]`` from H for prompt tokens (on the detached tokens: the
        first-order reading keeps θ's gradient free of H), else the base rate."""
        if self.rates is None or self.template_rates:  # per-template rates scale the gradients instead
            return {n: self.inner_lr for n in params}
        return {n: self.rates[str(p.shape[-1])](p.detach()) if n in self.token_names else self.inner_lr
                for n, p in params.items()}

    def template_rate(self, theta: Params, p_in: torch.Tensor) -> torch.Tensor:
        """α_i = H(f_i) ``[n_in]`` per template of P_in, f_i its text features at θ (mean over classes,
        detached: as for token rates, θ's first-order gradient carries no term through H)."""
        texts = [text for t in p_in.tolist() for text in self.texts[t]]
        with torch.no_grad():
            feats = self._call({n: t.detach() for n, t in theta.items()}, "texts", texts)
        return self.rates["template"](feats.view(len(p_in), len(self.classnames), -1).mean(1)).squeeze(-1)

    def inner_step(self, point: Params, split: torch.Tensor, weights: torch.Tensor, images: torch.Tensor,
                   labels: torch.Tensor, image_features: torch.Tensor | None) -> tuple[InnerStep, torch.Tensor]:
        """Σ_i w_i g_i at `point` from ONE backward of Σ_i w_i L_i, plus the per-template pieces."""
        leaf = {n: t.detach().requires_grad_() for n, t in point.items()}
        capture = self.scores is not None or self.template_rates
        tp = self.template_pass(leaf, split, images, labels, image_features, capture=capture)
        extra = [*tp.rows.values(), *([tp.feats] if tp.feats is not None else [])]
        grads = torch.autograd.grad((weights * tp.losses).sum(), [*leaf.values(), *extra], materialize_grads=True)
        grad = dict(zip(leaf, grads[:len(leaf)]))
        rows = dict(zip(tp.rows, grads[len(leaf):len(leaf) + len(tp.rows)]))
        feats = grads[-1] if tp.feats is not None else None
        return InnerStep({n: t.detach() for n, t in point.items()}, grad, rows, feats), tp.losses.detach()

    def image_tangent(self, point: Params, direction: Params, images: torch.Tensor) -> torch.Tensor:
        """J_V · direction: how the batch's image features move along `direction` at `point`."""
        with forward_ad_ready():
            return jvp(lambda params: self._call(params, "images", images), (point,), (direction,))[1]

    def weight_hypergradient(self, steps: list[InnerStep], rates: dict[str, torch.Tensor | float], v: Params,
                             images: torch.Tensor) -> torch.Tensor:
        """c_i = w_i ∂L_out/∂w_i = −Σ_k ⟨α ⊙ v, w_i g_i^(k)⟩ for the templates of P_in."""
        direction = {n: _value(rates[n]) * v[n] for n in v}
        c = torch.zeros(self.n_in, dtype=next(iter(v.values())).dtype, device=self.learner.device)
        for step in steps:
            for n, per_row in step.rows.items():
                c -= (per_row * direction[n]).flatten(1).sum(1).view(self.n_in, -1).sum(1)
            if step.feats is not None:
                c -= (step.feats * self.image_tangent(step.point, direction, images)).sum((1, 2))
        return c

    def meta_step(self, images: torch.Tensor, labels: torch.Tensor, image_features: torch.Tensor | None,
                  split: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """One Promise step on a batch for a given (P_in, P_out); see `loss`."""
        p_in, p_out = split
        theta = self.learned()
        rates = self.token_rates(theta)
        dtype = next(iter(theta.values())).dtype
        if self.scores is not None:
            log_w = F.log_softmax(self.scores[p_in.to(self.scores.device)] / self.tau, 0)
        else:
            log_w = torch.full((self.n_in,), -math.log(self.n_in), dtype=dtype, device=self.learner.device)
        weights = log_w.exp()
        coef, alpha = weights.detach(), None
        if self.template_rates:  # template i's gradient enters with w_i α_i / α₀, the step is α₀
            alpha = self.template_rate(theta, p_in)
            coef = coef * alpha.detach() / self.inner_lr

        point, path, steps, inner_loss = {n: t.detach() for n, t in theta.items()}, [], [], 0.0
        for k in range(self.inner_steps):
            step, losses = self.inner_step(point, p_in, coef, images, labels, image_features)
            if k == 0:
                inner_loss = float((weights.detach() * losses).sum())
            path.append(point)
            steps.append(step)
            point = {n: point[n] - _value(rates[n]) * step.grad[n] for n in point}

        leaf = {n: t.detach().requires_grad_() for n, t in point.items()}
        out = self.template_pass(leaf, p_out, images, labels, image_features)
        l_out = out.losses.mean()
        v = dict(zip(leaf, torch.autograd.grad(l_out, list(leaf.values()), materialize_grads=True)))

        if self.meta_update == "fomaml":
            terms = sum((theta[n] * v[n]).sum() for n in theta)
        else:
            scale = self.inner_steps * self.inner_lr
            terms = sum((theta[n] * (theta[n].detach() - point[n]) / scale).sum() for n in theta)
        if self.anchor:
            terms = terms + self.anchor * sum((theta[n] * steps[0].grad[n]).sum() for n in theta)
        diagnostics = {"outer_loss": l_out.item(), "outer_acc": out.acc, "inner_loss": inner_loss}
        # c_i = a_i ∂L_out/∂a_i for the coefficient a_i = w_i α_i of template i's gradient (α_i = α₀ without
        # template rates): it is w_i ∂L_out/∂w_i, and α_i ∂L_out/∂α_i
        c = self.weight_hypergradient(steps, rates, v, images) if self.scores is not None or alpha is not None else None
        if alpha is not None:
            terms = terms + self.rate_lr_scale * (alpha.log() * c).sum()
            diagnostics.update(_rate_range({"template": alpha}))
        elif self.rates is not None:
            terms = terms + self.rate_lr_scale * self._rate_term(rates, v, steps)
            diagnostics.update(_rate_range(rates))
        if self.scores is not None:
            entropy = -(weights * log_w).sum()
            terms = terms + self.score_lr_scale * ((log_w * c).sum() - self.entropy_reg * entropy)
            diagnostics.update(self._weight_summary(entropy))
        if self.track_improvement:
            diagnostics["improve_share"] = self._improve_share(path, l_out.item(), p_out, images, labels, image_features)
        return l_out.detach() + (terms - terms.detach()), diagnostics

    def loss(self, images, labels, image_features=None):
        """Draw disjoint P_in / P_out, run the meta-step; the returned scalar's value is L_out and
        its gradient the meta-gradient of θ, s and H (see the module docstring), plus the
        learner's own term at θ (`PromptLearner.extra_loss`; none for most learners)."""
        self.last_split = draw_split(len(self.templates), self.n_in, self.n_out)
        loss, diagnostics = self.meta_step(images, labels, image_features, self.last_split)
        # The learner's own term (MMRL's regularisation) at θ itself, on P_out's first template.
        return self.plus_learner_loss(loss, diagnostics, images, labels, self.texts[int(self.last_split[1][0])])

    # --- pieces of the surrogate and of the log ------------------------------------------
    def _rate_term(self, rates: dict[str, torch.Tensor | float], v: Params, steps: list[InnerStep]) -> torch.Tensor:
        """Σ_tokens α_k · ∂L_out/∂α_k, with ∂L_out/∂α_k = −Σ_steps ⟨v_k, (Σ_i w_i g_i)_k⟩ held constant."""
        total = 0.0
        for n, rate in rates.items():
            if isinstance(rate, torch.Tensor):
                grad = -sum((v[n] * step.grad[n]).sum(-1, keepdim=True) for step in steps)
                total = total + (rate * grad).sum()
        return total

    def _weight_summary(self, entropy: torch.Tensor) -> dict[str, float]:
        """Entropy of w over P_in and the three templates with the highest score over all."""
        top = torch.softmax(self.scores.detach() / self.tau, 0).topk(3)
        summary = {"w_entropy": entropy.item(), "w_entropy_max": math.log(self.n_in)}
        for rank, (weight, index) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
            summary[f"top{rank}_template"] = float(index)
            summary[f"top{rank}_weight"] = weight
        return summary

    @torch.no_grad()
    def summary(self) -> dict[str, Any]:
        """The final template weights: their entropy over the whole set and over P_in-sized draws
        (mean of 200 seeded draws), each with its maximum, and the five heaviest templates."""
        if self.scores is None:
            return {"weighting": False}
        scores = self.scores.detach().double().cpu() / self.tau
        weights = torch.softmax(scores, 0)
        generator = torch.Generator().manual_seed(0)
        draws = [torch.randperm(len(scores), generator=generator)[:self.n_in] for _ in range(200)]
        p_in = [torch.softmax(scores[d], 0) for d in draws]
        top = weights.topk(min(5, len(weights)))
        return {"weighting": True,
                "w_entropy_all": float(-(weights * weights.log()).sum()), "w_entropy_all_max": math.log(len(weights)),
                "w_entropy_p_in": float(torch.stack([-(w * w.log()).sum() for w in p_in]).mean()),
                "w_entropy_p_in_max": math.log(self.n_in),
                "top_templates": [{"template": self.templates[i], "weight": w}
                                  for w, i in zip(top.values.tolist(), top.indices.tolist())]}

    @torch.no_grad()
    def _improve_share(self, path: list[Params], final: float, p_out: torch.Tensor, images: torch.Tensor,
                       labels: torch.Tensor, image_features: torch.Tensor | None) -> float:
        """Share of the K inner updates after which L_out on P_out was lower than before."""
        before = [self.template_pass(p, p_out, images, labels, image_features).losses.mean().item() for p in path]
        after = before[1:] + [final]
        return sum(a < b for a, b in zip(after, before)) / len(before)


def _value(rate: torch.Tensor | float) -> torch.Tensor | float:
    return rate.detach() if isinstance(rate, torch.Tensor) else rate


def _rate_range(rates: dict[str, torch.Tensor | float]) -> dict[str, float]:
    token = torch.cat([r.detach().flatten() for r in rates.values() if isinstance(r, torch.Tensor)])
    return {"alpha_min": token.min().item(), "alpha_max": token.max().item(), "alpha_mean": token.mean().item()}


def _check_options(n_templates: int, n_in: int, n_out: int, inner_steps: int, inner_lr: float, tau: float,
                   anchor: float) -> None:
    if n_in < 1 or n_out < 1 or n_in + n_out > n_templates:
        raise UserError(f"promise: templates_in ({n_in}) and templates_out ({n_out}) must be at least 1 and "
                        f"together at most the {n_templates} templates of the set")
    if inner_steps < 1:
        raise UserError(f"promise: inner_steps must be at least 1, got {inner_steps}")
    if inner_lr <= 0 or tau <= 0:
        raise UserError(f"promise: inner_lr and tau must be positive, got {inner_lr} and {tau}")
    if anchor < 0:
        raise UserError(f"promise: anchor must be at least 0, got {anchor}")

"""Promise's mathematics on the tiny model: hypergradients against finite differences (float64),
the plain FOMAML step by hand, disjoint template sets, switches and a short training run."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import COLOURS, TINY_CONFIG, write_train_test_folders

from promptbench_vlm.backbone import load_backbone
from promptbench_vlm.errors import UserError
from promptbench_vlm.learners import build_learner
from promptbench_vlm.train.loop import TrainConfig
from promptbench_vlm.train.method import build_method
from promptbench_vlm.train.promise import Promise
from promptbench_vlm.train.promise_parts import draw_split
from promptbench_vlm.train.run import TrainRequest, run_training

CLASSES = list(COLOURS)
SPLIT = (torch.tensor([5, 17, 33, 48]), torch.tensor([2, 29, 51]))


def float64_method(learner: str, **options) -> Promise:
    """A Promise on a fresh tiny backbone in float64 (the shared fixture must stay float32)."""
    torch.manual_seed(0)
    backbone = load_backbone(str(TINY_CONFIG), device="cpu")
    method = Promise(build_learner(learner, backbone), CLASSES, templates_in=4, templates_out=3,
                     score_lr_scale=1.0, rate_lr_scale=1.0, track_improvement=False, **options)
    return method.double()


def batch(dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32, dtype=dtype), torch.tensor([0, 1, 2, 3])


@contextmanager
def learner_at(method: Promise, values: dict[str, torch.Tensor]):
    """Temporarily put `values` into the learner's parameters (the hand-made reference path)."""
    params = method.learned()
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(values[n])
    try:
        yield params
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


def hand_losses(method: Promise, templates: torch.Tensor, images, labels) -> list[torch.Tensor]:
    """Per-template cross-entropy through the learner's own encoders, one template at a time."""
    learner = method.learner
    image = learner.encode_images(images)
    return [F.cross_entropy(learner.logit_scale * image @ learner.encode_texts(method.texts[t]).T, labels)
            for t in templates.tolist()]


def objective(method: Promise, images, labels) -> float:
    """The meta-objective the scores and H minimise: L_out − λ·H(w)."""
    _, diagnostics = method.meta_step(images, labels, None, SPLIT)
    log_w = F.log_softmax(method.scores.detach()[SPLIT[0]] / method.tau, 0)
    return diagnostics["outer_loss"] + method.entropy_reg * float((log_w.exp() * log_w).sum())


def perturb_rates(method: Promise, std: float = 0.3) -> None:
    """Move H and s off their initialisation so rates and weights differ across tokens and templates."""
    torch.manual_seed(2)
    with torch.no_grad():
        for p in method.rates.parameters():
            p.add_(torch.randn_like(p) * std * p.abs().mean().clamp(min=0.1))
        method.scores.normal_(std=1.0)


def meta_grads(method: Promise, images, labels) -> tuple[dict[str, torch.Tensor], float, dict[str, float]]:
    """The gradients the surrogate hands the optimiser, its value and the step's diagnostics."""
    method.zero_grad(set_to_none=True)
    loss, diagnostics = method.meta_step(images, labels, None, SPLIT)
    loss.backward()
    return {n: p.grad.clone() for n, p in method.named_parameters() if p.requires_grad}, loss.item(), diagnostics


def directional_fd(method: Promise, names: list[str], images, labels, eps: float = 1e-5
                   ) -> tuple[dict[str, torch.Tensor], float]:
    """A random direction over the named method parameters and the central difference along it."""
    params = dict(method.named_parameters())
    torch.manual_seed(3)
    direction = {n: torch.randn_like(params[n]) for n in names}
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for n in names:
                params[n].add_(sign * eps * direction[n])
        values.append(objective(method, images, labels))
        with torch.no_grad():
            for n in names:
                params[n].sub_(sign * eps * direction[n])
    return direction, (values[0] - values[1]) / (2 * eps)


def assert_directional(grads, direction, fd):
    analytic = sum(float((grads[n] * d).sum()) for n, d in direction.items())
    assert abs(analytic - fd) <= 1e-2 * abs(fd), (analytic, fd)


@pytest.mark.parametrize("rate_input", ["tokens", "template_features"])
@pytest.mark.parametrize("learner", ["maple", "coop"])
def test_hypergradients_match_finite_differences_one_inner_step(learner, rate_input):
    """With K = 1 the first-order hypergradient is the exact derivative of L_out: FD must agree,
    for rates per token and for rates per template from its text features."""
    method = float64_method(learner, inner_steps=1, inner_lr=0.5, entropy_reg=0.05, rate_input=rate_input)
    perturb_rates(method)
    images, labels = batch()
    grads, _, _ = meta_grads(method, images, labels)
    for names in (["scores"], [n for n, _ in method.named_parameters() if n.startswith("rates.")]):
        direction, fd = directional_fd(method, names, images, labels)
        assert_directional(grads, direction, fd)


def test_hypergradients_are_exact_for_the_linearised_inner_loop_over_three_steps():
    """K = 3: the hypergradients equal the derivative of L_out(θ − Σ_k α ⊙ Σ_i w_i g_i^(k)) with the
    per-template gradients g_i^(k) frozen (taken one template at a time, by hand)."""
    method = float64_method("maple", inner_steps=3, inner_lr=0.3, entropy_reg=0.05, rate_input="tokens")
    perturb_rates(method)
    images, labels = batch()
    grads, _, _ = meta_grads(method, images, labels)
    theta = {n: p.detach().clone() for n, p in method.learned().items()}
    per_template, point = [], dict(theta)
    with torch.no_grad():
        weights = torch.softmax(method.scores[SPLIT[0]] / method.tau, 0)
        rates = {n: (r.detach() if isinstance(r, torch.Tensor) else r) for n, r in method.token_rates(theta).items()}
    for _ in range(3):
        with learner_at(method, point) as params:
            g = [torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True,
                                     materialize_grads=True)
                 for loss in hand_losses(method, SPLIT[0], images, labels)]
        per_template.append([dict(zip(params, gi)) for gi in g])
        point = {n: point[n] - rates[n] * sum(w * gi[n] for w, gi in zip(weights, per_template[-1])) for n in point}

    def linearised(scores: torch.Tensor, rates_now: dict) -> torch.Tensor:
        w = torch.softmax(scores[SPLIT[0]] / method.tau, 0)
        final = {n: theta[n] - sum(rates_now[n] * sum(wi * gi[n] for wi, gi in zip(w, step)) for step in per_template)
                 for n in theta}
        with learner_at(method, final), torch.no_grad():
            l_out = torch.stack(hand_losses(method, SPLIT[1], images, labels)).mean()
        return l_out + method.entropy_reg * (w * w.log()).sum()

    torch.manual_seed(4)
    d_s = torch.randn_like(method.scores)
    eps = 1e-5
    with torch.no_grad():
        s = method.scores.detach()
        fd = (linearised(s + eps * d_s, rates) - linearised(s - eps * d_s, rates)) / (2 * eps)
    assert_directional(grads, {"scores": d_s}, float(fd))

    rate_names = [n for n, _ in method.named_parameters() if n.startswith("rates.")]
    d_h = {n: torch.randn_like(dict(method.named_parameters())[n]) for n in rate_names}
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for n, p in method.named_parameters():
                if n in d_h:
                    p.add_(sign * eps * d_h[n])
            shifted = {n: (r if isinstance(r, float) else r.detach()) for n, r in method.token_rates(theta).items()}
            values.append(linearised(s, shifted))
            for n, p in method.named_parameters():
                if n in d_h:
                    p.sub_(sign * eps * d_h[n])
    assert_directional(grads, d_h, float((values[0] - values[1]) / (2 * eps)))


def test_without_weighting_and_token_rates_one_step_is_plain_fomaml():
    method = float64_method("maple", inner_steps=2, inner_lr=0.2, weighting=False, token_lr=False, anchor=0.0)
    assert method.scores is None and method.rates is None
    assert {id(p) for p in method.trainable_parameters()} == {id(p) for p in method.learned().values()}
    images, labels = batch()
    theta = {n: p.detach().clone() for n, p in method.learned().items()}
    point = dict(theta)
    for _ in range(2):
        with learner_at(method, point) as params:
            loss = torch.stack(hand_losses(method, SPLIT[0], images, labels)).mean()
            g = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        point = {n: point[n] - 0.2 * g[n] for n in point}
    with learner_at(method, point) as params:
        l_out = torch.stack(hand_losses(method, SPLIT[1], images, labels)).mean()
        v = dict(zip(params, torch.autograd.grad(l_out, list(params.values()))))

    grads, loss, diagnostics = meta_grads(method, images, labels)
    assert loss == pytest.approx(l_out.item(), rel=1e-12) == diagnostics["outer_loss"]
    for n in theta:
        torch.testing.assert_close(grads[f"learner.{n}"], v[n], rtol=1e-9, atol=1e-12)
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.01)
    optimizer.step()
    for n, p in method.learned().items():
        torch.testing.assert_close(p.detach(), theta[n] - 0.01 * v[n], rtol=1e-9, atol=1e-12)

    reptile = float64_method("maple", inner_steps=2, inner_lr=0.2, weighting=False, token_lr=False,
                             meta_update="reptile", anchor=0.0)
    grads, _, _ = meta_grads(reptile, images, labels)
    for n, start in theta.items():
        torch.testing.assert_close(grads[f"learner.{n}"], (start - point[n]) / (2 * 0.2), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rate_input", ["tokens", "template_features"])
def test_anchor_adds_the_weighted_inner_loss_gradient_at_theta(rate_input):
    """The anchor adds the gradient at θ of Σ_i w_i L_i on P_in; with per-template rates template i
    enters it as its inner step does, with w_i α_i / α₀."""
    plain = float64_method("coop", inner_steps=2, inner_lr=0.2, anchor=0.0, rate_input=rate_input)
    perturb_rates(plain)
    anchored = float64_method("coop", inner_steps=2, inner_lr=0.2, anchor=0.5, rate_input=rate_input)
    anchored.load_state_dict(plain.state_dict())
    images, labels = batch()
    weights = torch.softmax(plain.scores.detach()[SPLIT[0]] / plain.tau, 0)
    if rate_input == "template_features":
        with torch.no_grad():
            weights = weights * plain.template_rate(plain.learned(), SPLIT[0]) / plain.inner_lr
    with learner_at(plain, {n: p.detach() for n, p in plain.learned().items()}) as params:
        inner = (weights * torch.stack(hand_losses(plain, SPLIT[0], images, labels))).sum()
        g0 = dict(zip(params, torch.autograd.grad(inner, list(params.values()))))
    base, loss, _ = meta_grads(plain, images, labels)
    grads, anchored_loss, _ = meta_grads(anchored, images, labels)
    assert anchored_loss == pytest.approx(loss, rel=1e-12)  # the value stays L_out
    for n in g0:
        assert g0[n].abs().max() > 0
        torch.testing.assert_close(grads[f"learner.{n}"], base[f"learner.{n}"] + 0.5 * g0[n], rtol=1e-9, atol=1e-12)
    for n, g in base.items():  # the scores and H keep their exact hypergradients
        if not n.startswith("learner."):
            torch.testing.assert_close(grads[n], g, rtol=1e-9, atol=1e-12)


def test_template_sets_are_disjoint_every_step(tiny_backbone):
    for seed in range(50):
        p_in, p_out = draw_split(60, 30, 30, torch.Generator().manual_seed(seed))
        assert len(p_in) == len(p_out) == 30 and not set(p_in.tolist()) & set(p_out.tolist())
    method = build_method("promise", build_learner("coop", tiny_backbone), CLASSES,
                          {"inner_steps": 1, "track_improvement": False})
    images, labels = batch(torch.float32)
    features = method.learner.encode_images(images).detach()
    splits = []
    for _ in range(3):
        method.loss(images, labels, features)
        p_in, p_out = method.last_split
        assert len(p_in) == len(p_out) == 30 and not set(p_in.tolist()) & set(p_out.tolist())
        splits.append(p_in.tolist())
    assert splits[0] != splits[1]


def test_bad_options_are_user_errors(tiny_backbone):
    learner = build_learner("coop", tiny_backbone)
    for options in ({"templates_in": 40}, {"inner_steps": 0}, {"tau": 0}, {"meta_update": "sgd"}, {"anchor": -1},
                    {"rate_input": "token"}):
        with pytest.raises(UserError, match="promise"):
            build_method("promise", learner, CLASSES, options)
    with pytest.raises(UserError, match="cannot train learner 'cocoop': it lacks the capability 'unconditional'"):
        build_method("promise", build_learner("cocoop", tiny_backbone), CLASSES)


def test_training_run_logs_the_diagnostics(tmp_path):
    root = tmp_path / "colours"
    write_train_test_folders(root, train=4, test=2)
    request = TrainRequest(method="promise", learner="maple", model=str(TINY_CONFIG), dataset=f"folder:{root}",
                           shots=4, output=str(tmp_path / "run"), method_options={"templates_in": 3, "templates_out": 3},
                           config=TrainConfig(epochs=1, batch_size=4, warmup_epochs=0, seed=1),
                           eval_templates="single", eval_perturb="none", bootstrap=0, device="cpu", fewshot_cache=None)
    doc = run_training(request, {})
    log = [json.loads(line) for line in Path(tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == doc["run"]["training"]["steps"] == 2
    expected = {"outer_loss", "improve_share", "w_entropy", "top1_template", "alpha_min", "alpha_max"}
    assert expected <= set(log[0]) and log[0]["loss"] == pytest.approx(log[0]["outer_loss"])
    assert 0 <= log[0]["improve_share"] <= 1 and 0 < log[0]["alpha_min"] <= log[0]["alpha_max"]
    summary = doc["run"]["training"]["method_summary"]  # the final weights, in the run's result
    assert 0 < summary["w_entropy_all"] <= summary["w_entropy_all_max"] == pytest.approx(math.log(60))
    assert 0 < summary["w_entropy_p_in"] <= summary["w_entropy_p_in_max"] == pytest.approx(math.log(3))
    top = summary["top_templates"]
    assert len(top) == 5 and all("{}" in t["template"] for t in top)
    assert [t["weight"] for t in top] == sorted((t["weight"] for t in top), reverse=True)

"""Presets: a paper's published training configuration in one word (``--preset maple-b2n``).

Each preset names the method and learner, their options and the training budget of one
published configuration, and says where every value comes from (a reference config file or the
paper). Flags the user passes explicitly win over the preset; the run records the preset, its
values and what was overridden (`apply_preset`). All presets are for CLIP ViT-B/16 with OpenAI's
weights, as published; `--model`/`--pretrained` move them to another backbone (a depth the
backbone cannot hold is refused as usual).

The MP-* fine-tuning presets start from a meta-prompt: give it with ``--init``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UserError
from .names import unknown_name_error

MPL = "muzairkhattak/multimodal-prompt-learning"
SRC = "muzairkhattak/PromptSRC"
COOP = "KaiyangZhou/CoOp"
MMRL = "yunncheng/MMRL"
TRAIN_KEYS = ("epochs", "batch_size", "lr", "warmup_epochs")
REQUEST_KEYS = ("shots", "subset", "model", "pretrained")


@dataclass(frozen=True)
class Preset:
    """One published configuration.

    Attributes:
        name: The preset's name (``maple-b2n``).
        summary: What it is, in a few words.
        source: Where the values come from (config file in a reference repository, or paper).
        method, learner: The training method and learner.
        learner_options, method_options: Their options.
        train: Training budget: keys of `TRAIN_KEYS` (the `TrainConfig` fields) and of
            `REQUEST_KEYS` (few-shot, class subset, backbone).
        needs_init: A fine-tuning preset that starts from a meta-prompt given with ``--init``.
    """

    name: str
    summary: str
    source: str
    method: str
    learner: str
    learner_options: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    needs_init: bool = False

    def values(self) -> dict[str, Any]:
        """Everything the preset sets, flat, as `list presets` prints and ``train.json`` records."""
        return {"method": self.method, "learner": self.learner, **self.train,
                "learner_options": dict(self.learner_options), "method_options": dict(self.method_options)}


VIT_B16 = {"model": "ViT-B-16", "pretrained": "openai", "shots": 16, "warmup_epochs": 1}
B2N = {**VIT_B16, "subset": "base"}
ALL = {**VIT_B16, "subset": "all"}
INIT = "a photo of a"
MAML = {"inner_lr": 0.025 / 6, "inner_steps": 4, "inner_batch": 32}
MAML_TRAIN = {**B2N, "epochs": 200, "lr": 0.001}


def _presets() -> dict[str, Preset]:
    deep9 = {"n_ctx": 2, "ctx_init": INIT, "depth": 9}
    ivlp9 = {**deep9, "n_ctx_v": 2, "depth_v": 9}
    ivlp_src = {"n_ctx": 4, "ctx_init": INIT, "depth": 9, "n_ctx_v": 4, "depth_v": 9}
    src_losses = {"text_weight": 25.0, "image_weight": 10.0}
    mmrl = {"n_rep_tokens": 5, "rep_dim": 512, "first_layer": 6, "alpha": 0.7, "reg_weight": 1.0}
    promise = "Promise (ICLR 2026) paper settings (the seed spec, specs/methods.md)"
    maml = "Kim & Ok, MAML with gradient clipping (meta-prompt; the seed spec, specs/methods.md)"
    items = [
        Preset("coop-b2n", "CoOp, 4 tokens from 'a photo of a', base-to-new", f"{COOP} configs/trainers/CoOp/"
               "vit_b16_ep50_ctxv1.yaml", "erm", "coop", {"n_ctx": 4, "ctx_init": INIT},
               train={**B2N, "epochs": 50, "batch_size": 32, "lr": 0.002}),
        Preset("cocoop-b2n", "CoCoOp, 4 tokens, batch 1, base-to-new", f"{COOP} configs/trainers/CoCoOp/"
               "vit_b16_c4_ep10_batch1_ctxv1.yaml", "erm", "cocoop", {"n_ctx": 4, "ctx_init": INIT},
               train={**B2N, "epochs": 10, "batch_size": 1, "lr": 0.002}),
        Preset("ivlp-b2n", "IVLP (MaPLe's baseline), 2+2 tokens at depth 12, base-to-new", f"{MPL} configs/trainers/"
               "IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml", "erm", "ivlp",
               {**ivlp9, "depth": 12, "depth_v": 12}, train={**B2N, "epochs": 5, "batch_size": 4, "lr": 0.0035}),
        Preset("maple-b2n", "MaPLe, 2 tokens at depth 9, base-to-new", f"{MPL} configs/trainers/MaPLe/"
               "vit_b16_c2_ep5_batch4_2ctx.yaml", "erm", "maple", deep9,
               train={**B2N, "epochs": 5, "batch_size": 4, "lr": 0.0035}),
        Preset("maple-xd", "MaPLe cross-dataset / domain generalisation (ImageNet source, all classes), depth 3",
               f"{MPL} configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml", "erm", "maple",
               {**deep9, "depth": 3}, train={**ALL, "epochs": 2, "batch_size": 4, "lr": 0.0026}),
        Preset("promptsrc-b2n", "PromptSRC, IVLP 4+4 tokens at depth 9, GPA 15/1, base-to-new",
               f"{SRC} configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml", "promptsrc", "ivlp",
               ivlp_src, {**src_losses, "gpa_mean": 15.0, "gpa_std": 1.0},
               train={**B2N, "epochs": 20, "batch_size": 4, "lr": 0.0025}),
        Preset("promptsrc-xd", "PromptSRC cross-dataset (ImageNet source, all classes), depth 3, GPA 6/10",
               f"{SRC} configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets.yaml", "promptsrc",
               "ivlp", {**ivlp_src, "depth": 3, "depth_v": 3}, {**src_losses, "gpa_mean": 6.0, "gpa_std": 10.0},
               train={**ALL, "epochs": 20, "batch_size": 4, "lr": 0.0025}),
        Preset("promptsrc-fewshot", "PromptSRC few-shot (all classes), 50 epochs, GPA 30/30",
               f"{SRC} configs/trainers/PromptSRC/vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml (its first GPA "
               "setting: ImageNet, Caltech101, OxfordPets, Food101, UCF101, SUN397)", "promptsrc", "ivlp", ivlp_src,
               {**src_losses, "gpa_mean": 30.0, "gpa_std": 30.0},
               train={**ALL, "epochs": 50, "batch_size": 4, "lr": 0.0025}),
        Preset("mmrl-b2n", "MMRL, 5 representation tokens in layers 6-12, dim 512, alpha 0.7, AdamW, base-to-new",
               f"{MMRL} configs/trainers/MMRL/vit_b16.yaml", "erm", "mmrl", mmrl,
               {"template": "a photo of a {}."}, train={**B2N, "epochs": 10, "batch_size": 4, "lr": 0.001}),
        Preset("promise-mmrl-b2n", "Promise on MMRL (the Promise paper's best row): MMRL's layers, 10 epochs, "
               "batch 8", promise, "promise", "mmrl", mmrl, {"templates_in": 30, "templates_out": 30},
               train={**B2N, "epochs": 10, "batch_size": 8, "lr": 0.0035}),
        Preset("promise-ivlp-b2n", "Promise on IVLP: depth 9, 2+2 tokens, 10 epochs, batch 8", promise, "promise",
               "ivlp", ivlp9, {"templates_in": 30, "templates_out": 30},
               train={**B2N, "epochs": 10, "batch_size": 8, "lr": 0.0035}),
        Preset("promise-maple-b2n", "Promise on MaPLe: depth 9, 2 tokens, 10 epochs, batch 8", promise, "promise",
               "maple", deep9, {"templates_in": 30, "templates_out": 30},
               train={**B2N, "epochs": 10, "batch_size": 8, "lr": 0.0035}),
        Preset("promise-ivlp-imagenet", "Promise on IVLP, ImageNet source (all classes): depth 3, 5 epochs",
               promise, "promise", "ivlp", {**ivlp9, "depth": 3, "depth_v": 3},
               {"templates_in": 30, "templates_out": 30}, train={**ALL, "epochs": 5, "batch_size": 8, "lr": 0.0035}),
        Preset("promise-maple-imagenet", "Promise on MaPLe, ImageNet source (all classes): depth 3, 5 epochs",
               promise, "promise", "maple", {**deep9, "depth": 3}, {"templates_in": 30, "templates_out": 30},
               train={**ALL, "epochs": 5, "batch_size": 8, "lr": 0.0035}),
        Preset("mp-coop", "MP-CoOp meta-prompt: MAML over CoOp, alpha 0.025/6, beta 0.001, gamma 5, 200 epochs",
               maml, "maml-clip", "coop", {"n_ctx": 4, "ctx_init": INIT}, {**MAML, "clip_norm": 5.0},
               train=MAML_TRAIN),
        Preset("mp-cocoop", "MP-CoCoOp meta-prompt: MAML over CoCoOp, inner batch 8", maml, "maml-clip", "cocoop",
               {"n_ctx": 4, "ctx_init": INIT}, {**MAML, "inner_batch": 8, "clip_norm": 5.0}, train=MAML_TRAIN),
        Preset("mp-promptsrc", "MP-PromptSRC meta-prompt: MAML over IVLP 4+4 with PromptSRC's losses, alpha 0.02/6",
               maml, "maml-clip", "ivlp", ivlp_src, {**MAML, "inner_lr": 0.02 / 6, "clip_norm": 5.0,
                                                    "loss": "promptsrc"}, train=MAML_TRAIN),
        Preset("mp-coop-ft", "MP-CoOp fine-tuning: CoOp's base-to-new config from the meta-prompt (--init)",
               f"{maml}; {COOP} configs/trainers/CoOp/vit_b16_ep50_ctxv1.yaml", "erm", "coop",
               train={**B2N, "epochs": 50, "batch_size": 32, "lr": 0.002}, needs_init=True),
        Preset("mp-cocoop-ft", "MP-CoCoOp fine-tuning: CoCoOp's base-to-new config from the meta-prompt (--init)",
               f"{maml}; {COOP} configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml", "erm", "cocoop",
               train={**B2N, "epochs": 10, "batch_size": 1, "lr": 0.002}, needs_init=True),
        Preset("mp-promptsrc-ft", "MP-PromptSRC fine-tuning: PromptSRC's base-to-new config from the meta-prompt "
               "(--init)", f"{maml}; {SRC} configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml",
               "promptsrc", "ivlp", {}, {**src_losses, "gpa_mean": 15.0, "gpa_std": 1.0},
               train={**B2N, "epochs": 20, "batch_size": 4, "lr": 0.0025}, needs_init=True),
        Preset("anprompt-maple-b2n", "ANPrompt on MaPLe, base-to-new", "ANPrompt (paper abstract and early code: "
               "anti-noise prompts in the last two layers); no published config, so MaPLe's base-to-new config "
               f"({MPL} vit_b16_c2_ep5_batch4_2ctx.yaml) with ANPrompt's documented defaults (docs/methods-anprompt.md)",
               "anprompt", "maple", deep9, train={**B2N, "epochs": 5, "batch_size": 4, "lr": 0.0035}),
    ]
    return {p.name: p for p in items}


PRESETS: dict[str, Preset] = _presets()


def get_preset(name: str) -> Preset:
    """The preset called `name`.

    Raises:
        UserError: an unknown name, with the closest ones.
    """
    if name not in PRESETS:
        raise unknown_name_error("preset", name, list(PRESETS))
    return PRESETS[name]


def apply_preset(name: str, given: dict[str, Any], explicit: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge a preset under what the user asked.

    Args:
        name: The preset.
        given: The user's values by key (`TRAIN_KEYS`, `REQUEST_KEYS`, ``method``, ``learner``,
            ``learner_options``, ``method_options``), defaults included.
        explicit: The keys the user set explicitly; those win over the preset (per option
            inside the two option dicts, which the user's values extend).

    Returns:
        The merged values, and the record ``{"name", "source", "values", "overridden"}`` that
        the run stores: overridden maps each key where the user's explicit value replaced the
        preset's to that value.

    Raises:
        UserError: an unknown preset.
    """
    preset = get_preset(name)
    values = preset.values()
    merged = dict(given)
    overridden: dict[str, Any] = {}
    for key, value in values.items():
        if key in ("learner_options", "method_options"):
            user = given.get(key) or {}
            merged[key] = {**value, **user}
            overridden.update({f"{key}.{k}": v for k, v in user.items() if k in value and value[k] != v})
        elif key in explicit:
            if given.get(key) != value:
                overridden[key] = given.get(key)
        else:
            merged[key] = value
    if "model" in explicit and "pretrained" not in explicit:  # the preset's weights belong to its model
        merged["pretrained"] = given.get("pretrained")
    record = {"name": preset.name, "source": preset.source, "values": values, "overridden": overridden}
    return merged, record


def check_init(name: str, init: Any) -> None:
    """A fine-tuning preset needs its meta-prompt."""
    if get_preset(name).needs_init and not init:
        raise UserError(f"preset '{name}' fine-tunes a meta-prompt: pass it with --init META.safetensors")

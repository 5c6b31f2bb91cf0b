"""Import the field's published prompt checkpoints (Dassl: CoOp, CoCoOp, IVLP, MaPLe, PromptSRC).

The reference code saves with Dassl's ``save_checkpoint``: a dict holding ``state_dict`` (the
registered module's tensors, often fp16), ``epoch``, ``optimizer``, ``scheduler`` and
``val_result``, in files named ``model.pth.tar-N`` or ``model-best.pth.tar``. CoOp and CoCoOp
register their prompt learner alone (keys ``ctx``, ``meta_net.*``); IVLP, MaPLe and PromptSRC
register the whole ``CustomCLIP`` (keys ``prompt_learner.*`` and the prompts that live inside
the towers, ``*.VPT``/``*.VPT_shallow``, beside the frozen CLIP weights).

The file is read with ``torch.load(weights_only=True)`` only. The learning-rate schedulers that
Dassl pickles into ``scheduler`` (its warm-up scheduler holds the cosine one, which holds the
optimiser) and numpy scalars in ``val_result`` are read as inert placeholders that run nothing:
the import never needs them. Any other class or callable in the
file is refused with one line, before anything in it is constructed.

Name mapping (reference → ours), after dropping a ``module.`` and a ``prompt_learner.`` prefix:

==================================================  ==================  ==============
reference                                           ours                learner
==================================================  ==================  ==============
``ctx``                                             ``ctx``             coop, cocoop
``meta_net.linear{1,2}.{weight,bias}``              the same            cocoop
``ctx``                                             ``text_prompts.0``  ivlp, maple
``text_encoder.transformer.resblocks.i.VPT_shallow``  ``text_prompts.i``  ivlp
``image_encoder.VPT``                               ``vision_prompts.0``  ivlp
``image_encoder.transformer.resblocks.i.VPT_shallow``  ``vision_prompts.i``  ivlp
``compound_prompts_text.j``                         ``text_prompts.{j+1}``  maple
``proj.{weight,bias}``                              ``vision_proj.0.*``  maple
``compound_prompt_projections.j.{weight,bias}``     ``vision_proj.{j+1}.*``  maple
==================================================  ==================  ==============

Ignored: ``token_prefix``/``token_suffix`` (embeddings of the reference's prompts, rebuilt from
the text here) and the frozen backbone's own tensors. Any other key is refused, so nothing
learned is silently dropped.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..backbone import Backbone
from ..errors import UserError
from ..files import sha256_file
from . import build_learner
from .base import PromptLearner
from .coop import DEFAULT_CTX_INIT

IGNORED = re.compile(r"^(token_prefix|token_suffix|logit_scale|ZS_image_encoder\..*|(image|text)_encoder\..*)$")
TEXT_DEEP = re.compile(r"^text_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$")
VISION_DEEP = re.compile(r"^image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$")
MAPLE_TEXT = re.compile(r"^compound_prompts_text\.(\d+)$")
MAPLE_PROJ = re.compile(r"^compound_prompt_projections\.(\d+)\.(weight|bias)$")
PROJ = re.compile(r"^proj\.(weight|bias)$")
META_NET = re.compile(r"^meta_net\.linear[12]\.(weight|bias)$")
LEARNERS = ("coop", "cocoop", "ivlp", "maple")


class _Inert:
    """What a pickled scheduler or numpy scalar becomes: an object that runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _plain_dict(*args: Any) -> dict:
    """A ``collections.defaultdict`` (an optimiser's state) read as a plain dict, its factory unused."""
    return {}


INERT = [
    "torch.optim.lr_scheduler.CosineAnnealingLR", "torch.optim.lr_scheduler.MultiStepLR",
    "torch.optim.lr_scheduler.StepLR", "torch.optim.lr_scheduler.LambdaLR", "torch.optim.sgd.SGD",
    "torch.optim.adam.Adam", "torch.optim.adamw.AdamW",
    "dassl.optim.lr_scheduler.ConstantWarmupScheduler", "dassl.optim.lr_scheduler.LinearWarmupScheduler",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype",
    "numpy.dtypes.Float64DType", "numpy.dtypes.Float32DType",
]
"""Globals Dassl checkpoints hold outside their tensors (in ``scheduler`` and ``val_result``)."""


def read_dassl(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict of a Dassl file, read with ``weights_only=True``.

    Raises:
        UserError: a missing file, a file that needs any other class to be unpickled, or one
            that holds no ``state_dict``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals([*((_Inert, name) for name in INERT),
                                               (_plain_dict, "collections.defaultdict"), dict]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = found.group(1) if found else "an object"
        raise UserError(f"refusing {path}: reading it would unpickle {what}, which may run code; "
                        "only tensors and plain values are read") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise UserError(f"cannot read {path} as a torch checkpoint: {str(err).splitlines()[0][:200]}") from None
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state_dict of tensors (not a Dassl/CoOp checkpoint)")
    return {"state_dict": state, **{k: v for k, v in data.items() if k in ("epoch",) and isinstance(v, int)}}


def map_reference_names(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """The learner the tensors belong to and the tensors under our names (fp32).

    Raises:
        UserError: keys this mapping does not know, or no prompt at all.
    """
    keys = {_strip(k): v for k, v in state.items()}
    learned = {k: v for k, v in keys.items() if not IGNORED.match(k) or TEXT_DEEP.match(k) or VISION_DEEP.match(k)
               or k == "image_encoder.VPT"}
    if "ctx" not in learned:
        raise UserError("no 'ctx' (prompt_learner.ctx) in the checkpoint: not a CoOp/CoCoOp/IVLP/MaPLe/PromptSRC model")
    if any(MAPLE_TEXT.match(k) or MAPLE_PROJ.match(k) or PROJ.match(k) for k in learned):
        learner = "maple"
    elif any(TEXT_DEEP.match(k) or VISION_DEEP.match(k) or k == "image_encoder.VPT" for k in learned):
        learner = "ivlp"
    elif any(META_NET.match(k) for k in learned):
        learner = "cocoop"
    else:
        learner = "coop"
    ours: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in learned.items():
        name = _our_name(learner, key)
        if name is None:
            unknown.append(key)
        else:
            ours[name] = value.detach().float().contiguous()
    if unknown:
        raise UserError(f"the checkpoint's {learner} tensors include names this import does not know: "
                        f"{', '.join(sorted(unknown)[:6])}")
    return learner, ours


def options_for(learner: str, tensors: dict[str, torch.Tensor], ctx_init: str | None) -> dict[str, Any]:
    """Learner options that reproduce the reference model the tensors come from.

    CoOp/CoCoOp learn every token of their prefix (the reference sets n_ctx to the init
    phrase's length), so no init phrase is kept; IVLP/MaPLe keep the rest of `ctx_init`
    (the configs' "a photo of a") as fixed text.
    """
    if learner in ("coop", "cocoop"):
        ctx = tensors["ctx"]
        options: dict[str, Any] = {"n_ctx": int(ctx.shape[-2]), "ctx_init": None}
        if ctx.dim() == 3:
            options["csc"] = True
        return options
    n_ctx = int(tensors["text_prompts.0"].shape[0])
    depth = _depth(tensors, "text_prompts.")
    if learner == "maple":
        return {"n_ctx": n_ctx, "ctx_init": ctx_init, "depth": depth}
    vision = tensors.get("vision_prompts.0")
    n_ctx_v = int(vision.shape[0]) if vision is not None else 0
    depth_v = _depth(tensors, "vision_prompts.") if vision is not None else 0
    return {"n_ctx": n_ctx, "ctx_init": ctx_init, "depth": depth, "n_ctx_v": n_ctx_v, "depth_v": depth_v}


def import_checkpoint(path: str | Path, backbone: Backbone, learner: str | None = None,
                      ctx_init: str | None = DEFAULT_CTX_INIT, options: dict[str, Any] | None = None
                      ) -> tuple[PromptLearner, dict[str, Any]]:
    """Build our learner holding the prompts of a reference checkpoint.

    Args:
        path: The Dassl checkpoint (``model.pth.tar-N``).
        backbone: The backbone the prompts were trained on (ViT-B/16 with OpenAI weights for
            the published ones).
        learner: The expected learner, or None to take the one the names say (PromptSRC's
            prompts are IVLP's).
        ctx_init: The reference config's ``CTX_INIT`` (IVLP/MaPLe keep its words after n_ctx).
        options: Further learner options (``class_token_position``, ``classnames``).

    Returns:
        The learner and a record of where it came from (file, SHA-256, epoch, reference names).

    Raises:
        UserError: an unreadable or unsafe file, unknown names, another learner than expected,
            or tensors whose shapes do not fit the backbone.
    """
    data = read_dassl(path)
    found, tensors = map_reference_names(data["state_dict"])
    if learner is not None and learner != found:
        raise UserError(f"{path} holds {found} prompts, not {learner}")
    built = {**options_for(found, tensors, ctx_init), **(options or {})}
    prompt_learner = build_learner(found, backbone, built)
    prompt_learner.load_learned_state(tensors, str(path))
    source = {"path": str(Path(path).resolve()), "sha256": sha256_file(path), "format": "dassl",
              "epoch": data.get("epoch"), "dtype": str(next(iter(data["state_dict"].values())).dtype)}
    return prompt_learner, source


def _strip(key: str) -> str:
    key = key.removeprefix("module.")
    return key.removeprefix("prompt_learner.")


def _our_name(learner: str, key: str) -> str | None:
    if key == "ctx":
        return "ctx" if learner in ("coop", "cocoop") else "text_prompts.0"
    if learner == "cocoop" and META_NET.match(key):
        return key
    if learner == "ivlp":
        if match := TEXT_DEEP.match(key):
            return f"text_prompts.{match.group(1)}"
        if match := VISION_DEEP.match(key):
            return f"vision_prompts.{match.group(1)}"
        if key == "image_encoder.VPT":
            return "vision_prompts.0"
    if learner == "maple":
        if match := MAPLE_TEXT.match(key):
            return f"text_prompts.{int(match.group(1)) + 1}"
        if match := PROJ.match(key):
            return f"vision_proj.0.{match.group(1)}"
        if match := MAPLE_PROJ.match(key):
            return f"vision_proj.{int(match.group(1)) + 1}.{match.group(2)}"
    return None


def _depth(tensors: dict[str, torch.Tensor], prefix: str) -> int:
    """Layers 0..d-1 carry prompts; a gap in the indices is refused."""
    layers = sorted(int(k[len(prefix):].split(".")[0]) for k in tensors if k.startswith(prefix))
    layers = sorted(set(layers))
    if layers != list(range(len(layers))):
        raise UserError(f"the checkpoint's {prefix.rstrip('.')} skip layers ({layers}); cannot be represented")
    return len(layers)

"""The training state kept in the run folder, so that an interrupted run continues exactly.

The learner checkpoint alone cannot continue a run: SGD's momentum buffers, a method's own
parameters (Promise's template scores and rate network) and Python-side state (PromptSRC's
Gaussian aggregate, exposed through ``get_extra_state``), the step counter that drives the
learning-rate schedule, the loss history, and the random generators that fix the data order and
every random draw (Promise's template split uses the global torch generator) would all be lost.
At each epoch end the loop writes all of them to ``train_state.pt``; a resumed run loads them
and goes on as if it had never stopped.

The file is written with `torch.save` through `files.atomic_path` and read back with
``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only, never an
arbitrary pickle.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..files import atomic_path
from .method import TrainingMethod

STATE = "train_state.pt"
FORMAT = 1


@dataclass
class TrainState:
    """Everything a run needs to continue after its last finished epoch.

    Attributes:
        epoch: Epochs finished.
        step: Optimiser steps taken (the schedule's position; also the last logged step).
        losses: Mean loss of every optimiser step so far.
        skipped_images: Unreadable training images met in the first epoch.
        wall_time_s: Training time spent so far, over all sessions.
        learner: The learner's learned tensors (what its checkpoint holds).
        method: The method's own state: ``method.state_dict()`` outside the learner.
        optimizer: The optimiser's state dict (momentum buffers, rates).
        scaler: The fp16 gradient scaler's state dict (empty when it is off).
        rng: The global torch CPU generator's state.
        loader_rng: The data-order generator's state.
        cuda_rng: The CUDA generator's state of the training device, None on the CPU.
        window: Micro-batches accumulated since the last optimiser step (``batches``, ``loss``,
            ``images``), when ``--accumulate`` does not divide an epoch's batches.
        pending: Their gradients per trainable parameter (averaged over ranks), None when none.
    """

    epoch: int
    step: int
    losses: list[float]
    skipped_images: int
    wall_time_s: float
    learner: dict[str, torch.Tensor]
    method: dict[str, Any]
    optimizer: dict[str, Any]
    scaler: dict[str, Any]
    rng: torch.Tensor
    loader_rng: torch.Tensor
    cuda_rng: torch.Tensor | None
    window: dict[str, float]
    pending: list[torch.Tensor | None]


def method_state(method: TrainingMethod) -> dict[str, Any]:
    """The method's state outside its learner (the frozen backbone is never saved)."""
    return {k: v for k, v in method.state_dict().items() if not k.startswith("learner.")}


def load_method_state(method: TrainingMethod, state: TrainState, source: str) -> None:
    """Put the learner's and the method's saved state back, refusing one of another method."""
    method.learner.load_learned_state(state.learner, source)
    result = method.load_state_dict(state.method, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("learner.")]
    if missing or result.unexpected_keys:
        raise UserError(f"training state {source} does not fit method '{method.name}': missing "
                        f"{missing or 'none'}, unexpected {result.unexpected_keys or 'none'}")


def random_states(device: torch.device, loader_generator: torch.Generator) -> dict[str, torch.Tensor | None]:
    """The generators' states: global CPU, data order, and the training device's CUDA one."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"rng": torch.get_rng_state(), "loader_rng": loader_generator.get_state(), "cuda_rng": cuda}


def restore_random_states(state: TrainState, device: torch.device, loader_generator: torch.Generator) -> None:
    """Set the generators back to where the interrupted run had them at its last epoch end."""
    torch.set_rng_state(state.rng)
    loader_generator.set_state(state.loader_rng)
    if state.cuda_rng is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state.cuda_rng, device)


def save_state(path: Path, state: TrainState) -> None:
    """Write `state` atomically: a kill mid-write leaves the previous epoch's file."""
    data = {"format": FORMAT, **{f.name: getattr(state, f.name) for f in fields(state)}}
    with atomic_path(path) as tmp:
        torch.save(data, tmp)


def load_state(path: Path) -> TrainState:
    """Read a training state without unpickling anything but tensors and plain containers.

    Raises:
        UserError: the file is unreadable, not a training state, or of another format.
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        raise UserError(f"cannot read training state {path}: damaged, or not written by this package; "
                        "run without --resume to start over") from None
    names = {f.name for f in fields(TrainState)}
    if not isinstance(data, dict) or data.get("format") != FORMAT or set(data) - {"format"} != names:
        raise UserError(f"{path} is not a training state of this version (format {FORMAT}); "
                        "run without --resume to start over")
    return TrainState(**{k: data[k] for k in names})

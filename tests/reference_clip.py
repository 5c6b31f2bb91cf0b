"""A tiny CLIP in OpenAI's checkpoint layout, built in the test session (no downloads).

OpenAI's state dict is open_clip's ``CLIP`` layout plus three meta entries (`OPENAI_META_KEYS`),
and the weights were trained with QuickGELU; `openai_state_dict` makes one with seeded random
weights on the tiny test config.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch

from promptbench_vlm.backbone import OPENAI_META_KEYS

TINY_CONFIG = Path(__file__).parent / "data" / "tiny-clip.json"


def tiny_clip(quick_gelu: bool, seed: int = 7) -> open_clip.CLIP:
    """The tiny test architecture with seeded random weights, in eval mode."""
    cfg = json.loads(TINY_CONFIG.read_text())
    torch.manual_seed(seed)
    return open_clip.CLIP(**cfg, quick_gelu=quick_gelu).eval()


def openai_state_dict(seed: int = 7) -> dict[str, torch.Tensor]:
    """An OpenAI-layout state dict: the CLIP tensors and the meta entries the reference drops."""
    model = tiny_clip(quick_gelu=True, seed=seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    meta = {"input_resolution": 32, "context_length": 32, "vocab_size": 49408}
    state.update({k: torch.tensor(meta[k]) for k in OPENAI_META_KEYS})
    return state


def write_openai_file(path: Path, seed: int = 7) -> Path:
    torch.save(openai_state_dict(seed), path)
    return path

"""`toy-clip`: the toy world's CLIP, shipped as an open_clip model config with trained weights.

Registered in `backbone.SHIPPED_MODELS` like any shipped model; `toy.train` rebuilds the weights.
"""

from __future__ import annotations

from pathlib import Path

from ..backbone import ShippedModel

TOY_DIR = Path(__file__).resolve().parent
TOY_MODEL = "toy-clip"
TOY_CONFIG = TOY_DIR / f"{TOY_MODEL}.json"
TOY_WEIGHTS = TOY_DIR / f"{TOY_MODEL}.safetensors"
TOY_CLIP = ShippedModel(config=TOY_CONFIG, weights=TOY_WEIGHTS)

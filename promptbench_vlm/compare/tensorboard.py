"""An optional TensorBoard sink for a sweep's training curves (``compare --tensorboard``).

The runs' ``log.jsonl`` stays the record; each finished run's numeric log fields (loss, lr,
grad_norm, method-specific ones) are written as scalars against the step into
``OUTPUT/tensorboard/DATASET/METHOD__LEARNER__seedN/``, so ``tensorboard --logdir OUTPUT/tensorboard``
shows every run's curves side by side. It needs ``torch.utils.tensorboard`` and so the
``tensorboard`` package (``pip install 'promptbench_vlm[tensorboard]'``); off by default.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import UserError
from ..train.run import LOG

FOLDER = "tensorboard"


def summary_writer():
    """`torch.utils.tensorboard.SummaryWriter`, or one line saying what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install 'promptbench_vlm[tensorboard]'"
                        ) from None
    return SummaryWriter


def write_curves(run_folder: Path, output: Path) -> Path | None:
    """Write one run's step log as TensorBoard scalars; return the event folder (None: no log).

    The event files this function wrote there before are replaced (nothing else is touched), so a
    rerun never mixes two runs' curves."""
    log = run_folder / LOG
    if not log.is_file():
        return None
    target = output / FOLDER / run_folder.relative_to(output)
    for old in target.glob("events.out.tfevents.*"):
        old.unlink()
    writer = summary_writer()(log_dir=str(target))
    try:
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line a kill cut short
            step = record.get("step")
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and math.isfinite(value):
                    writer.add_scalar(key, value, step)
    finally:
        writer.close()
    return target

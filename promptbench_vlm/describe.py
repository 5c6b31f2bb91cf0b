"""What `promptbench list learners|methods --verbose` shows: each one's declared options and
capabilities, read from the classes alone (no model is built)."""

from __future__ import annotations

from dataclasses import fields

from .options import describe


def describe_learner(name: str) -> list[str]:
    """The options and capabilities of learner `name`, one line each."""
    from .learners import learner_class

    cls = learner_class(name)
    caps = cls.capabilities
    values = {f.name: getattr(caps, f.name) for f in fields(caps)}
    flags = [f"{key}={'|'.join(value) if isinstance(value, tuple) else value}"
             for key, value in values.items() if value not in ((), False, None)]
    flags += [flag for flag in ("conditional", "image_side_learned") if getattr(cls, flag)]
    return [*describe(cls.Options), f"capabilities: {', '.join(flags)}"]


def describe_method(name: str) -> list[str]:
    """The options, required learner capabilities and default learning rate of method `name`."""
    from .train.method import METHODS

    cls = METHODS.get(name)
    lr = f"{cls.lr}" if cls.lr is not None else "the learner's (capabilities.default_lr)"
    return [*describe(cls.Options), f"needs: {', '.join(cls.requires) or 'trainable parameters'}; default lr: {lr}"]

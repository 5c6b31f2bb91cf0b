"""Training: a shared loop and small method objects (ERM, PromptSRC, and the robust methods)."""

from .loop import TrainConfig, TrainingDiverged, train
from .method import METHODS, TrainingMethod, build_method

__all__ = ["METHODS", "TrainConfig", "TrainingDiverged", "TrainingMethod", "build_method", "train"]

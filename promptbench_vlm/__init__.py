"""promptbench_vlm: how far do a prompt learner's predictions move when its prompt's wording moves?"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("promptbench_vlm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]

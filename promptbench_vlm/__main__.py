"""`python -m promptbench_vlm` runs the same CLI as `promptbench` (torchrun needs a module)."""

from .cli import main

main()

"""Promise's small parts: the template split, the token learning-rate network, forward-mode setup.

Kept apart from `promise` so that the meta-step there reads as the algorithm.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

def draw_split(n_templates: int, n_in: int, n_out: int, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint random index sets P_in (`n_in`) and P_out (`n_out`) out of `n_templates`.

    One permutation cut in two, so the sets can never share a template.
    """
    perm = torch.randperm(n_templates, generator=generator)
    return perm[:n_in], perm[n_in:n_in + n_out]


def inverse_softplus(y: float) -> float:
    """The z with softplus(z) = y (for y > 0), to start the rate network at a given rate."""
    return y + math.log(-math.expm1(-y))


class TokenRate(nn.Module):
    """H: a 3-layer MLP from a token vector to its positive inner learning rate (softplus output).

    The last layer starts with tiny weights and the bias softplus⁻¹(base rate), so every token
    starts at about the base inner rate and all three layers receive gradient from the start.
    """

    def __init__(self, width: int, base_rate: float, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, 1))
        last = self.net[-1]
        nn.init.normal_(last.weight, std=1e-3)
        nn.init.constant_(last.bias, inverse_softplus(base_rate))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rates ``[n, 1]`` for tokens ``[n, width]``."""
        return nn.functional.softplus(self.net(tokens))


@contextlib.contextmanager
def forward_ad_ready() -> Iterator[None]:
    """Route attention through ops that have forward-mode derivatives.

    nn.MultiheadAttention's fused fast path and the CPU flash SDPA kernel have no forward-AD
    formula; the math SDPA backend does. The fast-path switch is global, so it is restored.
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)

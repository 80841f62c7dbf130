"""The torch layers methods put into a model: the bottleneck adapter (adapter.py) and the fake-quantised
linear layer (qat.py).

They live apart from their methods because a method module is also the home of its settings schema
(`Config`), which the config reads for every method before anything loads: `tunelab config` and the
checks `tunelab train` runs first import no torch. The methods import this module where they build
layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.models.quant import fake_quant_ste

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class BottleneckAdapter(nn.Module):
    """s · (W_up f(W_down h + b_down) + b_up): the residual branch; the hook adds it to h."""

    def __init__(self, hidden: int, bottleneck: int, activation: str = "relu", scale: float = 1.0):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden)
        self.scale = scale
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.down.weight.dtype)  # fp32 branch on a bf16 base (autocast, if on, still applies)
        return (self.scale * self.up(self.act(self.down(x)))).to(h.dtype)


class FakeQuantLinear(nn.Linear):
    """nn.Linear whose forward uses the 4-bit fake-quantised weight. Existing layers get this class
    assigned in place, so parameter names, state_dict and the saved files stay plain nn.Linear."""

    qat_group_size: int = 32
    qat_symmetric: bool = False

    def forward(self, x):
        return F.linear(x, fake_quant_ste(self.weight, self.qat_group_size, self.qat_symmetric), self.bias)

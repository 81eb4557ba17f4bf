"""LARS: layer-wise adaptive rate scaling (You et al., 2017), SimCLR's optimiser.

SimCLR (Chen et al., 2020, Section 2.2) trains with LARS at large
batch sizes because plain SGD with momentum is unstable there. Each parameter
tensor's step is scaled by a trust ratio ``eta · ‖w‖ / ‖g + wd·w‖`` before heavy-ball
momentum; as in SimCLR, biases and BatchNorm parameters (the one-dimensional
tensors) get neither weight decay nor the adaptation. lightning-bolts' LARS is not
usable (DESIGN.md, "Dependencies"), and the optimiser is a few lines.
"""
from __future__ import annotations

import torch

from poisonbench.errors import ConfigError


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a per-tensor trust ratio; 1-d tensors are plain momentum SGD."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6,
                 eta: float = 0.001) -> None:
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("eta", eta)):
            if not value >= 0:
                raise ConfigError(f"LARS {name} must be non-negative, got {value}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:  # weights of convolutions and linear layers
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    # A zero norm (fresh zero-initialised tensor, vanished gradient) keeps ratio 1.
                    trust = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm,
                                        torch.ones_like(w_norm))
                    update = update.mul(trust)
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = update.clone()
                else:
                    state["momentum"].mul_(group["momentum"]).add_(update)
                p.add_(state["momentum"], alpha=-group["lr"])
        return loss

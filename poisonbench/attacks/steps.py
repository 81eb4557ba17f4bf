"""Signed Adam on a perturbation, projected every step: the optimiser of Geiping et
al.'s forest (``--attackoptim signAdam``) shared by gradient-matching crafting, the
per-batch attacks of adversarial poisoning and adversarial training.

The sign of δ's gradient goes into Adam; after each step δ is projected onto the ℓ∞
ball of radius ``eps`` and into the image box ``[-x, 1 - x]``. Everything is in pixel
units (images in [0, 1]); the authors' code optimises normalised tensors, so its lr 0.1
moves about ``0.1 · std`` pixels per step. ``scale`` (per channel, e.g. the model's
normalisation std) gives that same step here: δ = scale · u, Adam on u.
"""
from __future__ import annotations

from typing import Sequence

import torch

from poisonbench.attacks.crafting import project, random_start

INITS = ("randn", "uniform", "zero")


class SignedAdam:
    """δ for ``clean`` (float, [N, C, H, W], values in [0, 1]) and its optimiser state."""

    def __init__(self, clean: torch.Tensor, eps: float, *, lr: float = 0.1, init: str = "randn",
                 milestones: Sequence[int] = (), gamma: float = 0.1, scale: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> None:
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        self.clean, self.eps = clean.detach().float(), float(eps)
        self.scale = None if scale is None else scale.detach().float().to(clean.device).view(1, -1, 1, 1)
        if init == "zero":
            start = torch.zeros_like(self.clean)
        else:
            start = random_start(tuple(clean.shape), self.eps, "linf", generator, clean.device, kind=init)
        start = project(start, self.clean, self.eps)
        self.u = (start if self.scale is None else start / self.scale).requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.u], lr=lr)
        self.schedule = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(milestones), gamma)

    @property
    def delta(self) -> torch.Tensor:
        """δ in pixels, differentiable with respect to the optimised variable."""
        return self.u if self.scale is None else self.u * self.scale

    def poisoned(self) -> torch.Tensor:
        return self.clean + self.delta

    def step(self, grad: torch.Tensor) -> None:
        """One step against ``grad`` (the gradient of the loss to minimise w.r.t. ``delta``)."""
        if self.scale is not None:
            grad = grad * self.scale  # chain rule: d loss / d u
        self.u.grad = grad.detach().sign().to(self.u.dtype)
        self.optimizer.step()
        self.schedule.step()
        with torch.no_grad():
            delta = project(self.delta, self.clean, self.eps)
            self.u.copy_(delta if self.scale is None else delta / self.scale)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """δ and Adam's moments, for a resumable checkpoint."""
        state = self.optimizer.state.get(self.u, {})
        out = {"u": self.u.detach().clone()}
        for name in ("exp_avg", "exp_avg_sq", "step"):
            if name in state:
                out[name] = torch.as_tensor(state[name]).detach().clone()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], steps_done: int) -> None:
        with torch.no_grad():
            self.u.copy_(tensors["u"].to(self.u.device))
        if "exp_avg" in tensors:
            self.optimizer.state[self.u] = {k: tensors[k].to(self.u.device) if k != "step" else tensors[k].cpu()
                                            for k in ("exp_avg", "exp_avg_sq", "step") if k in tensors}
        for _ in range(steps_done):
            self.schedule.step()

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

import math
from typing import Callable, Sequence

import torch

from poisonbench.attacks import crafting
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


StepGradient = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, float]]


def signed_adam_restarts(description: str, clean: torch.Tensor, eps: float, *, steps: int, restarts: int,
                         lr: float, init: str, milestones: Sequence[int], scale: torch.Tensor | None, seed: int,
                         step_gradient: StepGradient) -> torch.Tensor:
    """The authors' crafting loop (DP ``witch_base.py::_run_trial``), resumable: ``restarts``
    fresh starts of ``steps`` signed-Adam steps each; ``step_gradient(δ, generator)`` gives
    (d loss / d δ, loss) with that step's randomness (``crafting.unit_generator(seed,
    unit)``); returns the δ of the restart with the lowest last-step loss (a loss that is
    not a number loses against any that is). Every step is a unit of ``crafting``: the
    checkpoint holds δ, Adam's moments and the best restart so far, so a resumed craft
    computes what an uninterrupted one does.

    On several ranks (an attack whose ``step_gradient`` shards the work and returns the
    whole gradient on every rank) δ and Adam's state are the same on every rank, so the
    checkpoint is ``shared``: rank 0 writes the one-rank file, and a craft may resume on
    another number of ranks. On one rank that is the plain checkpoint."""
    device = clean.device
    ctx = crafting.context()

    def optimizer(restart: int) -> SignedAdam:
        gen = crafting.unit_generator(seed, 10**6 + restart, device)
        return SignedAdam(clean, eps, lr=lr, init=init, milestones=milestones, scale=scale, generator=gen)

    checkpoint = crafting.Checkpoint(ctx.checkpoint, ctx.every_s, shared=True)
    first, best, best_loss, tensors = 0, None, math.inf, {}
    resumed = checkpoint.load()
    if resumed is not None:
        unit, tensors, extras = resumed
        first, best_loss = unit + 1, float(extras["best_loss"])
        best = tensors["best"].to(device) if "best" in tensors else None
    with crafting.progress(description, restarts * steps) as advance:
        advance(first)
        for restart in range(first // steps, restarts):
            opt = optimizer(restart)
            start = first - restart * steps if restart == first // steps else 0
            if start:
                opt.load_state_tensors({k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}, start)
            for step in range(start, steps):
                unit = restart * steps + step
                grad, loss = step_gradient(opt.delta, crafting.unit_generator(seed, unit))
                opt.step(grad)
                if step == steps - 1 and (best is None or loss < best_loss
                                          or (math.isnan(best_loss) and not math.isnan(loss))):
                    best_loss, best = loss, opt.delta.detach().clone()
                advance(1, loss)
                if checkpoint.due():
                    state = {f"opt.{k}": v for k, v in opt.state_tensors().items()}
                    if best is not None:
                        state["best"] = best
                    checkpoint.save(unit, state, {"best_loss": best_loss})
                crafting.finish_unit(unit)
    checkpoint.remove()
    return best

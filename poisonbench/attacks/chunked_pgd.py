"""Chunked PGD against a fixed crafting model: the driver that ``adversarial``,
``tensorclog`` and ``alignment`` share (the forest recipes of Geiping et al., used by
Fowl et al. 2021b, github.com/lhfowl/adversarial_poisons).

A crafting model is trained on clean data (``trained_model``) and kept in eval mode
(the authors' ``client.eval()``). Each chunk of ``batch_size`` images gets ``steps``
signed-gradient steps of ``tau``·ε descending an attack-specific objective, from a
Gaussian (``randn``) or uniform start, with differentiable augmentation on while
crafting; ``restarts`` whole passes are made and the one with the lowest summed
final objective is kept (the authors average the batch losses of the last step and
keep the restart with the minimal one).

Work units are (restart, chunk): with the model fixed, running all steps on one chunk
before the next equals the authors' step-outer loop over fixed batches up to random
streams, and lets crafting resume after any chunk and shard the chunks over ranks.
Chunk k is always images k·batch_size … and draws from the stream of (restart, k), so
rank r crafting chunks r, r + world, … computes what one process computes for them;
the restarts' totals are summed over the ranks and the perturbations gathered once, at
the end: the store does not depend on the number of ranks (``ranks="invariant"``; on
GPUs up to what non-deterministic kernels change between any two runs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from poisonbench.attacks import crafting
from poisonbench.attacks.base import params_dict
from poisonbench.attacks.quantize import add_levels, round_linf
from poisonbench.attacks.surrogate import SurrogateRecipe, trained_model
from poisonbench.data.augment import translate_flip
from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import PoisonStore
from poisonbench.params import ranged

# A chunk's objective: built once per chunk from (model, clean images, labels, number of
# classes), then called on the (augmented) poisoned inputs with ``create_graph`` telling
# whether it will be differentiated w.r.t. the inputs. PGD descends it.
ChunkObjective = Callable[[torch.Tensor, bool], torch.Tensor]
ObjectiveFactory = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], ChunkObjective]


@dataclass(frozen=True)
class ChunkedPGDParams:
    """What every chunked-PGD attack takes; defaults from adversarial_poisons'
    ``village/options.py`` and forest's "conservative" training recipe."""

    eps: float = ranged(8 / 255, 0, 1, low_open=True)  # ℓ∞ radius, pixel units (--eps 8; shortcuts Table 2)
    steps: int = ranged(250, 1, None)  # --attackiter
    tau: float = ranged(0.05, 0, None, low_open=True)  # step size as a fraction of eps (--tau, PGD rule)
    restarts: int = ranged(8, 1, None)  # --restarts; the best (lowest final objective) is kept
    init: str = "randn"  # --init: randn (Gaussian · eps, then projected) | uniform
    augment: bool = True  # differentiable augmentation while crafting (--paugment)
    batch_size: int = ranged(512, 1, None)  # --pbatch
    model: str = "resnet18"  # crafting model (shortcuts paper, Appendix E; --net)
    model_params: dict = field(default_factory=dict)
    activation: str = "relu"  # relu | tanh (shortcuts Table 5)
    surrogate_epochs: int = ranged(40, 1, None)  # forest's "conservative" training recipe (SurrogateRecipe)
    surrogate_lr: float = ranged(0.1, 0, None, low_open=True)
    surrogate_batch_size: int = ranged(128, 1, None)

    def __post_init__(self) -> None:
        if self.init not in ("randn", "uniform"):
            raise ValueError(f"init must be randn or uniform, got {self.init!r}")
        if not 0 < self.eps <= 1:
            raise ValueError(f"eps must lie in (0, 1] (pixel units), got {self.eps}")
        if not self.tau > 0:
            raise ValueError(f"tau must be positive, got {self.tau}")
        for name in ("steps", "restarts", "batch_size", "surrogate_epochs", "surrogate_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def recipe(self) -> SurrogateRecipe:
        return SurrogateRecipe(epochs=self.surrogate_epochs, lr=self.surrogate_lr,
                               batch_size=self.surrogate_batch_size)


# Smoke runs (--fast-dev-run, registry tests): the same path with a tiny crafting model.
SMOKE = {"model": "small_cnn", "model_params": {"width": 4, "pool": 1}, "steps": 3, "restarts": 2,
         "batch_size": 32, "surrogate_epochs": 1, "surrogate_batch_size": 32}


def pgd_chunk(objective: ChunkObjective, x: torch.Tensor, params: ChunkedPGDParams,
              generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """All signed PGD steps descending ``objective`` on one chunk; returns δ and the
    chunk's objective after the last step (one more augmentation draw)."""
    step_size = params.tau * params.eps
    delta = crafting.random_start(tuple(x.shape), params.eps, "linf", generator, x.device, params.init)
    delta = crafting.project(delta, x, params.eps, "linf")
    for _ in range(params.steps):
        delta.requires_grad_(True)
        inputs = (x + delta).clamp(0.0, 1.0)
        if params.augment:
            inputs = translate_flip(inputs, generator=generator)
        (grad,) = torch.autograd.grad(objective(inputs, True), delta)
        delta = crafting.project(crafting.step(delta.detach(), grad, step_size, "linf", descend=True),
                                 x, params.eps, "linf")
    inputs = (x + delta).clamp(0.0, 1.0)
    if params.augment:
        inputs = translate_flip(inputs, generator=generator)
    final = float(objective(inputs, False).detach())
    return delta.detach(), final


def craft_by_chunks(imageset: ImageSet, params: ChunkedPGDParams, seed: int, device: torch.device,
                    name: str, make_objective: ObjectiveFactory,
                    parameter_gradients: bool = False) -> PoisonStore:
    """Restarts × chunks, each chunk's δ by ``pgd_chunk`` on the objective
    ``make_objective`` builds for it; the restart with the lowest summed final objective
    is kept. Resumable after any unit; sharded over ranks.

    ``parameter_gradients``: the objective differentiates w.r.t. the model's parameters
    (tensorclog, alignment), so they must require gradients; ``torch.autograd.grad``
    never writes their ``.grad``.
    """
    ctx = crafting.context()
    # Every rank trains (or reads) the crafting model, since Lightning's metrics sync over
    # the process group; rank 0's weights are then everyone's, so that non-deterministic
    # GPU kernels cannot leave the ranks attacking different models.
    model, _ = trained_model(imageset, params.model, params.model_params, params.activation,
                             params.recipe(), seed, device, progress=ctx.progress)
    crafting.broadcast_module(model)
    model.eval().requires_grad_(parameter_gradients)
    n, c = len(imageset), imageset.num_classes
    rank, world = crafting.rank_world()
    size = params.batch_size
    chunks = -(-n // size)  # K chunks of batch_size consecutive images, as on one rank
    rounds = -(-chunks // world)  # chunk k = j·world + rank is this rank's j-th
    mine = crafting.shard(n, size)  # the sample positions of this rank's chunks

    best = torch.zeros((mine.numel(), *imageset.images.shape[1:]))
    best_loss = float("inf")
    current = torch.zeros_like(best)
    current_loss, first = 0.0, 0
    checkpoint = crafting.Checkpoint(ctx.checkpoint, ctx.every_s)
    resumed = checkpoint.load()
    if resumed is not None:
        unit, tensors, extras = resumed
        best, current = tensors["best"], tensors["current"]
        best_loss, current_loss, first = float(extras["best_loss"]), float(extras["current_loss"]), unit + 1

    # Units are (restart, j), the same count on every rank, so that the collectives below
    # (restart totals, the checkpoint decision) line up even where a rank has no chunk j.
    total = params.restarts * rounds
    with crafting.progress(f"{name} chunks", total) as advance:
        advance(first)
        for unit in range(first, total):
            restart, j = divmod(unit, rounds)
            k = j * world + rank
            loss = None
            if k < chunks:
                index = torch.arange(k * size, min((k + 1) * size, n))
                x = imageset.images[index].to(device).float().div_(255)
                y = imageset.labels[index].to(device)
                # The stream of chunk k in this restart: what one rank would draw for it.
                gen = crafting.unit_generator(seed, restart * chunks + k, device)
                delta, loss = pgd_chunk(make_objective(model, x, y, c), x, params, gen)
                lo = j * size
                current[lo:lo + index.numel()] = delta.cpu()
                current_loss += loss
            if j == rounds - 1:  # restart finished: keep it if its total objective is the lowest
                total_loss = float(crafting.reduce_sum(torch.tensor([current_loss], dtype=torch.float64)))
                if total_loss < best_loss:
                    best, best_loss = current.clone(), total_loss
                current_loss = 0.0
            advance(1, loss)
            due = torch.tensor([int(checkpoint.due())])
            if int(crafting.reduce_sum(due)) > 0:  # every rank saves after the same unit
                checkpoint.save(unit, {"best": best, "current": current},
                                {"best_loss": best_loss, "current_loss": current_loss}, force=True)
            crafting.finish_unit(unit)

    levels = crafting.gather(round_linf(best, params.eps), n, size)
    store = PoisonStore(
        index=torch.arange(n, dtype=torch.int64), images=add_levels(imageset.images, levels),
        labels=imageset.labels.clone(), attack=name, params=params_dict(params),
        dataset=imageset.name, base_fingerprint=imageset.fingerprint, norm="linf", eps=params.eps, seed=seed,
    )
    checkpoint.remove()
    return store

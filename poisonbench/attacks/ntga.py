"""``ntga``: Neural Tangent Generalization Attacks (Yuan and Wu, ICML 2021, "Neural
Tangent Generalization Attacks"); the shortcuts paper's "NTGA" rows (Tables 1, 2, 4,
7; Figure 6), crafted there with "a 3-layer convolutional network" (Appendix E).

NTGA replaces the inner problem of the bi-level poisoning objective (the shortcuts
paper, Eq. 1: train on the poison, be bad on clean data) by its closed form under the
neural tangent kernel Θ: a wide network trained for time t by gradient descent on the
MSE to one-hot labels predicts, on clean validation images V (Lee et al., 2019),

    f_V(t) = Θ_VB Θ_BB⁻¹ (I − exp(−Θ_BB t / (n·C))) Y_B,

where B is the poisoned block of n training images with labels Y_B (C classes). NTGA
maximises the cross-entropy of f_V(t) against V's true labels over the perturbations
of B by projected sign-gradient ascent in the ℓ∞ ball of radius ε; the training set
is poisoned block by block (B-NTGA: blocks of ``block_size`` images, each with its own
Θ_BB, the authors' answer to the kernel's n² cost).

Defaults are the authors' code (github.com/lionelmessi6410/ntga, ``generate_attack.py``
and ``attacks/projected_gradient_descent.py``): ε = 8/255 for CIFAR-10, 10 iterations
of step 1.1·ε/10, zero start, block size 512, 10,000 validation images, the CNN
surrogate ``ConvGroup(2, 64, 5×5, stride 2, SAME) → Dense 384 → Dense 192 → Dense C``
(ReLU after each convolution only, as there) with W_std² = 1.76, b_std² = 0.18, the
``gradient_descent_mse`` predictor with ``diag_reg`` 1e-4 (relative to the mean of
Θ_BB's diagonal, as neural-tangents does), and t = 8.

Deviations, written down here and beside the code:
- Kernel: the *empirical* NTK of one finite-width, randomly initialised copy of the
  surrogate (``width`` channels), computed with ``torch.func`` (per-sample Jacobians
  J by ``vmap(jacrev)``, Θ = J Jᵀ), not the infinite-width analytical kernel of
  neural-tangents (no JAX here). The surrogate uses the NTK parameterisation
  (weights N(0, 1), scaled by W_std/√fan_in in the forward pass), so its kernel is on
  the scale of the analytical one and converges to it as the width grows: t keeps its
  meaning. The network has one output: the analytical kernel is Θ ⊗ I_C (the same
  kernel for every logit), and the one-output kernel is that Θ at finite width.
- t: the code's ``--t`` default is 64; 8 is the value its README (commented table of
  the best t per dataset and surrogate) lists for CIFAR-10 with the CNN surrogate,
  and the shortcuts paper used "the configuration that achieves the best attack
  performance on CIFAR-10" (Appendix E). ``t: null`` is t = ∞ (a linear solve).
- Steps: the authors' PGD loop passes the clean block and ε, not the current iterate
  and ``eps_iter``, to each fast-gradient step, so their code takes one sign step of
  size ε at the clean images, ``nb_iter`` times over. Here each of the ``nb_iter``
  steps is taken at the current iterate with size ``eps_iter`` (PGD as their
  docstrings and the paper describe it); ``nb_iter: 1, eps_iter: ε`` reproduces what
  their code computes.
- Validation set: the authors hold 10,000 training images out of the attack and
  poison the rest. Every training image is poisoned here, so each block draws its
  ``val_size`` clean validation images at random from the training images outside
  the block.
- Blocks: a seeded permutation cut into blocks; the authors drop the last partial
  block (``int(n / block_size)`` blocks), here it is poisoned too.
- Loss: the mean, not the sum, of the validation cross-entropy (the sign step does
  not see the scale). The kernel regression runs in float64 (the authors enable
  JAX's x64), the Jacobians in float32.
- Crafting runs on one device; blocks are independent and could be sharded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

from poisonbench.attacks import crafting
from poisonbench.attacks.base import params_dict, register_attack
from poisonbench.attacks.quantize import add_levels, round_linf
from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import PoisonStore
from poisonbench.errors import ConfigError
from poisonbench.params import ranged

# Unit numbers of the random streams that are not one block's: the block partition and
# the surrogate's weights (a block k uses unit_generator(seed, k)).
PARTITION_STREAM = 10**6
SURROGATE_STREAM = 10**6 + 1


@dataclass(frozen=True)
class NTGAParams:
    eps: float = ranged(8 / 255, 0, 1, low_open=True)  # ℓ∞ radius, pixel units (authors' generate_attack.py for cifar10)
    t: float | None = ranged(8.0, 0, None, low_open=True)  # training time of the predictor; None = ∞ (see the module docstring)
    nb_iter: int = ranged(10, 1, None)  # ascent steps per block (authors' --nb_iter)
    eps_iter: float | None = ranged(None, 0, 1, low_open=True)  # step size, pixel units; None: 1.1·eps/nb_iter (generate_attack.py)
    block_size: int = ranged(512, 1, None)  # images per block (authors' --block_size)
    val_size: int = ranged(10_000, 1, None)  # clean validation images per block (authors' --val_size)
    diag_reg: float = ranged(1e-4, 0, None)  # relative ridge on Θ_BB (authors' model_fn/adv_loss diag_reg)
    width: int = ranged(64, 1, None)  # channels of both convolutions (authors' ConvGroup(2, 64, ...))
    dense1: int = ranged(384, 1, None)  # the two linear layers after the convolutions (authors' surrogate_fn)
    dense2: int = ranged(192, 1, None)
    kernel_size: int = ranged(5, 1, None)  # authors' ConvBlock filter_shape (5, 5)
    stride: int = ranged(2, 1, None)  # authors' ConvGroup stride (2, 2) for MNIST/CIFAR-10
    w_std: float = ranged(math.sqrt(1.76), 0, None, low_open=True)  # authors' W_std (NTK parameterisation)
    b_std: float = ranged(math.sqrt(0.18), 0, None)  # authors' b_std
    chunk: int = ranged(256, 1, None)  # images per Jacobian piece: memory only (the result changes by float rounding)

    def __post_init__(self) -> None:
        if not 0 < self.eps <= 1:
            raise ValueError(f"eps must lie in (0, 1] (pixel units), got {self.eps}")
        if self.t is not None and not self.t > 0:
            raise ValueError(f"t must be positive or null (infinite time), got {self.t}")
        if self.eps_iter is not None and not 0 < self.eps_iter <= self.eps:
            raise ValueError(f"eps_iter must lie in (0, eps], got {self.eps_iter}")
        for name in ("nb_iter", "block_size", "val_size", "width", "dense1", "dense2", "kernel_size",
                     "stride", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.diag_reg < 0:
            raise ValueError(f"diag_reg must be non-negative, got {self.diag_reg}")

    @property
    def step_size(self) -> float:
        return self.eps_iter if self.eps_iter is not None else 1.1 * self.eps / self.nb_iter


# --------------------------------------------------------------------- the surrogate


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF/JAX 'SAME' padding of one side: output ceil(size/stride), extra pixel at the end."""
    out = _ceil_div(size, stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class NTKConv(nn.Module):
    """Convolution in the NTK parameterisation: weights and biases N(0, 1), the output
    W_std/√fan_in · (w ∗ x) + b_std · b (neural-tangents ``stax.Conv``), 'SAME' padding."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, w_std: float, b_std: float,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel, generator=generator))
        self.bias = nn.Parameter(torch.randn(cout, generator=generator))
        self.kernel, self.stride = kernel, stride
        self.w_scale, self.b_scale = w_std / math.sqrt(cin * kernel * kernel), b_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = _same_padding(x.shape[-2], self.kernel, self.stride)
        left, right = _same_padding(x.shape[-1], self.kernel, self.stride)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight * self.w_scale, self.bias * self.b_scale, stride=self.stride)


class NTKDense(nn.Module):
    """Linear layer in the NTK parameterisation (neural-tangents ``stax.Dense``)."""

    def __init__(self, fin: int, fout: int, w_std: float, b_std: float, generator: torch.Generator) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fout, fin, generator=generator))
        self.bias = nn.Parameter(torch.randn(fout, generator=generator))
        self.w_scale, self.b_scale = w_std / math.sqrt(fin), b_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.w_scale, self.bias * self.b_scale)


class NTGASurrogate(nn.Module):
    """The authors' CNN surrogate at finite width, with one output (see the module
    docstring): two conv-ReLU blocks, flatten, Dense, Dense, Dense(1); no nonlinearity
    between the dense layers, as in their ``surrogate_fn``."""

    def __init__(self, image_shape: tuple[int, int, int], params: NTGAParams, generator: torch.Generator) -> None:
        super().__init__()
        c, h, w = image_shape
        k, s, ws, bs = params.kernel_size, params.stride, params.w_std, params.b_std
        self.conv1 = NTKConv(c, params.width, k, s, ws, bs, generator)
        self.conv2 = NTKConv(params.width, params.width, k, s, ws, bs, generator)
        side_h, side_w = _ceil_div(_ceil_div(h, s), s), _ceil_div(_ceil_div(w, s), s)
        self.dense1 = NTKDense(params.width * side_h * side_w, params.dense1, ws, bs, generator)
        self.dense2 = NTKDense(params.dense1, params.dense2, ws, bs, generator)
        self.out = NTKDense(params.dense2, 1, ws, bs, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.out(self.dense2(self.dense1(x.flatten(1)))).squeeze(-1)


def build_surrogate(image_shape: tuple[int, int, int], params: NTGAParams, seed: int,
                    device: torch.device | str = "cpu") -> NTGASurrogate:
    """The surrogate with weights drawn from the seed's own stream (no global RNG)."""
    net = NTGASurrogate(image_shape, params, crafting.unit_generator(seed, SURROGATE_STREAM))
    return net.to(device).requires_grad_(False)


# ------------------------------------------------------------------ empirical NTK


def jacobian(net: nn.Module, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Per-sample parameter gradients of the scalar output, [n, P] (float32).

    Differentiable in ``x`` (``vmap(jacrev)`` under ordinary autograd), so a loss of
    the kernel can be back-propagated to the images.
    """
    params = {k: v.detach() for k, v in net.named_parameters()}

    def single(p: dict, xi: torch.Tensor) -> torch.Tensor:
        return functional_call(net, p, (xi.unsqueeze(0),)).squeeze(0)

    per_sample = vmap(jacrev(single), in_dims=(None, 0))
    pieces = []
    for start in range(0, x.shape[0], chunk):
        grads = per_sample(params, x[start:start + chunk])
        pieces.append(torch.cat([g.flatten(1) for g in grads.values()], dim=1))
    return torch.cat(pieces, dim=0)


def empirical_ntk(net: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None,
                  chunk: int = 256) -> torch.Tensor:
    """Θ(x1, x2) = J(x1) J(x2)ᵀ of the network's scalar output, float64 [n1, n2]."""
    j1 = jacobian(net, x1, chunk)
    j2 = j1 if x2 is None else jacobian(net, x2, chunk)
    return (j1 @ j2.T).double()


def _ridge(k_train: torch.Tensor, diag_reg: float) -> torch.Tensor:
    """Θ + diag_reg·(trace Θ / n)·I: neural-tangents' relative diagonal regulariser."""
    n = k_train.shape[0]
    scale = diag_reg * torch.diagonal(k_train).mean()
    return k_train + scale * torch.eye(n, dtype=k_train.dtype, device=k_train.device)


def kernel_coefficients(k_train: torch.Tensor, y_train: torch.Tensor, t: float | None,
                        diag_reg: float) -> torch.Tensor:
    """α with f_test(t) = Θ_test,train α: Θ⁻¹(I − exp(−Θ t/(n·C))) Y (``gradient_descent_mse``).

    Θ is regularised before both the exponential and the inverse, as neural-tangents
    does before its eigendecomposition; the matrix exponential (instead of their
    eigendecomposition) keeps gradients finite when eigenvalues coincide.
    """
    y = y_train.to(k_train.dtype)
    reg = _ridge(k_train, diag_reg)
    if t is None:
        return torch.linalg.solve(reg, y)
    n_outputs = y.numel()  # neural-tangents normalises time by y_train.size
    decay = torch.eye(reg.shape[0], dtype=reg.dtype, device=reg.device) - torch.linalg.matrix_exp(
        -reg * (float(t) / n_outputs))
    return torch.linalg.solve(reg, decay @ y)


def kernel_predict(k_train: torch.Tensor, k_test_train: torch.Tensor, y_train: torch.Tensor,
                   t: float | None, diag_reg: float) -> torch.Tensor:
    """The kernel-regression (NTK Gaussian-process mean) prediction at time t, [m, C]."""
    return k_test_train @ kernel_coefficients(k_train, y_train, t, diag_reg)


def validation_loss(net: nn.Module, x_block: torch.Tensor, y_block: torch.Tensor, x_val: torch.Tensor,
                    y_val: torch.Tensor, num_classes: int, params: NTGAParams) -> torch.Tensor:
    """Mean cross-entropy on ``x_val`` of the predictor trained on (``x_block``, ``y_block``)
    for time t: NTGA's objective, differentiable in ``x_block``.

    The validation Jacobians are computed ``chunk`` images at a time, without a graph
    (they do not depend on the block), so only the block's Jacobian is kept for the
    backward pass.
    """
    j_block = jacobian(net, x_block, params.chunk)
    k_block = (j_block @ j_block.T).double()
    alpha = kernel_coefficients(k_block, F.one_hot(y_block, num_classes), params.t, params.diag_reg)
    total = x_block.new_zeros((), dtype=torch.float64)
    for start in range(0, x_val.shape[0], params.chunk):
        with torch.no_grad():
            j_val = jacobian(net, x_val[start:start + params.chunk], params.chunk)
        logits = (j_val @ j_block.T).double() @ alpha
        total = total + F.cross_entropy(logits, y_val[start:start + params.chunk], reduction="sum")
    return total / x_val.shape[0]


def attack_block(net: nn.Module, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                 num_classes: int, params: NTGAParams) -> tuple[torch.Tensor, float]:
    """``nb_iter`` projected sign-ascent steps on the block's validation loss, from δ = 0
    (the authors' default: no random start). Returns δ and the final loss."""
    delta = torch.zeros_like(x)
    for _ in range(params.nb_iter):
        delta.requires_grad_(True)
        loss = validation_loss(net, (x + delta).clamp(0.0, 1.0), y, x_val, y_val, num_classes, params)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = crafting.project(crafting.step(delta.detach(), grad, params.step_size, "linf"), x,
                                 params.eps, "linf")
    with torch.no_grad():
        final = float(validation_loss(net, (x + delta).clamp(0.0, 1.0), y, x_val, y_val, num_classes, params))
    return delta, final


def blocks(n: int, block_size: int, seed: int) -> list[torch.Tensor]:
    """The seeded partition of the n training positions into blocks (the last may be short)."""
    order = torch.randperm(n, generator=crafting.unit_generator(seed, PARTITION_STREAM))
    return [order[i:i + block_size] for i in range(0, n, block_size)]


def validation_indices(n: int, block: torch.Tensor, val_size: int, seed: int, unit: int) -> torch.Tensor:
    """``val_size`` random training positions outside ``block`` (all of them if fewer)."""
    outside = torch.ones(n, dtype=torch.bool)
    outside[block] = False
    candidates = torch.nonzero(outside).squeeze(1)
    pick = torch.randperm(candidates.numel(), generator=crafting.unit_generator(seed, unit))[:val_size]
    return candidates[pick].sort().values


SMOKE = {"block_size": 32, "val_size": 16, "nb_iter": 2, "width": 4, "dense1": 16, "dense2": 8}


@register_attack("ntga", NTGAParams, smoke=SMOKE)
def craft(imageset: ImageSet, params: NTGAParams, seed: int, device: torch.device) -> PoisonStore:
    ctx = crafting.context()
    n, c = len(imageset), imageset.num_classes
    if n <= params.block_size:
        raise ConfigError(f"ntga draws each block's validation images from outside the block: block_size "
                          f"must be smaller than the training set ({n} images), got {params.block_size}")
    net = build_surrogate(tuple(imageset.images.shape[1:]), params, seed, device)
    parts = blocks(n, params.block_size, seed)

    delta = torch.zeros(imageset.images.shape, dtype=torch.float32)
    first = 0
    checkpoint = crafting.Checkpoint(ctx.checkpoint, ctx.every_s)
    resumed = checkpoint.load()
    if resumed is not None:
        unit, tensors, _ = resumed
        delta, first = tensors["delta"], unit + 1

    with crafting.progress("ntga blocks", len(parts)) as advance:
        advance(first)
        for unit in range(first, len(parts)):
            block = parts[unit]
            val = validation_indices(n, block, params.val_size, seed, unit)
            x = imageset.images[block].to(device).float().div_(255)
            y = imageset.labels[block].to(device)
            x_val = imageset.images[val].to(device).float().div_(255)
            y_val = imageset.labels[val].to(device)
            eta, loss = attack_block(net, x, y, x_val, y_val, c, params)
            delta[block] = eta.cpu()
            advance(1, loss)
            checkpoint.save(unit, {"delta": delta})
            crafting.finish_unit(unit)

    levels = round_linf(delta, params.eps)
    store = PoisonStore(
        index=torch.arange(n, dtype=torch.int64), images=add_levels(imageset.images, levels),
        labels=imageset.labels.clone(), attack="ntga", params=params_dict(params),
        dataset=imageset.name, base_fingerprint=imageset.fingerprint, norm="linf", eps=params.eps, seed=seed,
    )
    checkpoint.remove()
    return store

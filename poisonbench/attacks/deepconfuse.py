"""``deepconfuse``: DeepConfuse (Feng, Cai and Zhou, NeurIPS 2019, "Learning to Confuse:
Generating Training Time Adversarial Data with Auto-Encoder"); the shortcuts paper's
"DeepConfuse" rows (Tables 1, 2, 4, 7; Figure 2), crafted there with "an 8-layer
U-Net" (Appendix E).

An auto-encoder g (here a U-Net) maps an image x to its perturbation ε·tanh(g(x)), and
is trained so that a classifier trained on (x + ε·tanh(g(x)), y) does badly on clean
data. The paper approximates this bi-level problem by following the classifier's
training trajectory: while a classifier f_θ trains on the poison, every classifier
step is mirrored by a generator step through a one-step look-ahead,

    θ' = θ − lr·∇_θ CE(f_θ(x + ε·tanh(g(x))), y),     g ← g − Adam ∇_g [−CE(f_θ'(x), y)],

(the "pseudo-update" of the paper; the gradient flows into g through θ'). The
classifier itself trains on the output of a frozen copy of g from the previous
round; after ``cls_epochs`` passes over the data the copy takes g's weights and the
classifier starts again from a fresh random initialisation. The final generator
perturbs every training image once, in eval mode.

Defaults are the authors' CIFAR-10 code (github.com/kingfengji/DeepConfuse,
``CIFAR/train.py``): 1,000 rounds of 20 classifier epochs, batch 256, classifier SGD
with lr 0.01 (no momentum: their optimizer is built without it), generator Adam with
lr 1e-4, VGG-11 classifier, perturbation ε·tanh with ε = 0.032 there and 8/255 here
(the shortcuts paper's budget, Table 2).

Deviations, written down here and beside the code:
- Generator: the authors' ``CIFAR/models/unet.py`` is not in our reference copy of
  their repository; ``UNet8`` is the 8-layer U-Net the shortcuts paper names, in the
  pix2pix form (Isola et al. 2017): four stride-2 4×4 convolutions down (LeakyReLU
  0.2, batch norm but on the first), four stride-2 4×4 transposed convolutions up
  (ReLU, batch norm but on the last) with skip connections, tanh output, no dropout
  (so the generator is deterministic).
- Selection: the authors evaluate each round's generator by training a classifier
  from scratch on its output and keep the one with the lowest *test* accuracy; that
  uses the test set and a full training run per round, so the last generator is kept.
- A round's batch orders and its classifier's initial weights are drawn from the
  random stream of (seed, round) alone, so that a run resumed after round k computes
  what an uninterrupted run does (the authors' loader and initialisers run on one
  global stream). The last partial batch of an
  epoch is kept (the authors' loader keeps it too).
- The look-ahead runs the classifier with a copy of its batch-norm buffers: the
  authors' look-ahead is a fresh network with its own buffers, so the classifier's
  running statistics are untouched by it.
- Crafting runs on one device (the generator is shared by all images).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from poisonbench.attacks import crafting
from poisonbench.attacks.base import params_dict, register_attack
from poisonbench.attacks.quantize import add_levels, round_linf
from poisonbench.attacks.surrogate import build_crafting_model
from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import PoisonStore
from poisonbench.errors import ConfigError
from poisonbench.params import ranged

# Unit numbers of random streams that are not one round's: the generator's initial
# weights (round k's classifier and batch orders use unit_generator(seed, k)).
GENERATOR_STREAM = 10**6
DEPTH = 4  # down-sampling steps of UNet8: the image side must be a multiple of 2**DEPTH


@dataclass(frozen=True)
class DeepConfuseParams:
    eps: float = ranged(8 / 255, 0, 1, low_open=True)  # ℓ∞ radius, pixel units (shortcuts Table 2; authors' --eps 0.032)
    epochs: int = ranged(1000, 1, None)  # rounds: generator copies handed to a fresh classifier (authors' --epochs)
    cls_epochs: int = ranged(20, 1, None)  # classifier passes over the data per round (authors' --clsepochs)
    batch_size: int = ranged(256, 1, None)  # authors' --batch-size
    lr: float = ranged(0.01, 0, None, low_open=True)  # classifier SGD and the look-ahead step (authors' --lr; no momentum)
    lr_atk: float = ranged(1e-4, 0, None, low_open=True)  # generator Adam (authors' --lr-atk)
    model: str = "vgg11"  # classifier (authors' create_net: VGG11)
    model_params: dict = field(default_factory=dict)
    width: int = ranged(64, 1, None)  # channels of the U-Net's first layer (pix2pix ngf)

    def __post_init__(self) -> None:
        if not 0 < self.eps <= 1:
            raise ValueError(f"eps must lie in (0, 1] (pixel units), got {self.eps}")
        for name in ("epochs", "cls_epochs", "batch_size", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "lr_atk"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


# ---------------------------------------------------------------------- generator


def _down(cin: int, cout: int, norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 4, stride=2, padding=1, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.LeakyReLU(0.2))
    return nn.Sequential(*layers)


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class UNet8(nn.Module):
    """8-layer U-Net (4 down, 4 up, skip connections) from images in [0, 1] to [-1, 1]^(3×H×W).

    Channels w, 2w, 4w, 8w down; 4w, 2w, w, 3 up, each up-layer reading the
    concatenation of the previous up-layer and the mirrored down-layer.
    """

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        w = width
        self.down = nn.ModuleList([_down(3, w, norm=False), _down(w, 2 * w, True),
                                   _down(2 * w, 4 * w, True), _down(4 * w, 8 * w, True)])
        self.up = nn.ModuleList([_up(8 * w, 4 * w), _up(8 * w, 2 * w), _up(4 * w, w)])
        self.last = nn.ConvTranspose2d(2 * w, 3, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = x * 2 - 1  # centre the pixels: the first layer has no normalisation
        for layer in self.down:
            h = layer(h)
            skips.append(h)
        skips.pop()  # the bottleneck is h itself
        for layer in self.up:
            h = torch.cat([layer(h), skips.pop()], dim=1)
        return torch.tanh(self.last(h))


def perturb(generator: nn.Module, x: torch.Tensor, eps: float) -> torch.Tensor:
    """x + ε·g(x), clipped to [0, 1] (authors: ``clamp(data + atkmodel(data) * eps, 0, 1)``)."""
    return (x + eps * generator(x)).clamp(0.0, 1.0)


def _stream_seed(seed: int, unit: int) -> int:
    """A global-RNG seed for the modules' own initialisers, a function of (seed, unit) only."""
    return int(crafting.unit_generator(seed, unit).initial_seed())


def build_generator(width: int, seed: int, device: torch.device | str = "cpu") -> UNet8:
    """The U-Net with PyTorch's default initialisation, drawn from the seed's own stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_stream_seed(seed, GENERATOR_STREAM))
        net = UNet8(width)
    return net.to(device)


def _classifier(params: DeepConfuseParams, num_classes: int, seed: int, unit: int,
                device: torch.device) -> nn.Module:
    """Round ``unit``'s freshly initialised classifier, its weights a function of (seed, unit)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_stream_seed(seed, unit))
        model = build_crafting_model(params.model, num_classes, params.model_params)
    return model.to(device).train()


# -------------------------------------------------------------------------- rounds


def lookahead_step(generator: nn.Module, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   params: DeepConfuseParams) -> torch.Tensor:
    """The generator's loss through one look-ahead SGD step of the classifier on its
    poison: −CE(f_θ'(x), y) with θ' = θ − lr·∇_θ CE(f_θ(x + ε·g(x)), y). Differentiable
    in the generator's weights (the classifier's gradient keeps its graph)."""
    names = [name for name, _ in classifier.named_parameters()]
    weights = [p for _, p in classifier.named_parameters()]
    loss = F.cross_entropy(classifier(perturb(generator, x, params.eps)), y)
    grads = torch.autograd.grad(loss, weights, create_graph=True)
    ahead = {name: w - params.lr * g for name, w, g in zip(names, weights, grads)}
    # A copy of the buffers: the authors' look-ahead is a separate network (see the docstring).
    ahead.update({name: b.clone() for name, b in classifier.named_buffers()})
    return -F.cross_entropy(functional_call(classifier, ahead, (x,)), y)


def train_round(generator: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                labels: torch.Tensor, params: DeepConfuseParams, num_classes: int, seed: int, unit: int,
                device: torch.device) -> float:
    """One round: a fresh classifier trains ``cls_epochs`` epochs on the frozen copy's
    poison while the generator follows it by look-ahead steps. Returns the classifier's
    mean training loss over the round."""
    frozen = copy.deepcopy(generator).eval().requires_grad_(False)
    classifier = _classifier(params, num_classes, seed, unit, device)
    cls_optimizer = torch.optim.SGD(classifier.parameters(), lr=params.lr)
    gen_weights = list(generator.parameters())
    gen = crafting.unit_generator(seed, unit)
    n, losses = images.shape[0], []
    generator.train()
    for _ in range(params.cls_epochs):
        order = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, params.batch_size):
            index = order[start:start + params.batch_size]
            x, y = images[index], labels[index]
            # 1. the generator: make the classifier's next step hurt clean accuracy.
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(lookahead_step(generator, classifier, x, y, params), inputs=gen_weights)
            optimizer.step()
            # 2. the classifier: one SGD step on the frozen copy's poison.
            with torch.no_grad():
                poisoned = perturb(frozen, x, params.eps)
            cls_optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(classifier(poisoned), y)
            loss.backward()
            cls_optimizer.step()
            losses.append(loss.detach())  # read once at the end: no host sync per step
    # Each float32 loss as a Python float, summed in order: the sum a per-step float() gave.
    values = torch.stack(losses).tolist() if losses else []
    return sum(values) / max(len(values), 1)


@torch.no_grad()
def generate(generator: nn.Module, images: torch.Tensor, eps: float, batch_size: int) -> torch.Tensor:
    """δ = clip(x + ε·g(x)) − x for every image, the generator in eval mode."""
    generator.eval()
    out = torch.empty_like(images)
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size]
        out[start:start + batch_size] = perturb(generator, x, eps) - x
    return out


SMOKE = {"epochs": 2, "cls_epochs": 1, "batch_size": 64, "width": 4, "model": "small_cnn",
         "model_params": {"width": 4, "pool": 1}}


@register_attack("deepconfuse", DeepConfuseParams, smoke=SMOKE)
def craft(imageset: ImageSet, params: DeepConfuseParams, seed: int, device: torch.device) -> PoisonStore:
    ctx = crafting.context()
    n, c = len(imageset), imageset.num_classes
    height, width = imageset.images.shape[-2:]
    if height % 2**DEPTH or width % 2**DEPTH:
        raise ConfigError(f"deepconfuse's U-Net needs image sides that are multiples of {2**DEPTH}, "
                          f"got {height}×{width}")
    images = imageset.images.to(device).float().div_(255)
    labels = imageset.labels.to(device)
    generator = build_generator(params.width, seed, device)
    optimizer = torch.optim.Adam(generator.parameters(), lr=params.lr_atk)

    # What one round hands to the next: the generator (weights and batch-norm buffers)
    # and its Adam moments. The classifier is not carried over: every round starts a
    # fresh one (the authors' ``clsmodel = create_net()`` after each round).
    first = 0
    checkpoint = crafting.Checkpoint(ctx.checkpoint, ctx.every_s)
    resumed = checkpoint.load()
    if resumed is not None:
        unit, tensors, _ = resumed
        # load_state_dict moves the tensors to the weights' device (Adam's step stays on the CPU).
        crafting.load_module_tensors(generator, tensors, "generator")
        crafting.load_optimizer_tensors(optimizer, tensors, "adam")
        first = unit + 1

    with crafting.progress("deepconfuse rounds", params.epochs) as advance:
        advance(first)
        for unit in range(first, params.epochs):
            loss = train_round(generator, optimizer, images, labels, params, c, seed, unit, device)
            advance(1, loss)
            checkpoint.save(unit, {**crafting.module_tensors(generator, "generator"),
                                   **crafting.optimizer_tensors(optimizer, "adam")})
            crafting.finish_unit(unit)

    delta = generate(generator, images, params.eps, params.batch_size).cpu()
    levels = round_linf(delta, params.eps)
    store = PoisonStore(
        index=torch.arange(n, dtype=torch.int64), images=add_levels(imageset.images, levels),
        labels=imageset.labels.clone(), attack="deepconfuse", params=params_dict(params),
        dataset=imageset.name, base_fingerprint=imageset.fingerprint, norm="linf", eps=params.eps, seed=seed,
    )
    checkpoint.remove()
    return store

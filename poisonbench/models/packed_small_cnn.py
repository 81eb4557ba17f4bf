"""PackedSmallCNN: T trials of the small CNN trained in one pass, each exactly as alone.

Several trials of one small model (``small_cnn``, the cpu profile's victim) are too
small to keep a device busy one at a time. Packed, the T trials' channels sit side by
side in one tensor ``[B, T·C, H, W]`` (trial-major) and each layer runs once for all:

- the first convolution, per trial (a loop of T calls): its 3 input channels per
  group are too few for the grouped kernel to repeat the lone kernel's sums (below);
- the middle convolutions as one grouped convolution (``groups = T``): trial t's
  output channels see only trial t's input channels, with the weights of the T
  trials concatenated, so the arithmetic per output is the lone convolution's;
- BatchNorm as one BatchNorm over T·C channels: batch norm is per channel already,
  so trial t's statistics are over its own B images; the running mean and variance
  of the T trials are concatenated for the call and written back to each trial's
  own buffers, and each trial counts its own ``num_batches_tracked``;
- ReLU, max-pool and the average pool act per channel: one call for all trials;
- the head (``nn.Linear``), per trial, on that trial's contiguous features.

The packed module owns no parameters of its own: it holds the T ordinary models
(``ImageClassifier`` with a ``SmallCNN`` backbone, what ``small_cnn`` builds) and
concatenates their weights in every forward, so an optimizer over
``packed.parameters()`` updates the same T×n tensors that T separate optimizers
would, element by element, and ``unpack()`` hands back ordinary models.

Exactness (same floats as separate training: weights, running statistics, logits) is
a property of the kernels, not of the maths, so it was measured. On the CPU
(torch 2.14, oneDNN 3.12, AVX-512), with one intra-op thread (``CPU_JOB_THREADS``, the
jobs' setting): forward of every layer exact; backward of the grouped convolution
exact with ≥ 16 input channels per group (measured: 16, 20, 24, 32, 40, 48, 64) and
not with 3, 4, 8 or 12 (its weight gradient differs in the last bits); BatchNorm
packed exactly at every width tried. With two threads the grouped weight gradient
differs at 16-64 channels per group, so a packed run is exact only at one thread.
Hence ``grouped=None`` groups the middle convolutions only when ``width`` ≥
``MIN_GROUP_CHANNELS`` and otherwise runs them per trial (exact, no faster).
tests/test_packed_small_cnn.py trains three trials on digits both ways and compares.
On a GPU nothing here is checked for bit-identity (cuDNN picks its algorithms).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from poisonbench.errors import ConfigError
from poisonbench.models.classifier import ImageClassifier, Stats
from poisonbench.models.small_cnn import SmallCNN, small_cnn

# Input channels per group from which the grouped convolution's backward repeats the
# lone convolution's sums on the CPU at one thread (see the module docstring).
MIN_GROUP_CHANNELS = 16


class PackedSmallCNN(nn.Module):
    """T small_cnn models run as one: ``forward`` maps ``[T, B, 3, H, W]`` images in [0, 1]
    to ``[T, B, classes]`` logits, trial t's images through trial t's model.

    ``models`` must share width, pool and classes; ``grouped`` runs the middle
    convolutions as one grouped convolution (``None``: when each trial's convolutions
    have ≥ ``MIN_GROUP_CHANNELS`` input channels, where it is exact on the CPU).
    """

    def __init__(self, models: Sequence[ImageClassifier], grouped: bool | None = None) -> None:
        super().__init__()
        if len(models) < 1:
            raise ConfigError("PackedSmallCNN needs at least one model")
        first = models[0]
        for model in models:
            if not isinstance(model, ImageClassifier) or not isinstance(model.backbone, SmallCNN):
                raise ConfigError(f"PackedSmallCNN packs small_cnn models; got {type(model).__name__}")
            if _shape(model) != _shape(first):
                raise ConfigError(f"PackedSmallCNN packs models of one shape; got {_shape(model)} and {_shape(first)}")
            if not (torch.equal(model.normalize.mean, first.normalize.mean)
                    and torch.equal(model.normalize.std, first.normalize.std)
                    and model.normalize.size == first.normalize.size):
                raise ConfigError("PackedSmallCNN packs models with one normalization")
        self.trials = nn.ModuleList(models)
        layers = first.backbone.layers
        for layer in layers:
            if not isinstance(layer, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d)):
                raise TypeError(f"PackedSmallCNN cannot pack a {type(layer).__name__} layer")
            if isinstance(layer, nn.BatchNorm2d) and not (layer.affine and layer.track_running_stats):
                raise TypeError("PackedSmallCNN packs BatchNorm layers with affine weights and running statistics")
        convs = [layer for layer in layers if isinstance(layer, nn.Conv2d)]
        if grouped is None:
            grouped = all(conv.in_channels >= MIN_GROUP_CHANNELS for conv in convs[1:])
        self.grouped = bool(grouped)

    @classmethod
    def from_state_dicts(cls, state_dicts: Sequence[Mapping[str, torch.Tensor]], num_classes: int, *,
                         width: int = 32, pool: int = 2, mean: Stats = None, std: Stats = None,
                         grouped: bool | None = None) -> PackedSmallCNN:
        """Pack models built by ``small_cnn(num_classes, width=, pool=, mean=, std=)`` with these weights."""
        models = []
        for state in state_dicts:
            model = small_cnn(num_classes, width=width, pool=pool, mean=mean, std=std)
            model.load_state_dict(state)
            models.append(model)
        return cls(models, grouped=grouped)

    @classmethod
    def from_seeds(cls, seeds: Sequence[int], num_classes: int, *, width: int = 32, pool: int = 2,
                   mean: Stats = None, std: Stats = None, grouped: bool | None = None) -> PackedSmallCNN:
        """Pack fresh models, trial t's initialised as ``torch.manual_seed(seeds[t])`` followed by
        ``small_cnn(...)`` would; the global random state is left as it was."""
        models = []
        for seed in seeds:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                models.append(small_cnn(num_classes, width=width, pool=pool, mean=mean, std=std))
        return cls(models, grouped=grouped)

    @property
    def num_trials(self) -> int:
        return len(self.trials)

    def unpack(self) -> list[ImageClassifier]:
        """Copies of the T models as they are now (weights, running statistics, train/eval mode)."""
        return [copy.deepcopy(model) for model in self.trials]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.num_trials
        if x.dim() != 5 or x.shape[0] != t:
            raise ValueError(f"PackedSmallCNN of {t} trials takes [{t}, B, C, H, W] images; got {list(x.shape)}")
        stacks = [model.backbone.layers for model in self.trials]
        h = None
        for i, layer in enumerate(stacks[0]):
            same = [stack[i] for stack in stacks]
            if isinstance(layer, nn.Conv2d):
                h = self._conv(x, same) if h is None else self._conv_packed(h, same)
            elif isinstance(layer, nn.BatchNorm2d):
                h = self._batch_norm(h, same)
            else:  # ReLU, max-pool, average pool: per channel, parameter-free
                h = layer(h)
        # SmallCNN flattens [B, C, p, p] channel-major; each trial's slice gets the same
        # order and a contiguous copy, so its head multiplies the same memory layout.
        features = h.split(h.shape[1] // t, dim=1)
        logits = [model.head(f.flatten(1).contiguous()) for model, f in zip(self.trials, features)]
        return torch.stack(logits)

    def _conv(self, x: torch.Tensor, convs: list[nn.Conv2d]) -> torch.Tensor:
        """The first convolution, per trial, on each trial's normalized images (as SmallCNN.forward)."""
        outs = [conv(model.normalize(images).contiguous(memory_format=torch.channels_last))
                for model, conv, images in zip(self.trials, convs, x.unbind(0))]
        return torch.cat(outs, dim=1).contiguous(memory_format=torch.channels_last)

    def _conv_packed(self, h: torch.Tensor, convs: list[nn.Conv2d]) -> torch.Tensor:
        c = convs[0]
        if not self.grouped:
            parts = h.split(c.in_channels, dim=1)
            outs = [conv(part.contiguous(memory_format=torch.channels_last)) for conv, part in zip(convs, parts)]
            return torch.cat(outs, dim=1).contiguous(memory_format=torch.channels_last)
        weight = torch.cat([conv.weight for conv in convs])
        bias = None if c.bias is None else torch.cat([conv.bias for conv in convs])
        return F.conv2d(h, weight, bias, c.stride, c.padding, c.dilation, c.groups * len(convs))

    def _batch_norm(self, h: torch.Tensor, norms: list[nn.BatchNorm2d]) -> torch.Tensor:
        """One batch norm over the T trials' channels, as ``nn.BatchNorm2d.forward`` does per trial."""
        n = norms[0]
        momentum = 0.0 if n.momentum is None else n.momentum
        if self.training:
            for norm in norms:
                norm.num_batches_tracked.add_(1)
            if n.momentum is None:  # cumulative average, as BatchNorm2d with momentum=None
                momentum = 1.0 / float(n.num_batches_tracked)
        mean = torch.cat([norm.running_mean for norm in norms])
        var = torch.cat([norm.running_var for norm in norms])
        out = F.batch_norm(h, mean, var, torch.cat([norm.weight for norm in norms]),
                           torch.cat([norm.bias for norm in norms]), self.training, momentum, n.eps)
        if self.training:  # F.batch_norm updated the concatenated copies in place
            with torch.no_grad():
                for norm, m, v in zip(norms, mean.split(n.num_features), var.split(n.num_features)):
                    norm.running_mean.copy_(m)
                    norm.running_var.copy_(v)
        return out


def packed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Trial t's mean cross-entropy of ``logits[t]`` ([T, B, classes]) against ``labels[t]``
    ([T, B]), as a [T] tensor; its sum back-propagates each trial's own loss (gradient 1)."""
    return torch.stack([F.cross_entropy(out, target) for out, target in zip(logits, labels)])


def _shape(model: ImageClassifier) -> tuple:
    layers = model.backbone.layers
    return (tuple((type(layer).__name__, getattr(layer, "in_channels", getattr(layer, "num_features", None)))
                  for layer in layers), model.feature_dim, model.num_classes)

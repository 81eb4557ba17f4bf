"""Batched data augmentation on the batch's device: random crop with zero padding
and horizontal flip (the standard CIFAR recipe of both papers).

One gather does crop and flip for the whole batch, on uint8 or float tensors, so it
runs where the batch already is (``on_after_batch_transfer``) and is differentiable
with respect to float inputs (crafting attacks can back-propagate through it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_flip_indices(n: int, size: int, padding: int, generator: torch.Generator | None,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices into the padded images, [n, size] each."""
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=device)
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    ar = torch.arange(size, device=device)
    rows = offsets[0, :, None] + ar
    cols = offsets[1, :, None] + torch.where(flip[:, None], size - 1 - ar, ar)
    return rows, cols


def random_crop_flip(images: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop of the original size from the zero-padded image, then a 50% flip."""
    n, c, h, w = images.shape
    if h != w:
        raise ValueError(f"random_crop_flip expects square images, got {h}×{w}")
    padded = F.pad(images, (padding,) * 4)
    rows, cols = crop_flip_indices(n, h, padding, generator, images.device)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → float in [0, 1] (pixel space; normalisation is the model's job)."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def translate_flip(images: torch.Tensor, max_shift: int = 4, generator: torch.Generator | None = None,
                   flip: bool = True) -> torch.Tensor:
    """Differentiable augmentation for crafting: a random translation of up to
    ``max_shift`` pixels per axis (continuous, bilinear, zeros coming in as in zero
    padding) and a 50% horizontal flip, through ``grid_sample``.

    This is the augmentation attacks back-propagate through while crafting (Geiping
    et al. 2021 / Fowl et al. 2021b, "differentiable data augmentation"): the gradient
    reaches every pixel that was moved, not only a gathered subset.
    """
    shifts, flips = translate_flip_draws(images.shape[0], max_shift, generator, images.device, flip)
    return translate_flip_apply(images, shifts, flips)


def translate_flip_draws(n: int, max_shift: int = 4, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu", flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``translate_flip`` draws for a batch of ``n``: shifts [n, 2] in pixels and flips
    [n] (bool), on ``device``. A rank that holds some rows of a batch draws for the whole
    batch and applies its rows' draws (``translate_flip_apply``), so each image moves as it
    does when one process augments the batch."""
    # Drawn where the generator lives (a unit's CPU stream may drive a GPU batch), then moved.
    draw = generator.device if generator is not None else device
    shifts = ((torch.rand(n, 2, generator=generator, device=draw) * 2 - 1) * max_shift).to(device)
    flips = (torch.rand(n, generator=generator, device=draw) < 0.5).to(device) if flip \
        else torch.zeros(n, dtype=torch.bool, device=device)
    return shifts, flips


def translate_flip_apply(images: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """``images`` translated by ``shifts`` and flipped where ``flips`` (one row each)."""
    n, _, h, w = images.shape
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = torch.where(flips, -1.0, 1.0)
    theta[:, 1, 1] = 1.0
    # affine_grid works in [-1, 1] coordinates: a shift of s pixels is 2s / size.
    theta[:, 0, 2] = shifts[:, 0] * 2 / w
    theta[:, 1, 2] = shifts[:, 1] * 2 / h
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

"""SimCLR's random views, drawn independently for every image of a batch on its device.

The augmentation of SimCLR (Chen et al., 2020, Section 3 and Appendix A) for 32×32
images (Appendix B.9: CIFAR-10 drops the Gaussian blur): a random resized crop
(scale 0.08–1, aspect ratio 3/4–4/3, resized back with bilinear interpolation), a
horizontal flip with probability 0.5, colour jitter of strength s = 0.5 (brightness,
contrast and saturation factors in [1 − 0.8s, 1 + 0.8s] = [0.6, 1.4], hue shift in
[−0.2s, 0.2s] = [−0.1, 0.1], the four in a random order) applied with probability
0.8, and a grayscale conversion with probability 0.2.

Why not ``torchvision.transforms.v2`` on the batch: v2 draws one set of parameters
per call, so a whole batch would share one crop and one jitter, and SimCLR's
negatives would be augmented alike. Calling v2 once per image is correct but slow:
for 256 CIFAR-sized images on one CPU thread (torch 2.15, a loaded machine, best of
several runs) the v2 pipeline per image took 0.49 s, ``random_view`` below 0.064 s
(v2 once on the whole batch, wrong as said, 0.019 s); on a GPU the batched form is a
few dozen kernel launches per batch. So each operation is written here once,
batched, with per-image parameters; each follows the definition of its torchvision
counterpart (``resized_crop`` with bilinear interpolation, ``adjust_brightness`` …
``adjust_hue``, ``rgb_to_grayscale``, ColorJitter's random order) and
tests/test_pretrain.py checks the batched results against torchvision image by
image. Inputs and outputs are float N×3×H×W in [0, 1] (pixel space).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# ITU-R 601-2 luma, the weights of torchvision's rgb_to_grayscale.
LUMA = (0.2989, 0.587, 0.114)


@dataclass(frozen=True)
class ViewParams:
    """SimCLR's augmentation for 32×32 images (Chen et al., 2020, Appendix A and B.9)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)  # Inception crop: area fraction of the image
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range of the crop
    flip_p: float = 0.5
    brightness: float = 0.4  # 0.8 × strength 0.5 (CIFAR-10's strength, Appendix B.9)
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1  # 0.2 × strength 0.5
    jitter_p: float = 0.8
    grayscale_p: float = 0.2


# ---------------------------------------------------------------- crop and flip
def crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
               device: torch.device, attempts: int = 10) -> torch.Tensor:
    """[n, 4] integer boxes (top, left, h, w), one per image, drawn as torchvision's
    RandomResizedCrop draws them: up to ``attempts`` tries of an area fraction in
    ``scale`` and a log-uniform aspect ratio in ``ratio``; the first box that fits
    wins, else the largest centred box of an allowed aspect ratio."""
    area = height * width
    target = area * torch.empty(n, attempts, device=device).uniform_(scale[0], scale[1])
    log_ratio = torch.empty(n, attempts, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fitting try
    found = fits.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    # Fallback (rare: no try fitted): a centred crop, as wide as the aspect ratios allow.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    u = torch.rand(n, 2, device=device)
    top = torch.floor(u[:, 0] * (height - h + 1))
    left = torch.floor(u[:, 1] * (width - w + 1))
    top = torch.where(found, top, torch.full_like(top, (height - fh) // 2))
    left = torch.where(found, left, torch.full_like(left, (width - fw) // 2))
    return torch.stack([top, left, h, w], dim=1).long()


def _axis(start: torch.Tensor, length: torch.Tensor, size: int):
    """Bilinear sampling positions along one axis: for each output pixel the two source
    indices and the weight of the second, as ``F.interpolate(mode="bilinear",
    align_corners=False)`` computes them inside the crop [start, start + length)."""
    scale = length.to(torch.float32)[:, None] / size
    out = torch.arange(size, device=start.device, dtype=torch.float32)[None, :]
    src = ((out + 0.5) * scale - 0.5).clamp(min=0)
    lo = src.floor()
    weight = src - lo
    lo = lo.long()
    hi = torch.minimum(lo + 1, length[:, None] - 1)
    return start[:, None] + lo, start[:, None] + hi, weight


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Each image's box (top, left, h, w) resized to size×size (bilinear), then mirrored
    left-right where ``flip`` is true. Boxes lie inside the image and are at most
    ``size`` on a side here, so the resize never shrinks and needs no antialiasing."""
    n, c, height, width = images.shape
    row_lo, row_hi, row_w = _axis(boxes[:, 0], boxes[:, 2], size)
    col_lo, col_hi, col_w = _axis(boxes[:, 1], boxes[:, 3], size)
    if flip is not None:
        mirrored = flip[:, None]
        col_lo = torch.where(mirrored, col_lo.flip(1), col_lo)
        col_hi = torch.where(mirrored, col_hi.flip(1), col_hi)
        col_w = torch.where(mirrored, col_w.flip(1), col_w)

    def rows(index: torch.Tensor) -> torch.Tensor:  # [n, c, size, width]
        return images.gather(2, index[:, None, :, None].expand(n, c, size, width))

    ry = row_w[:, None, :, None]
    by_rows = rows(row_lo) * (1 - ry) + rows(row_hi) * ry

    def cols(index: torch.Tensor) -> torch.Tensor:  # [n, c, size, size]
        return by_rows.gather(3, index[:, None, None, :].expand(n, c, size, size))

    rx = col_w[:, None, None, :]
    return cols(col_lo) * (1 - rx) + cols(col_hi) * rx


# ------------------------------------------------------------------------ colour
def grayscale(images: torch.Tensor) -> torch.Tensor:
    """N×1×H×W luma of N×3×H×W RGB."""
    r, g, b = images.unbind(dim=1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * images + (1 - f) * other).clamp(0, 1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * factor.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # Blends with the image's mean luma, a per-image constant.
    mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, grayscale(images), factor)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """Hue in [0, 1) (0 for grays), saturation, value; channels on dim 1."""
    r, g, b = images.unbind(dim=1)
    value, _ = images.max(dim=1)
    chroma = value - images.min(dim=1).values
    gray = chroma == 0
    safe_chroma = torch.where(gray, torch.ones_like(chroma), chroma)
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)), torch.zeros_like(value))
    # The hue sextant depends on which channel is largest (red wins ties, then green).
    hue_r = ((g - b) / safe_chroma) % 6
    hue_g = (b - r) / safe_chroma + 2
    hue_b = (r - g) / safe_chroma + 4
    hue = torch.where(value == r, hue_r, torch.where(value == g, hue_g, hue_b)) / 6
    hue = torch.where(gray, torch.zeros_like(hue), hue)
    return torch.stack([hue, saturation, value], dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rgb_to_hsv``: channel n in (5, 3, 1) is v − v·s·clamp(min(k, 4 − k), 0, 1)
    with k = (n + 6h) mod 6 (the piecewise-linear form of the hexcone)."""
    hue, saturation, value = hsv.unbind(dim=1)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (n + 6 * hue) % 6
        ramp = torch.minimum(k, 4 - k).clamp(0, 1)
        channels.append(value - value * saturation * ramp)
    return torch.stack(channels, dim=1)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift`` turns (in [−0.5, 0.5])."""
    hsv = rgb_to_hsv(images)
    hue = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
    return hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1)).clamp(0, 1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter per image: ``factors`` [n, 4] (brightness, contrast,
    saturation, hue shift), ``order`` [n, 4] a permutation of the four operations,
    ``apply`` [n] bool (others pass through untouched)."""
    out = images
    for slot in range(4):
        for op, fn in enumerate(JITTER_OPS):
            chosen = torch.nonzero(apply & (order[:, slot] == op)).squeeze(1)
            if chosen.numel():
                out = out.index_copy(0, chosen, fn(out.index_select(0, chosen), factors.index_select(0, chosen)[:, op]))
    return out


def random_grayscale(images: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    gray = grayscale(images).expand_as(images)
    return torch.where(apply.view(-1, 1, 1, 1), gray, images)


# ---------------------------------------------------------------------- the view
def jitter_factors(n: int, params: ViewParams, device: torch.device) -> torch.Tensor:
    """[n, 4]: brightness, contrast, saturation factors uniform in [1 − x, 1 + x], hue shift uniform in [−h, h]."""
    u = torch.rand(n, 4, device=device) * 2 - 1  # uniform in [−1, 1]
    spread = torch.tensor([params.brightness, params.contrast, params.saturation, params.hue], device=device)
    offset = torch.tensor([1.0, 1.0, 1.0, 0.0], device=device)
    return offset + u * spread


def random_view(images: torch.Tensor, params: ViewParams = ViewParams()) -> torch.Tensor:
    """One SimCLR view of every image of a float N×3×H×W batch in [0, 1] (square
    images), with parameters drawn independently per image from the global RNG of
    the batch's device."""
    n, _, height, width = images.shape
    if height != width:
        raise ValueError(f"random_view expects square images, got {height}×{width}")
    device = images.device
    boxes = crop_boxes(n, height, width, params.crop_scale, params.crop_ratio, device)
    flip = torch.rand(n, device=device) < params.flip_p
    out = resized_crop(images, boxes, height, flip)
    factors = jitter_factors(n, params, device)
    order = torch.argsort(torch.rand(n, 4, device=device), dim=1)  # a random permutation per image
    apply = torch.rand(n, device=device) < params.jitter_p
    out = color_jitter(out, factors, order, apply)
    return random_grayscale(out, torch.rand(n, device=device) < params.grayscale_p)

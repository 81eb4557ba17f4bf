"""From a float perturbation to the uint8 images a victim downloads, inside the budget.

Clean pixels are integers k/255, so round(clean + δ) = clean + round(δ): perturbations
are rounded to whole pixel levels before they are added, in int16, and never exceed
their declared ℓ∞ or ℓ2 budget after rounding (clipping to [0, 255] only shrinks them).
"""
from __future__ import annotations

import torch


def round_l2(delta: torch.Tensor, radius: float, weight: float = 1.0, max_iter: int = 8) -> torch.Tensor:
    """Round rows of ``delta`` (pixel units) to int16 levels whose image ℓ2 norm stays ≤ radius.

    ``weight`` is how many pixels each value covers (p² when a value fills a p×p patch).
    Rows that rounding pushed over the sphere are shrunk by their excess and rounded
    again; what is still over after ``max_iter`` is rounded toward zero, which can
    only shrink it.
    """
    limit = radius * 255
    scaled = delta * 255
    levels = torch.round(scaled)
    for _ in range(max_iter):
        norms = levels.flatten(1).norm(dim=1) * weight ** 0.5
        over = norms > limit
        if not bool(over.any()):
            break
        shrink = (limit / norms[over]).view(-1, *([1] * (delta.ndim - 1))) * (1 - 1e-4)
        scaled[over] = scaled[over] * shrink
        levels[over] = torch.round(scaled[over])
    norms = levels.flatten(1).norm(dim=1) * weight ** 0.5
    over = norms > limit
    if bool(over.any()):
        levels[over] = torch.trunc(scaled[over])
    return levels.to(torch.int16)


def add_levels(clean: torch.Tensor, levels: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """clamp(clean + levels, 0, 255) as uint8; ``levels`` may broadcast (patch views).

    Works in chunks of images so the int16 temporaries stay in cache (about 3× faster
    than one pass over a whole CIFAR-sized set).
    """
    out = torch.empty_like(clean)
    for start in range(0, clean.shape[0], chunk):
        part = slice(start, start + chunk)
        lv = levels[part] if levels.shape[0] == clean.shape[0] else levels
        acc = clean[part].to(torch.int16)
        acc += lv
        out[part] = acc.clamp_(0, 255)
    return out


def round_linf(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Round ``delta`` (pixel units) to int16 levels within the ℓ∞ budget ``eps``.

    Levels keep their sign: they are added to the uint8 images in int16 by
    ``add_levels``. (Casting a negative perturbation to uint8 before adding it wraps
    it around to a large positive one, a known pitfall of unlearnable-examples code.)
    """
    bound = int(eps * 255 + 1e-6)
    return torch.round(delta * 255).clamp_(-bound, bound).to(torch.int16)

"""Batched data augmentation on tensors: random crops with padding and horizontal flips.

Everything works on whole (B, C, H, W) batches (no per-image Python loop) and draws its randomness from an
explicit CPU ``torch.Generator``. Images are already normalised when they arrive here, so "zero padding"
means padding with the normalised value of a black pixel (``fill`` = -mean/std per channel), as padding the
raw image would.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..errors import ActivelabError

KINDS = ("none", "crop", "crop_flip")


def crop_padding(image_size: int) -> int:
    """Padding of the random crop: 4 pixels for 32-pixel (and larger) images, scaled down for small ones.

    ``min(4, max(1, round(image_size / 8)))``: 8x8 -> 1, 16x16 -> 2, 28x28 -> 4, 32x32 -> 4.
    """
    return min(4, max(1, round(image_size / 8)))


def _fill(x: torch.Tensor, fill: torch.Tensor | float | None) -> torch.Tensor:
    if fill is None:
        return torch.zeros(1, x.shape[1], 1, 1, dtype=x.dtype, device=x.device)
    fill = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1)
    return fill.expand(x.shape[1]).reshape(1, -1, 1, 1)


def shift_crop(
    x: torch.Tensor, offsets: torch.Tensor, padding: int, fill: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Crop each padded image at its own offset: sample ``i`` is ``pad(x[i])[:, dy:dy+H, dx:dx+W]``.

    ``offsets`` is (B, 2) integer (dy, dx) in [0, 2·padding]; (padding, padding) is the identity.
    Padded pixels take ``fill`` (per channel, default 0).
    """
    b, _, h, w = x.shape
    value = _fill(x, fill)
    padded = F.pad(x - value, (padding, padding, padding, padding)) + value
    offsets = offsets.to(x.device)
    rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[:, 1:2] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    out = padded[batch, :, rows.view(b, h, 1), cols.view(b, 1, w)]  # (B, H, W, C): advanced dims go first
    return out.permute(0, 3, 1, 2).contiguous()


def random_crop(
    x: torch.Tensor, padding: int, generator: torch.Generator, fill: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Pad by ``padding`` on every side and crop back to (H, W) at a uniformly random offset per image."""
    if padding <= 0:
        return x
    offsets = torch.randint(0, 2 * padding + 1, (x.shape[0], 2), generator=generator)
    return shift_crop(x, offsets, padding, fill)


def random_flip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability ``p``."""
    flip = (torch.rand(x.shape[0], generator=generator) < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


def augment_batch(
    x: torch.Tensor,
    kind: str,
    generator: torch.Generator,
    fill: torch.Tensor | float | None = None,
    padding: int | None = None,
) -> torch.Tensor:
    """Apply ``kind`` ("none", "crop" or "crop_flip") to a batch.

    ``padding`` defaults to :func:`crop_padding` of the image side.
    """
    if kind == "none":
        return x
    if kind not in KINDS:
        raise ActivelabError(f"unknown augmentation {kind!r}; choose one of {', '.join(KINDS)}")
    pad = crop_padding(x.shape[-1]) if padding is None else padding
    x = random_crop(x, pad, generator, fill)
    if kind == "crop_flip":
        x = random_flip(x, generator)
    return x

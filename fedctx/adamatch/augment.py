"""Weak and strong augmentations on batched image tensors, vectorized over the batch.

AdaMatch (Berthelot et al. 2021) takes them from FixMatch (Sohn et al. 2020): *weak* is a random
shift (pad + random crop) and, for natural images, a horizontal flip; *strong* is RandAugment
(two random ops, random magnitudes) followed by Cutout. The authors use CTAugment or RandAugment;
this is RandAugment. Digits are never flipped (a mirrored 2, 3, 4, 5, 7 or 9 is not a digit).

Every function takes a float batch ``(N, C, H, W)`` with values in ``[0, 1]`` and a
``torch.Generator``; each sample draws its own op and magnitude, with no Python loop over
samples (one small loop over the op list).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def random_shift(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Reflect-pad by ``pad`` pixels and crop back to ``(H, W)`` at a random offset per sample."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=x.device)
    # every (H, W) window of every sample, a view (N, C, 2p+1, 2p+1, H, W); one copy picks
    # each sample's window (2-3x faster than gathering rows and columns pixel by pixel)
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)
    return windows[torch.arange(n, device=x.device), :, dy, dx]


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror each sample left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=gen, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def weak_augment(x: torch.Tensor, gen: torch.Generator, *, pad: int = 2, flip: bool = False
                 ) -> torch.Tensor:
    """Weak augmentation: random shift by up to ``pad`` pixels (+ mirror when ``flip``)."""
    x = random_shift(x, pad, gen)
    return random_flip(x, gen) if flip else x


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype)[:, None, None]
    return (x * w).sum(1, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageEnhance``: ``other + factor * (x - other)``, clipped; ``factor`` is ``(N,)``."""
    return (other + factor[:, None, None, None] * (x - other)).clamp(0.0, 1.0)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Apply ``(N, 2, 3)`` affine maps (normalized coordinates), grey fill 0.5 outside."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + 0.5


def _eye(n: int, x: torch.Tensor) -> torch.Tensor:
    return torch.eye(2, 3, device=x.device, dtype=x.dtype).expand(n, 2, 3).clone()


def _signed(m: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    sign = torch.where(torch.rand(m.shape, generator=gen, device=m.device) < 0.5, -1.0, 1.0)
    return m * sign


def op_identity(x: torch.Tensor, m: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return x


def op_autocontrast(x: torch.Tensor, m: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Stretch each channel of each sample to ``[0, 1]`` (magnitude unused)."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-8), x)


def op_brightness(x: torch.Tensor, m: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), 1.0 + _signed(0.9 * m, gen))


def op_color(x: torch.Tensor, m: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return _blend(x, _grey(x).expand_as(x), 1.0 + _signed(0.9 * m, gen))


def op_contrast(x: torch.Tensor, m: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x)
    return _blend(x, mean, 1.0 + _signed(0.9 * m, gen))


def op_sharpness(x: torch.Tensor, m: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blend with PIL's SMOOTH-filtered image (3x3 kernel, centre weight 5, total 13)."""
    k = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    k[1, 1] = 5.0
    k = (k / k.sum()).expand(x.shape[1], 1, 3, 3)
    smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=x.shape[1])
    return _blend(x, smooth, 1.0 + _signed(0.9 * m, gen))


def op_posterize(x: torch.Tensor, m: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Keep ``8 - round(4 m)`` bits (4 to 8 bits)."""
    bits = 8 - torch.round(4.0 * m)
    levels = (2.0 ** bits)[:, None, None, None]
    return torch.floor(x * 255.0 / (256.0 / levels)) * (256.0 / levels) / 255.0


def op_solarize(x: torch.Tensor, m: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Invert pixels above the threshold ``1 - m``."""
    threshold = (1.0 - m)[:, None, None, None]
    return torch.where(x >= threshold, 1.0 - x, x)


def op_equalize(x: torch.Tensor, m: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Histogram equalization per sample and channel (256 bins), via ranks of the CDF."""
    n, c, h, w = x.shape
    q = (x * 255.0).round().long().clamp(0, 255).reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device, dtype=x.dtype)
    hist.scatter_add_(1, q, torch.ones_like(q, dtype=x.dtype))
    cdf = hist.cumsum(1)
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, float(h * w))).amin(1, keepdim=True)
    lut = ((cdf - cdf_min) / (h * w - cdf_min).clamp_min(1.0)).clamp(0.0, 1.0)
    return lut.gather(1, q).reshape(n, c, h, w)


def op_rotate(x: torch.Tensor, m: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Rotate by up to +-30 degrees."""
    angle = _signed(m * math.radians(30.0), gen)
    theta = _eye(x.shape[0], x)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle), torch.cos(angle)
    return _affine(x, theta)


def _transform(x: torch.Tensor, row: int, col: int, value: torch.Tensor) -> torch.Tensor:
    """Apply the identity affine map with entry ``(row, col)`` set to ``value`` (per sample)."""
    theta = _eye(x.shape[0], x)
    theta[:, row, col] = value
    return _affine(x, theta)


def op_shear_x(x: torch.Tensor, m: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return _transform(x, 0, 1, _signed(0.3 * m, gen))


def op_shear_y(x: torch.Tensor, m: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return _transform(x, 1, 0, _signed(0.3 * m, gen))


def op_translate_x(x: torch.Tensor, m: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Translate by up to 30% of the width (normalized coordinates span 2)."""
    return _transform(x, 0, 2, _signed(0.6 * m, gen))


def op_translate_y(x: torch.Tensor, m: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return _transform(x, 1, 2, _signed(0.6 * m, gen))


AugOp = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]

#: FixMatch's RandAugment op list; magnitudes ``m`` in ``[0, 1]`` per sample.
RANDAUGMENT_OPS: tuple[AugOp, ...] = (
    op_identity, op_autocontrast, op_brightness, op_color, op_contrast, op_equalize,
    op_posterize, op_rotate, op_sharpness, op_shear_x, op_shear_y, op_solarize,
    op_translate_x, op_translate_y,
)


def rand_augment(x: torch.Tensor, gen: torch.Generator, num_ops: int = 2) -> torch.Tensor:
    """RandAugment with random magnitudes (FixMatch's variant): ``num_ops`` rounds, each sample
    applies one op drawn uniformly with a magnitude drawn from ``U(0, 1)``."""
    n = x.shape[0]
    for _ in range(num_ops):
        choice = torch.randint(0, len(RANDAUGMENT_OPS), (n,), generator=gen, device=x.device)
        mags = torch.rand(n, generator=gen, device=x.device)
        out = x.clone()
        for k, op in enumerate(RANDAUGMENT_OPS):
            idx = (choice == k).nonzero().squeeze(1)
            if idx.numel():
                out[idx] = op(x[idx], mags[idx], gen)
        x = out
    return x


def cutout(x: torch.Tensor, size: int, gen: torch.Generator, fill: float = 0.5) -> torch.Tensor:
    """Fill a ``size x size`` square (clipped at the border) centred at a random pixel."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=gen, device=x.device)
    cx = torch.randint(0, w, (n,), generator=gen, device=x.device)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    y0, x0 = (cy - size // 2)[:, None, None], (cx - size // 2)[:, None, None]
    inside = (ys >= y0) & (ys < y0 + size) & (xs >= x0) & (xs < x0 + size)  # (N, H, W)
    return torch.where(inside[:, None], fill, x)


def strong_augment(x: torch.Tensor, gen: torch.Generator, *, pad: int = 2, flip: bool = False,
                   num_ops: int = 2, cutout_ratio: float = 0.5) -> torch.Tensor:
    """Strong augmentation: weak shift (+ flip), RandAugment, then Cutout of side
    ``cutout_ratio * H`` (FixMatch: 16 px on 32 px images)."""
    x = rand_augment(weak_augment(x, gen, pad=pad, flip=flip), gen, num_ops=num_ops)
    return cutout(x, max(1, round(cutout_ratio * x.shape[-2])), gen)

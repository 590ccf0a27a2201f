"""Random image transforms for candidates and for variations of already-labelled images:
random affine maps (rotation, anisotropic scale, shear, translation), elastic deformation
(a smooth random displacement field), cut-mix and mixup between images, and additive
noise. Every random number comes from the ``torch.Generator`` passed in; all batched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _u(g: torch.Generator, *size: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(*size, generator=g)


def _resize(z: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if z.shape[-2:] == (h, w):
        return z
    return F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False)


def affine(x: torch.Tensor, g: torch.Generator, *, strength: float = 1.0) -> torch.Tensor:
    """Random rotation (+-30 deg), scale (0.75..1.3 per axis), shear and translation (+-15%)."""
    n = x.shape[0]
    s = strength
    rot = _u(g, n, lo=-0.52, hi=0.52) * s
    sc = torch.exp(_u(g, n, 2, lo=-0.28, hi=0.28) * s)
    sh = _u(g, n, lo=-0.3, hi=0.3) * s
    tr = _u(g, n, 2, lo=-0.3, hi=0.3) * s
    cos, sin = torch.cos(rot), torch.sin(rot)
    a = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (n, 2, 2)
    shear = torch.eye(2).repeat(n, 1, 1)
    shear[:, 0, 1] = sh
    m = a @ shear @ torch.diag_embed(sc)
    theta = torch.cat([m, tr[:, :, None]], 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def elastic(x: torch.Tensor, g: torch.Generator, *, alpha: float = 0.15, res: int = 4) -> torch.Tensor:
    """Smooth random displacement (up to ~``alpha`` of the half-width) sampled bilinearly."""
    n, _, h, w = x.shape
    base = F.affine_grid(torch.eye(2, 3).repeat(n, 1, 1), list(x.shape), align_corners=False)
    disp = _resize(_u(g, n, 2, res, res, lo=-1.0, hi=1.0), h, w).permute(0, 2, 3, 1)
    amt = _u(g, n, 1, 1, 1, hi=alpha)
    return F.grid_sample(x, base + disp * amt, mode="bilinear", padding_mode="zeros", align_corners=False)


def cutmix(x: torch.Tensor, other: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Paste a random box (10%..60% of each side) of ``other`` into ``x``."""
    n, _, h, w = x.shape
    bh = (_u(g, n, lo=0.1, hi=0.6) * h).long().clamp_min(1)
    bw = (_u(g, n, lo=0.1, hi=0.6) * w).long().clamp_min(1)
    y0 = (torch.rand(n, generator=g) * (h - bh + 1)).long()
    x0 = (torch.rand(n, generator=g) * (w - bw + 1)).long()
    rows = torch.arange(h)[None]
    cols = torch.arange(w)[None]
    my = (rows >= y0[:, None]) & (rows < (y0 + bh)[:, None])
    mx = (cols >= x0[:, None]) & (cols < (x0 + bw)[:, None])
    m = (my[:, :, None] & mx[:, None, :])[:, None]
    return torch.where(m, other, x)


def mixup(x: torch.Tensor, other: torch.Tensor, g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    lam = _u(g, x.shape[0], 1, 1, 1, lo=lo, hi=hi)
    return lam * x + (1 - lam) * other


def deform(x: torch.Tensor, g: torch.Generator, *, p_affine: float = 0.7, p_elastic: float = 0.5,
           strength: float = 1.0) -> torch.Tensor:
    """Random affine and/or elastic deformation applied to a random subset of the batch."""
    n = x.shape[0]
    if n == 0:
        return x
    a = torch.rand(n, generator=g) < p_affine
    e = torch.rand(n, generator=g) < p_elastic
    xa = affine(x, g, strength=strength)
    x = torch.where(a[:, None, None, None], xa, x)
    xe = elastic(x, g, alpha=0.15 * strength)
    return torch.where(e[:, None, None, None], xe, x)


def mutate(x: torch.Tensor, n: int, g: torch.Generator, *, fresh: torch.Tensor | None = None,
           noise_sd: float = 0.05, partners: torch.Tensor | None = None, p_partner: float = 0.0) -> torch.Tensor:
    """``n`` variations of images drawn from ``x``: deformation, then cut-mix / mixup with
    another image of ``x`` (or of ``fresh``), plus a little noise. Used to explore around
    images the teacher has already labelled (class-balanced parents: see ``select``).
    ``partners`` (one row per row of ``x``): with probability ``p_partner`` a variation is
    crossed with its parent's partner instead (e.g. a labelled image of the same class)."""
    if x.shape[0] == 0:
        raise ValueError("mutate needs at least one parent image")
    if partners is not None and partners.shape != x.shape:
        raise ValueError(f"partners must have the parents' shape {tuple(x.shape)}, got {tuple(partners.shape)}")
    idx = torch.randint(0, x.shape[0], (n,), generator=g)
    out = deform(x[idx], g, p_affine=0.8, p_elastic=0.6, strength=0.8)
    src = x if fresh is None or fresh.shape[0] == 0 else torch.cat([x, fresh])
    other = src[torch.randint(0, src.shape[0], (n,), generator=g)]
    if partners is not None and p_partner > 0:  # no extra draw otherwise: the recipe's stream is unchanged
        own = torch.rand(n, generator=g) < p_partner
        other = torch.where(own[:, None, None, None], partners[idx], other)
    r = torch.rand(n, generator=g)
    cm = cutmix(out, other, g)
    mx = mixup(out, other, g, lo=0.5, hi=1.0)
    out = torch.where((r < 0.3)[:, None, None, None], cm, torch.where((r < 0.5)[:, None, None, None], mx, out))
    amt = _u(g, n, 1, 1, 1, hi=noise_sd)
    out = out + amt * torch.randn(out.shape, generator=g)
    return out.clamp(0, 1)

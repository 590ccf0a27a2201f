"""Synthetic candidate images for any input shape ``(C, H, W)``, all in [0, 1].

Every generator takes ``(n, shape, generator)`` and returns a float32 tensor
``(n, C, H, W)``; every random number comes from ``generator`` (so a stream seeded from
``(seed, round, name)`` gives the same images in any process), and nothing loops over
samples in Python.

Kinds (mixed by :func:`synthesize`):

* ``noise``: multi-scale (octave) noise: uniform grids at several resolutions, upsampled
  and summed with random per-sample weights, then a random contrast curve (threshold to
  a dark background, gamma, gain). Colour images get a random mix of a shared grey
  component and independent channels.
* ``shapes``: one to three filled star-shaped polygons (a random Fourier series for the
  radius as a function of the angle: ellipses, blobs, spiky or boxy silhouettes), each
  with a random orientation, aspect ratio, grey level / colour and noise texture, painted
  in order on a dark or noisy background.
* ``strokes``: thick random polylines (pen strokes), one to three per image.
* ``smooth``: the low-frequency blobs of the existing ``random`` baseline (for ablations).
* ``dip``: "deep image prior" images: low-resolution Gaussian noise (a few channels at
  about 1/4 or 1/8 of the image size) through a small conv decoder whose weights are drawn
  at random for every image (2 or 3 stages of 2x nearest/bilinear upsampling, 3x3 conv,
  instance normalisation and leaky ReLU, then a 1x1 conv to the image's channels; the
  per-image weights run as one grouped convolution, so nothing loops over samples), then
  per-image min-max scaling, left-right mirror symmetry for half of them, and the random
  contrast curve of ``noise``. Structured textures and blobs with sharp, correlated edges.

:func:`synthesize` mixes the kinds and deforms / cut-mixes a share of them with the
transforms of :mod:`.transforms` (which also makes the variations of labelled images,
``mutate``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .transforms import _resize, _u, cutmix, deform, mutate

__all__ = ["GENERATORS", "KINDS", "Shape", "mutate", "synthesize", *("noise", "shapes", "strokes", "smooth", "objects",
                                                                     "curves", "dip")]

Shape = tuple[int, int, int]

KINDS: tuple[str, ...] = ("noise", "shapes", "strokes", "smooth", "objects", "curves", "dip")


# ----------------------------------------------------------------------------- helpers

def _grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates normalised so that the longer side spans [-1, 1]."""
    s = max(h, w)
    ys = (torch.arange(h, dtype=torch.float32) + 0.5 - h / 2) / (s / 2)
    xs = (torch.arange(w, dtype=torch.float32) + 0.5 - w / 2) / (s / 2)
    return ys[:, None].expand(h, w), xs[None, :].expand(h, w)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max scaling to [0, 1]."""
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo + 1e-8)


def _colour(n: int, c: int, g: torch.Generator) -> torch.Tensor:
    """Per-sample colour ``(n, C, 1, 1)`` in [0, 1]; grey-ish with random saturation for C=3."""
    if c == 1:
        return _u(g, n, 1, 1, 1)
    grey = _u(g, n, 1, 1, 1)
    sat = _u(g, n, 1, 1, 1)
    return (grey + sat * (_u(g, n, c, 1, 1) - grey)).clamp(0, 1)


def octave_noise(n: int, shape: Shape, g: torch.Generator, *, max_res: int | None = None) -> torch.Tensor:
    """Raw multi-scale noise ``(n, C, H, W)`` in [0, 1] (per-sample normalised).

    Resolutions 1, 2, 4, ... up to the image size; each sample weights the octaves with a
    random power law (``amplitude ~ res^-beta``, ``beta`` in [0, 2.5]) so some samples are
    smooth and others grainy. Channels share a grey component with random strength.
    """
    c, h, w = shape
    top = max(h, w) if max_res is None else max_res
    res_list = []
    r = 2
    while r < top:
        res_list.append(r)
        r *= 2
    res_list.append(top)
    beta = _u(g, n, 1, 1, 1, hi=2.5)
    shared = _u(g, n, 1, 1, 1) if c > 1 else torch.ones(n, 1, 1, 1)
    out = torch.zeros(n, c, h, w)
    for r in res_list:
        rh = max(1, round(r * h / max(h, w)))
        rw = max(1, round(r * w / max(h, w)))
        z = _u(g, n, c, rh, rw, lo=-1.0, hi=1.0)
        if c > 1:
            z = shared * z[:, :1] + (1 - shared) * z
        out += _resize(z, h, w) * (float(r) ** -beta)
    return _normalise(out)


def _contrast(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random threshold (dark background), gamma and gain per sample."""
    n = x.shape[0]
    thr = _u(g, n, 1, 1, 1, hi=0.7) * (torch.rand(n, 1, 1, 1, generator=g) < 0.6)
    x = ((x - thr) / (1 - thr)).clamp(0, 1)
    gamma = torch.exp(_u(g, n, 1, 1, 1, lo=-1.0, hi=1.0))
    gain = _u(g, n, 1, 1, 1, lo=0.4, hi=1.3)
    return (x.clamp_min(1e-6) ** gamma * gain).clamp(0, 1)


# ----------------------------------------------------------------------------- generators

def noise(n: int, shape: Shape, g: torch.Generator) -> torch.Tensor:
    """Multi-scale noise with a random contrast curve."""
    return _contrast(octave_noise(n, shape, g), g)


def smooth(n: int, shape: Shape, g: torch.Generator) -> torch.Tensor:
    """Low-frequency blobs as in the ``random`` baseline (``synthesis.draw_noise('smooth')``)."""
    c, h, w = shape
    r = torch.randint(2, 8, (n,), generator=g)
    out = torch.empty(n, c, h, w)
    for res in torch.unique(r).tolist():
        rows = torch.nonzero(r == res).squeeze(1)
        z = torch.rand(rows.numel(), c, res, res, generator=g)
        out[rows] = _resize(z, h, w)
    out = _normalise(out)
    thr = torch.rand(n, 1, 1, 1, generator=g)
    scale = torch.rand(n, 1, 1, 1, generator=g) * 1.5
    return (torch.where(out > thr, out, torch.zeros_like(out)) * scale).clamp(0, 1)


def _star_masks(n: int, h: int, w: int, g: torch.Generator, *, centre: float = 0.45,
                size: tuple[float, float] = (0.2, 0.75), aspect_range: float = 0.9) -> torch.Tensor:
    """Soft masks ``(n, 1, H, W)`` of random star-shaped polygons."""
    yy, xx = _grid(h, w)
    cy = _u(g, n, 1, 1, lo=-centre, hi=centre) * h / max(h, w)
    cx = _u(g, n, 1, 1, lo=-centre, hi=centre) * w / max(h, w)
    rot = _u(g, n, 1, 1, hi=2 * math.pi)
    aspect = torch.exp(_u(g, n, 1, 1, lo=-aspect_range, hi=aspect_range))
    dy, dx = yy - cy, xx - cx
    u = (dx * torch.cos(rot) + dy * torch.sin(rot)) * aspect.sqrt()
    v = (-dx * torch.sin(rot) + dy * torch.cos(rot)) / aspect.sqrt()
    dist = torch.sqrt(u * u + v * v + 1e-12)
    ang = torch.atan2(v, u)
    base = _u(g, n, 1, 1, lo=size[0], hi=size[1])
    k = torch.arange(1, 7, dtype=torch.float32)[None, :, None, None]  # harmonics 1..6
    amp = _u(g, n, 6, 1, 1) * (0.35 / k) * (_u(g, n, 1, 1, 1) * 1.5)
    phase = _u(g, n, 6, 1, 1, hi=2 * math.pi)
    radius = base * (1 + (amp * torch.cos(k * ang[:, None] + phase)).sum(1)).clamp_min(0.15)
    soft = 1.5 / max(h, w)
    return torch.sigmoid((radius - dist) / soft)[:, None]


def shapes(n: int, shape: Shape, g: torch.Generator) -> torch.Tensor:
    """One to three textured star-shaped polygons painted over a dark or noisy background."""
    c, h, w = shape
    bg_noise = octave_noise(n, shape, g)
    bg = bg_noise * _u(g, n, 1, 1, 1, hi=0.4) * (torch.rand(n, 1, 1, 1, generator=g) < 0.5)
    out = bg
    count = torch.randint(1, 4, (n,), generator=g)
    for i in range(3):
        mask = _star_masks(n, h, w, g) * (count > i).float()[:, None, None, None]
        tex = octave_noise(n, shape, g)
        tex_amt = _u(g, n, 1, 1, 1, hi=0.8)
        fill = _colour(n, c, g).clamp_min(0.15) * (1 - tex_amt * tex)
        # a hole or a brighter part when painted after the first one
        out = out * (1 - mask) + fill * mask
    return _contrast_light(out, g)


def objects(n: int, shape: Shape, g: torch.Generator) -> torch.Tensor:
    """One large, roughly centred object filling much of the frame (object-centric datasets):
    a union of one to three large star-shaped parts, half of the images mirror-symmetric
    left-right, filled with a textured grey level / colour, on a black background."""
    c, h, w = shape
    count = torch.randint(1, 4, (n,), generator=g)
    mask = torch.zeros(n, 1, h, w)
    for i in range(3):
        m = _star_masks(n, h, w, g, centre=0.25, size=(0.35, 0.9), aspect_range=1.2)
        mask = torch.maximum(mask, m * (count > i).float()[:, None, None, None])
    sym = (torch.rand(n, 1, 1, 1, generator=g) < 0.5).float()
    mask = sym * torch.maximum(mask, mask.flip(-1)) + (1 - sym) * mask
    tex = octave_noise(n, shape, g)
    tex = sym * 0.5 * (tex + tex.flip(-1)) + (1 - sym) * tex
    tex_amt = _u(g, n, 1, 1, 1, hi=0.9)
    fill = _colour(n, c, g).clamp_min(0.2) * (1 - tex_amt * tex)
    # optional darker holes / inner parts (e.g. an opening, a gap between parts)
    hole = _star_masks(n, h, w, g, centre=0.3, size=(0.05, 0.3)) * (torch.rand(n, 1, 1, 1, generator=g) < 0.3)
    hole = sym * torch.maximum(hole, hole.flip(-1)) + (1 - sym) * hole
    out = fill * mask * (1 - hole)
    return _contrast_light(out, g)


def _contrast_light(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    gamma = torch.exp(_u(g, n, 1, 1, 1, lo=-0.5, hi=0.5))
    gain = _u(g, n, 1, 1, 1, lo=0.6, hi=1.4)
    return (x.clamp_min(1e-6) ** gamma * gain).clamp(0, 1)


def strokes(n: int, shape: Shape, g: torch.Generator, *, segments: int = 4, max_strokes: int = 3) -> torch.Tensor:
    """Thick random polylines (pen strokes), like handwriting."""
    c, h, w = shape
    yy, xx = _grid(h, w)
    p = torch.stack([yy, xx], -1).reshape(1, 1, h * w, 2)  # (1, 1, P, 2)
    sy, sx = h / max(h, w), w / max(h, w)
    scale = torch.tensor([sy, sx])
    out = torch.zeros(n, 1, h, w)
    count = torch.randint(1, max_strokes + 1, (n,), generator=g)
    for i in range(max_strokes):
        # a random walk of segment end points, inside the frame
        start = _u(g, n, 1, 2, lo=-0.7, hi=0.7) * scale
        steps = _u(g, n, segments, 2, lo=-0.8, hi=0.8) * scale
        pts = (start + torch.cumsum(steps, 1)).clamp(-0.85, 0.85)
        pts = torch.cat([start, pts], 1)  # (n, S+1, 2)
        a, b = pts[:, :-1, None, :], pts[:, 1:, None, :]  # (n, S, 1, 2)
        ab = b - a
        t = (((p - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-8)).clamp(0, 1)
        d = (p - (a + t[..., None] * ab)).norm(dim=-1).amin(1)  # (n, P)
        width = _u(g, n, 1, lo=0.06, hi=0.22)
        soft = 1.5 / max(h, w)
        m = torch.sigmoid((width - d) / soft).reshape(n, 1, h, w) * (count > i).float()[:, None, None, None]
        level = _u(g, n, 1, 1, 1, lo=0.5, hi=1.0)
        out = torch.maximum(out, m * level)
    col = _colour(n, c, g).clamp_min(0.5) if c > 1 else torch.ones(n, 1, 1, 1)
    return (out * col).clamp(0, 1)


def _polyline_mask(pts: torch.Tensor, h: int, w: int, width: torch.Tensor) -> torch.Tensor:
    """Soft mask ``(n, 1, H, W)`` of thick polylines through ``pts`` ``(n, S+1, 2)`` (y, x)."""
    n = pts.shape[0]
    yy, xx = _grid(h, w)
    p = torch.stack([yy, xx], -1).reshape(1, 1, h * w, 2)
    a, b = pts[:, :-1, None, :], pts[:, 1:, None, :]
    ab = b - a
    t = (((p - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-8)).clamp(0, 1)
    d = (p - (a + t[..., None] * ab)).norm(dim=-1).amin(1)
    soft = 1.5 / max(h, w)
    return torch.sigmoid((width - d) / soft).reshape(n, 1, h, w)


def curves(n: int, shape: Shape, g: torch.Generator, *, segments: int = 12) -> torch.Tensor:
    """Smooth pen curves (a random walk whose heading turns smoothly: arcs, hooks, loops),
    one or two per image, roughly centred, of constant random width: handwriting-like."""
    c, h, w = shape
    scale = torch.tensor([h / max(h, w), w / max(h, w)])
    out = torch.zeros(n, 1, h, w)
    count = torch.randint(1, 3, (n,), generator=g)
    for i in range(2):
        start = _u(g, n, 1, 2, lo=-0.5, hi=0.5) * scale
        heading = _u(g, n, 1, hi=2 * math.pi)
        turn = _u(g, n, 1, lo=-0.55, hi=0.55) + 0.3 * torch.randn(n, segments, generator=g)
        theta = heading + torch.cumsum(turn, 1)
        step = _u(g, n, 1, lo=0.1, hi=0.3)
        moves = torch.stack([torch.sin(theta), torch.cos(theta)], -1) * step[..., None] * scale
        pts = torch.cat([start, start + torch.cumsum(moves, 1)], 1).clamp(-0.9, 0.9)
        width = _u(g, n, 1, lo=0.07, hi=0.2)
        m = _polyline_mask(pts, h, w, width) * (count > i).float()[:, None, None, None]
        out = torch.maximum(out, m * _u(g, n, 1, 1, 1, lo=0.6, hi=1.0))
    col = _colour(n, c, g).clamp_min(0.5) if c > 1 else torch.ones(n, 1, 1, 1)
    return (out * col).clamp(0, 1)


def _dip_decode(z: torch.Tensor, stages: int, c_out: int, h: int, w: int, g: torch.Generator,
                width: int = 8) -> torch.Tensor:
    """Decode ``z`` ``(n, width, rh, rw)`` through ``stages`` random conv stages (new weights
    per image, one grouped convolution per layer) to ``(n, c_out, H, W)`` (unnormalised)."""
    n = z.shape[0]
    x = z
    for i in range(stages):
        th = max(1, round(h * 2 ** (i + 1 - stages)))
        tw = max(1, round(w * 2 ** (i + 1 - stages)))
        mode = "nearest" if torch.rand(1, generator=g).item() < 0.5 else "bilinear"
        x = F.interpolate(x, size=(th, tw), mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
        wt = torch.randn(n * width, width, 3, 3, generator=g) * math.sqrt(2.0 / (width * 9))
        b = torch.randn(n * width, generator=g) * 0.1
        x = F.conv2d(x.reshape(1, n * width, th, tw), wt, b, padding=1, groups=n).reshape(n, width, th, tw)
        mu = x.mean(dim=(2, 3), keepdim=True)
        sd = x.std(dim=(2, 3), keepdim=True, unbiased=False) if th * tw > 1 else torch.ones_like(mu)
        x = F.leaky_relu((x - mu) / (sd + 1e-5), 0.2)
    x = _resize(x, h, w)
    wt = torch.randn(n * c_out, width, 1, 1, generator=g) / math.sqrt(width)
    return F.conv2d(x.reshape(1, n * width, h, w), wt, groups=n).reshape(n, c_out, h, w)


def dip(n: int, shape: Shape, g: torch.Generator, *, width: int = 8) -> torch.Tensor:
    """Deep-image-prior images: random noise through a randomly initialised conv decoder
    (new weights for every image), min-max scaled, half mirror-symmetric, random contrast."""
    c, h, w = shape
    out = torch.empty(n, c, h, w)
    stages = 2 + (torch.rand(n, generator=g) < 0.5).long()  # 2 stages from ~H/4, 3 from ~H/8
    for st in (2, 3):
        rows = torch.nonzero(stages == st).squeeze(1)
        if rows.numel() == 0:
            continue
        rh = max(1, round(h / 2 ** st))
        rw = max(1, round(w / 2 ** st))
        z = torch.randn(rows.numel(), width, rh, rw, generator=g)
        out[rows] = _dip_decode(z, st, c, h, w, g, width)
    if c > 1:  # a shared grey component of random strength, as in octave_noise
        shared = _u(g, n, 1, 1, 1)
        out = shared * out.mean(1, keepdim=True) + (1 - shared) * out
    out = _normalise(out)
    sym = torch.rand(n, 1, 1, 1, generator=g) < 0.5
    left = (torch.arange(w) < (w + 1) // 2)[None, None, None, :]
    out = torch.where(sym, torch.where(left, out, out.flip(-1)), out)
    return _contrast(out, g)


GENERATORS = {"noise": noise, "shapes": shapes, "strokes": strokes, "smooth": smooth, "objects": objects,
              "curves": curves, "dip": dip}


def synthesize(n: int, shape: Shape, g: torch.Generator, mix: dict[str, float], *,
               deform_p: float = 0.5, cutmix_p: float = 0.25) -> torch.Tensor:
    """``n`` fresh candidates: kinds drawn by the weights ``mix``, then deformed / cut-mixed.

    The per-kind counts are a deterministic function of ``g``; the images are shuffled
    together so that every kind is spread over the batch.
    """
    kinds = [k for k, v in mix.items() if v > 0]
    if not kinds:
        raise ValueError("candidate mix has no kind with a positive weight")
    for k in kinds:
        if k not in GENERATORS:
            raise ValueError(f"unknown candidate kind {k!r}; known: {', '.join(GENERATORS)}")
    if n == 0:  # e.g. every candidate of a round is a variation (mutate_fraction = 1)
        return torch.empty(0, *shape)
    wts = torch.tensor([float(mix[k]) for k in kinds])
    which = torch.multinomial(wts / wts.sum(), n, replacement=True, generator=g)
    out = torch.empty(n, *shape)
    for i, k in enumerate(kinds):
        rows = torch.nonzero(which == i).squeeze(1)
        if rows.numel():
            out[rows] = GENERATORS[k](rows.numel(), shape, g)
    if deform_p > 0:
        sel = torch.rand(n, generator=g) < deform_p
        out = torch.where(sel[:, None, None, None], deform(out, g), out)
    if cutmix_p > 0 and n > 1:
        sel = torch.rand(n, generator=g) < cutmix_p
        other = out[torch.randperm(n, generator=g)]
        out = torch.where(sel[:, None, None, None], cutmix(out, other, g), out)
    return out.clamp(0, 1)

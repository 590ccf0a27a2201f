"""Random images for zero-shot work, for any ``(C, H, W)``, drawn from named random streams.

* :func:`draw_noise`: the released formula (``paper``), low-frequency blobs (``smooth``) or both.
* :func:`random_images`: a deterministic, 8-bit sequence of such images: any slice can be
  regenerated from ``(kind, seed)`` alone, so only the teacher's labels need storing.
* :func:`label_random_images`: those images with the teacher's label of each (one query
  each), kept in resumable chunks so an interrupted run asks nothing twice.
"""

from __future__ import annotations

import logging
import os

import torch

from ..oracle import LabelOracle
from ..parallel import pool_budget, prepare_work_dir, run_chunks
from ..progress import QueryProgress
from ..store import derive_seed

log = logging.getLogger("zsdb3kd")

NOISE_KINDS = ("paper", "smooth", "mixed")


def draw_noise(kind: str, n: int, shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """``n`` noise images ``(n, C, H, W)`` in [0, 1].

    * ``paper``: ``clip((U + 0.2) * s1 + N(0, 1) * s2, 0, 1)``, per-sample ``s1, s2 ~ U(0, 1)``
      (the released code's formula). High-frequency: a LeNet-5 Fashion-MNIST teacher almost
      never calls it "Sneaker" or "Ankle boot".
    * ``smooth``: uniform noise on a coarse ``r x r`` grid (``r`` in 2..7) upsampled
      bilinearly, thresholded and scaled per sample: low-frequency blobs that reach every
      class of such teachers.
    * ``mixed``: half of each.
    """
    if kind == "mixed":
        a = n // 2
        return torch.cat([draw_noise("paper", a, shape, generator), draw_noise("smooth", n - a, shape, generator)])
    if kind == "paper":
        u = torch.rand(n, *shape, generator=generator)
        s1 = torch.rand(n, 1, 1, 1, generator=generator)
        s2 = torch.rand(n, 1, 1, 1, generator=generator)
        return ((u + 0.2) * s1 + torch.randn(n, *shape, generator=generator) * s2).clamp(0, 1)
    if kind == "smooth":
        C, H, W = shape
        r = torch.randint(2, 8, (n,), generator=generator)
        out = torch.empty(n, C, H, W)
        for res in torch.unique(r).tolist():  # one interpolation per grid size, vectorised over samples
            rows = torch.nonzero(r == res).squeeze(1)
            z = torch.rand(rows.numel(), C, res, res, generator=generator)
            out[rows] = torch.nn.functional.interpolate(z, size=(H, W), mode="bilinear", align_corners=False)
        lo = out.amin(dim=(1, 2, 3), keepdim=True)
        hi = out.amax(dim=(1, 2, 3), keepdim=True)
        out = (out - lo) / (hi - lo + 1e-8)
        thr = torch.rand(n, 1, 1, 1, generator=generator)
        scale = torch.rand(n, 1, 1, 1, generator=generator) * 1.5
        return (torch.where(out > thr, out, torch.zeros_like(out)) * scale).clamp(0, 1)
    raise ValueError(f"unknown noise kind {kind!r}; known: {NOISE_KINDS}")



def random_images(kind: str, n: int, shape: tuple[int, int, int], seed: int, chunk: int = 50_000,
                  start: int = 0) -> torch.Tensor:
    """Images ``start .. start + n`` of the deterministic random sequence ``(kind, seed)``,
    quantised to 8 bits: ``(n, C, H, W)`` uint8. Chunk ``i`` of ``chunk`` images is drawn
    from its own seed, so any slice can be regenerated without the rest."""
    if kind not in NOISE_KINDS and kind != "uniform":
        raise ValueError(f"unknown image kind {kind!r}; known: uniform, {', '.join(NOISE_KINDS)}")
    out = torch.empty(n, *shape, dtype=torch.uint8)
    first, last = start // chunk, (start + n - 1) // chunk if n else start // chunk - 1
    for c in range(first, last + 1):
        g = torch.Generator().manual_seed(derive_seed(seed, kind, c))
        x = torch.rand(chunk, *shape, generator=g) if kind == "uniform" else draw_noise(kind, chunk, shape, g)
        lo, hi = max(start, c * chunk), min(start + n, (c + 1) * chunk)
        out[lo - start: hi - start] = (x[lo - c * chunk: hi - c * chunk] * 255).round().to(torch.uint8)
    return out


def label_random_images(oracle: LabelOracle, kind: str, n: int, seed: int, *, chunk: int = 50_000,
                        device: str | torch.device = "cpu", work_dir: str | os.PathLike | None = None,
                        progress: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random images of ``kind`` (:func:`random_images`) and the teacher's label of each.

    Returns ``(x uint8 (n, C, H, W), y (n,))``; the teacher sees exactly the 8-bit images
    (as ``x / 255``), one query per image. With ``work_dir`` each finished chunk's labels
    are kept, so an interrupted run resumes without asking the teacher again.
    """
    if n < 1:
        raise ValueError(f"need n >= 1 random images, got {n}")
    shape = tuple(oracle.input_shape)
    parts = None
    if work_dir is not None:
        parts = prepare_work_dir(work_dir, {"key": f"random-labels:{kind}:{seed}:{chunk}:{n}:{shape}"}, "random labels")
    n_chunks = -(-n // chunk)

    def images(c: int) -> torch.Tensor:
        lo, hi = c * chunk, min(n, (c + 1) * chunk)
        return random_images(kind, hi - lo, shape, seed, chunk, start=lo)

    with QueryProgress(n, f"random[{kind}]", unit="image", enabled=progress, max_queries=n) as bar:
        def compute(c: int) -> dict[str, torch.Tensor]:
            x = images(c)
            y = oracle(x.to(device).float().div_(255)).cpu()
            bar.queries(len(y))
            return {"y": y}

        def before(mine: list[int]) -> None:  # under torchrun: this rank's share of the budget follows its chunks
            pool_budget(oracle, sum(min(n, (c + 1) * chunk) - c * chunk for c in mine))

        chunks, report = run_chunks(n_chunks, compute, parts, before=before,
                                    on_chunk=lambda c, t, reused: bar.advance(len(t["y"])))
    if report.reused:
        reused = sum(len(chunks[c]["y"]) for c in report.reused)
        log.info(f"random[{kind}]: {reused:,} labels read from {work_dir} (not paid again); "
                 f"{n - reused:,} paid now")
    ys = torch.cat([t["y"] for t in chunks])
    if ys.shape != (n,):
        raise ValueError(f"{work_dir} holds {tuple(ys.shape)} labels, expected {n}: delete it")
    xs = torch.cat([images(c) for c in range(n_chunks)])
    return xs, ys

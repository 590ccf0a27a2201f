"""benchmarks/invariance.py measures how often a teacher keeps its label under a small
transform; checked on teachers whose answers under each transform are known exactly."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from zsdb3kd.oracle import TorchOracle
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def _invariance():
    return load_script("invariance", ROOT / "benchmarks" / "invariance.py")


class Side(nn.Module):
    """Class 1 when the left half is brighter than the right half, else class 0."""

    def forward(self, x):
        w = x.shape[-1] // 2
        d = x[..., :w].sum((1, 2, 3)) - x[..., w:].sum((1, 2, 3))
        return torch.stack([-d, d], 1)


class Total(nn.Module):
    """Class 1 when the image's total brightness passes a threshold: blind to position."""

    def forward(self, x):
        d = x.sum((1, 2, 3)) - 16.0
        return torch.stack([-d, d], 1)


def test_survival_counts_kept_labels_per_transform():
    inv = _invariance()
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(200, 1, 8, 8)
    x[:100, :, 2:6, 0:2] = 1.0  # a bright bar at the left edge: class 1 for Side
    x[100:, :, 2:6, 6:8] = 1.0  # at the right edge: class 0
    x = (x + 0.01 * torch.rand(x.shape, generator=g)).clamp(0, 1)
    side = inv.survival(TorchOracle(Side(), (1, 8, 8), 2), x, seed=0)
    assert side["labels"] == [100, 100]
    assert side["hflip"] == {"all": 0.0, "worst_class": 0.0}  # a mirror swaps every label
    assert side["shift1"]["all"] == 100.0  # a one-pixel move keeps the bar on its side
    far = torch.rand(300, 1, 8, 8, generator=g) * 0.3
    far[:150] += 0.4  # sums far from the threshold: losing a border row and column crosses nothing
    total = inv.survival(TorchOracle(Total(), (1, 8, 8), 2), far, seed=0)
    assert total["hflip"]["all"] == total["shift1"]["all"] == total["shift2"]["all"] == 100.0
    near = torch.full((900, 1, 8, 8), 0.27)  # just above the threshold: any real move (zero fill) crosses
    kept = inv.survival(TorchOracle(Total(), (1, 8, 8), 2), near, seed=0)
    assert kept["hflip"]["all"] == 100.0
    assert 5 < kept["shift1"]["all"] < 20  # only the draws that do not move (1 in 9) keep the label
    assert 1 < kept["shift2"]["all"] < kept["shift1"]["all"]  # (1 in 25)

"""benchmarks/priors.py: its prototype kind and brightness stretch do what they say, and the
ensemble mode refuses a folder that holds no finished run before training anything."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zsdb3kd.budget import candidates as C
from zsdb3kd.store import generator
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def _priors():
    return load_script("priors", ROOT / "benchmarks" / "priors.py")


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 12)])
def test_parts_are_images_of_the_shape_the_same_under_a_seed(shape):
    parts = _priors().parts
    a = parts(64, shape, generator(0, "t"))
    assert a.shape == (64, *shape) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, parts(64, shape, generator(0, "t")))
    assert not torch.equal(a, parts(64, shape, generator(1, "t")))
    assert (a.flatten(1).amax(1) > 0.1).float().mean() > 0.9  # an object in (nearly) every image


def test_stretch_puts_the_brightest_pixel_at_one_for_its_share_only():
    stretched = _priors().stretched
    dim = lambda n, shape, g: torch.rand(n, *shape, generator=g) * 0.5  # noqa: E731
    full = stretched(dim, 1.0)(256, (1, 8, 8), generator(0, "s"))
    assert torch.allclose(full.flatten(1).amax(1), torch.ones(256))
    none = stretched(dim, 0.0)(256, (1, 8, 8), generator(0, "s"))
    assert torch.equal(none, dim(256, (1, 8, 8), generator(0, "s")))
    half = stretched(dim, 0.5)(2000, (1, 8, 8), generator(0, "s")).flatten(1).amax(1)
    assert 0.4 < (half > 0.999).float().mean() < 0.6


def test_the_ensemble_mode_refuses_a_folder_without_rounds(tmp_path):
    with pytest.raises(SystemExit, match="no round-"):
        _priors().ensemble(tmp_path, [0], "fashion-mnist", None, torch.zeros(1, dtype=torch.long))


def test_the_prototype_kind_is_not_registered_by_importing_the_benchmark():
    _priors()
    assert "parts" not in C.GENERATORS

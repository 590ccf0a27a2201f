"""Soft labels from boundary distances: z_t = 1/d_t, z_c = sum_t 1/d_t, targets softmax(z/T)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zsdb3kd.softlabels import MIN_DISTANCE, logits_from_distances, soft_targets

NAN, INF = float("nan"), float("inf")


def test_golden_values():
    d = torch.tensor([[NAN, 2.0, 4.0], [1.0, NAN, INF]])
    z = logits_from_distances(d, torch.tensor([0, 1]))
    expected = torch.tensor([[0.75, 0.5, 0.25], [1.0, 1.0, 0.0]])
    assert z.dtype == torch.float32 and z.shape == (2, 3)
    torch.testing.assert_close(z, expected, rtol=0, atol=1e-7)


def test_golden_values_against_numpy_reference():
    rng = np.random.default_rng(0)
    d = rng.uniform(0.1, 5.0, size=(7, 5))
    labels = rng.integers(0, 5, size=7)
    d[1, (labels[1] + 2) % 5] = np.inf
    expected = np.zeros_like(d)
    for i, c in enumerate(labels):
        for t in range(5):
            if t != c:
                expected[i, t] = 1.0 / d[i, t]
        expected[i, c] = expected[i].sum()
    z = logits_from_distances(torch.from_numpy(d), torch.from_numpy(labels))
    np.testing.assert_allclose(z.numpy(), expected, rtol=1e-6)
    # the own class gets the largest logit: equal to the sum of the others
    assert (z.argmax(1).numpy() == labels).all()


def test_inf_distance_gives_zero_logit():
    d = torch.tensor([[NAN, INF, INF, 0.5]])
    z = logits_from_distances(d, torch.tensor([0]))
    assert z.tolist() == [[2.0, 0.0, 0.0, 2.0]]


def test_all_targets_unreached_gives_all_zero_logits():
    z = logits_from_distances(torch.tensor([[INF, NAN, INF]]), torch.tensor([1]))
    assert z.tolist() == [[0.0, 0.0, 0.0]]


@pytest.mark.parametrize("own", [NAN, 0.0, -3.0, 7.0, INF, -INF])
def test_own_class_entry_is_ignored_whatever_its_value(own):
    d = torch.tensor([[2.0, own, 4.0]])
    z = logits_from_distances(d, torch.tensor([1]))
    torch.testing.assert_close(z, torch.tensor([[0.5, 0.75, 0.25]]), rtol=0, atol=1e-7)


def test_zero_distance_is_clamped_not_infinite():
    z = logits_from_distances(torch.tensor([[NAN, 0.0, 1.0]]), torch.tensor([0]))
    assert torch.isfinite(z).all()
    assert z[0, 1].item() == pytest.approx(1.0 / MIN_DISTANCE, rel=1e-6)
    assert z[0, 0].item() == pytest.approx(1.0 / MIN_DISTANCE + 1.0, rel=1e-6)


def test_inputs_are_not_modified():
    d = torch.tensor([[NAN, 2.0, 4.0], [1.0, -5.0, INF]])
    labels = torch.tensor([0, 1])
    d0, l0 = d.clone(), labels.clone()
    logits_from_distances(d, labels)
    assert torch.equal(torch.nan_to_num(d, nan=-99.0), torch.nan_to_num(d0, nan=-99.0)) and torch.equal(labels, l0)


@pytest.mark.parametrize(
    "d, labels",
    [
        (torch.ones(3), torch.tensor([0, 1, 2])),  # distances not 2-D
        (torch.ones(2, 3, 1), torch.tensor([0, 1])),  # 3-D
        (torch.ones(2, 3), torch.tensor([0, 1, 2])),  # too many labels
        (torch.ones(2, 3), torch.tensor([[0, 1]])),  # labels not 1-D
        (torch.ones(2, 3), torch.tensor([0, 3])),  # label out of range
        (torch.ones(2, 3), torch.tensor([-1, 0])),  # negative label
        (torch.tensor([[NAN, -1.0, 2.0]]), torch.tensor([0])),  # negative distance to another class
        (torch.tensor([[NAN, NAN, 2.0]]), torch.tensor([0])),  # nan distance to another class
        (torch.tensor([[NAN, -INF, 2.0]]), torch.tensor([0])),
    ],
)
def test_validation_errors(d, labels):
    with pytest.raises(ValueError):
        logits_from_distances(d, labels)


def test_soft_targets_equal_softmax_over_temperature_and_sum_to_one():
    z = logits_from_distances(torch.tensor([[NAN, 2.0, 4.0], [1.0, NAN, INF], [0.3, 0.1, NAN]]),
                              torch.tensor([0, 1, 2]))
    for T in (0.5, 1.0, 20.0):
        p = soft_targets(z, T)
        zz = z.double().numpy() / T
        e = np.exp(zz - zz.max(1, keepdims=True))
        np.testing.assert_allclose(p.numpy(), e / e.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(p.sum(1), torch.ones(3))
        assert (p > 0).all()
    # golden value: first row at T = 1
    row = np.exp([0.75, 0.5, 0.25])
    np.testing.assert_allclose(soft_targets(z, 1.0)[0].numpy(), row / row.sum(), rtol=1e-6)
    # higher temperature is flatter
    assert soft_targets(z, 20.0).max() < soft_targets(z, 1.0).max()


@pytest.mark.parametrize("T", [0.0, -1.0, -1e-9])
def test_soft_targets_reject_non_positive_temperature(T):
    with pytest.raises(ValueError):
        soft_targets(torch.zeros(2, 3), T)


def test_soft_targets_reject_nan_temperature():
    with pytest.raises(ValueError):
        soft_targets(torch.zeros(2, 3), math.nan)

"""KD loss golden values and the training loop: determinism, model selection, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from zsdb3kd import distill
from zsdb3kd.distill import TrainSettings as TrainConfig, accuracy, augment_batch, kd_loss, predict, train

SHAPE = (1, 4, 4)




# ---------------------------------------------------------------------------------------
# kd_loss
# ---------------------------------------------------------------------------------------


def _np_log_softmax(a: np.ndarray) -> np.ndarray:
    a = a - a.max(1, keepdims=True)
    return a - np.log(np.exp(a).sum(1, keepdims=True))


def _np_kd(s, y, z, T, w, reduction):
    s, z = np.asarray(s, np.float64), np.asarray(z, np.float64)
    ce = -_np_log_softmax(s)[np.arange(len(y)), y].mean()
    logq = _np_log_softmax(z / T)
    logp = _np_log_softmax(s / T)
    kl = (np.exp(logq) * (logq - logp)).sum()
    if reduction == "batchmean":
        kl /= len(y)
    return ce + w * kl


def test_kd_loss_by_hand_uniform_student():
    # student uniform over 2 classes; teacher softmax(z/T) = (3/4, 1/4)
    T = 4.0
    s = torch.zeros(2, 2)
    y = torch.tensor([0, 1])
    z = torch.tensor([[T * math.log(3.0), 0.0], [T * math.log(3.0), 0.0]])
    ce = math.log(2.0)
    kl_row = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_loss(s, y, z, T).item() == pytest.approx(ce + 2 * kl_row, rel=1e-6)  # summed over the batch
    assert kd_loss(s, y, z, T, reduction="batchmean").item() == pytest.approx(ce + kl_row, rel=1e-6)
    assert kd_loss(s, y, z, T, kl_weight=0.5).item() == pytest.approx(ce + kl_row, rel=1e-6)
    assert kd_loss(s, y, None, T).item() == pytest.approx(ce, rel=1e-6)
    assert kd_loss(s, y, z, T, kl_weight=0.0).item() == pytest.approx(ce, rel=1e-6)


def test_kd_loss_zero_kl_when_student_equals_teacher():
    s = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]])
    y = torch.tensor([2, 1])
    ce = torch.nn.functional.cross_entropy(s, y).item()
    assert kd_loss(s, y, s.clone(), 7.0).item() == pytest.approx(ce, abs=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "batchmean"])
@pytest.mark.parametrize("T, w", [(1.0, 1.0), (20.0, 1.0), (3.0, 0.25)])
def test_kd_loss_matches_numpy_reference(reduction, T, w):
    rng = np.random.default_rng(int(T * 10 + w * 100))
    s = rng.normal(size=(5, 4)) * 3
    z = rng.normal(size=(5, 4)) * 5
    y = rng.integers(0, 4, size=5)
    got = kd_loss(torch.tensor(s, dtype=torch.float64), torch.tensor(y), torch.tensor(z, dtype=torch.float64),
                  T, kl_weight=w, reduction=reduction)
    assert got.item() == pytest.approx(_np_kd(s, y, z, T, w, reduction), rel=1e-9)


def test_kd_loss_has_no_temperature_squared_factor():
    s = torch.tensor([[0.0, 1.0]])
    z = torch.tensor([[5.0, -5.0]])
    y = torch.tensor([0])
    for T in (2.0, 10.0):
        assert kd_loss(s, y, z, T).item() == pytest.approx(_np_kd(s.numpy(), [0], z.numpy(), T, 1.0, "sum"), rel=1e-6)


def test_kd_loss_plain_ce_without_teacher():
    s = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3]])
    y = torch.tensor([0, 2])
    expected = -np.mean([_np_log_softmax(s.numpy().astype(np.float64))[i, c] for i, c in enumerate([0, 2])])
    assert kd_loss(s, y, None, 20.0).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_gradient_flows_to_student_only():
    s = torch.randn(3, 4, requires_grad=True)
    z = torch.randn(3, 4, requires_grad=True)
    kd_loss(s, torch.tensor([0, 1, 2]), z.detach(), 2.0).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------
# TrainConfig
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(epochs=0), dict(batch_size=0), dict(lr=0.0), dict(lr=-1.0),
                                dict(temperature=0.0), dict(kl_reduction="mean"), dict(augment="rotate")])
def test_train_config_validation(kw):
    with pytest.raises(ValueError):
        TrainConfig(**kw)


# ---------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------


def _linear_problem(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, generator=torch.Generator().manual_seed(123))
    x = torch.rand(n, *SHAPE, generator=g)
    score = x.reshape(n, -1) @ w
    y = (score > score.median()).long() if n > 1 else (score > 0).long()
    # a margin keeps the problem comfortably separable
    keep = (score - score.median()).abs() > 0.15
    return x[keep], y[keep]


def _mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 2))


@pytest.fixture(scope="module")
def problem():
    x, y = _linear_problem(900, seed=0)
    xv, yv = _linear_problem(400, seed=1)
    return x, y, xv, yv


def test_train_is_deterministic_under_seed(problem):
    x, y, xv, yv = problem
    cfg, seed = TrainConfig(epochs=4, batch_size=32, lr=1e-2), 5
    tl = torch.randn(len(x), 2, generator=torch.Generator().manual_seed(2))
    runs = [train(_mlp(dropout=0.3), x, y, xv, yv, cfg, seed=seed, teacher_logits=tl, progress=False) for _ in range(2)]
    a, b = runs
    assert a.state_dict.keys() == b.state_dict.keys()
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    assert [h["val_acc"] for h in a.history] == [h["val_acc"] for h in b.history]
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert a.best_epoch == b.best_epoch
    # the seed matters: another one shuffles differently
    c = train(_mlp(dropout=0.3), x, y, xv, yv, TrainConfig(epochs=4, batch_size=32, lr=1e-2), seed=6,
              teacher_logits=tl, progress=False)
    assert any(not torch.equal(a.state_dict[k], c.state_dict[k]) for k in a.state_dict)


def _check_selection(model, res, xv, yv):
    accs = [h["val_acc"] for h in res.history]
    assert [h["epoch"] for h in res.history] == list(range(len(accs)))
    assert res.best_epoch == int(np.argmax(accs))  # first epoch with the best accuracy
    assert res.best_val_acc == max(accs)
    # the returned state (and the model, which is left in it) reproduces that accuracy
    fresh = _mlp(seed=99)
    fresh.load_state_dict(res.state_dict)
    assert accuracy(fresh, xv, yv) == pytest.approx(res.best_val_acc, abs=1e-9)
    assert accuracy(model, xv, yv) == pytest.approx(res.best_val_acc, abs=1e-9)
    return accs


def test_selects_best_validation_epoch_not_the_last(problem):
    # training labels are the opposite of the validation labels: validation accuracy falls
    # as training proceeds, so the best epoch is early and the last is much worse
    x, y, xv, yv = problem
    model = _mlp(seed=1)
    res = train(model, x, 1 - y, xv, yv, TrainConfig(epochs=6, batch_size=64, lr=3e-3), seed=0, progress=False)
    accs = _check_selection(model, res, xv, yv)
    assert res.best_epoch < len(accs) - 1
    assert accs[-1] < res.best_val_acc - 10


def test_selects_best_validation_epoch_not_the_first(problem):
    x, y, xv, yv = problem
    model = _mlp(seed=2)
    res = train(model, x, y, xv, yv, TrainConfig(epochs=12, batch_size=64, lr=3e-3), seed=0, progress=False)
    accs = _check_selection(model, res, xv, yv)
    assert res.best_epoch > 0 and accs[0] < res.best_val_acc
    # the tiny linearly separable problem is learned
    assert res.best_val_acc > 90.0
    assert accuracy(model, x, y) > 90.0


def test_returned_state_is_a_copy(problem):
    x, y, xv, yv = problem
    model = _mlp()
    res = train(model, x, y, xv, yv, TrainConfig(epochs=1, batch_size=128), seed=0, progress=False)
    before = {k: v.clone() for k, v in res.state_dict.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for k, v in res.state_dict.items():
        assert torch.equal(v, before[k])


def test_teacher_logits_are_aligned_with_samples(problem):
    # labels are pure noise; only the teacher logits (aligned row by row with x) carry the
    # class, with a heavy KL weight the student must learn it from them
    x, y, xv, yv = problem
    noise = torch.randint(0, 2, (len(x),), generator=torch.Generator().manual_seed(3))
    tl = torch.nn.functional.one_hot(y, 2).float() * 6.0 - 3.0
    model = _mlp(seed=3)
    res = train(model, x, noise, xv, yv, TrainConfig(epochs=12, batch_size=64, lr=3e-3, temperature=1.0,
                                                     kl_weight=1.0, kl_reduction="batchmean"), seed=0,
                teacher_logits=tl, progress=False)
    assert res.best_val_acc > 85.0
    # same noise labels without the teacher: nothing to learn
    res0 = train(_mlp(seed=3), x, noise, xv, yv, TrainConfig(epochs=12, batch_size=64, lr=3e-3), seed=0,
                 progress=False)
    assert res0.history[-1]["val_acc"] < 75.0


def test_rejects_empty_validation(problem):
    x, y, _, _ = problem
    with pytest.raises(ValueError, match="validation"):
        train(_mlp(), x, y, x[:0], y[:0], TrainConfig(epochs=1), progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_rejects_non_finite_teacher_logits(problem, bad):
    x, y, xv, yv = problem
    tl = torch.zeros(len(x), 2)
    tl[len(x) // 2, 1] = bad
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="non-finite"):
        train(model, x, y, xv, yv, TrainConfig(epochs=1), teacher_logits=tl, progress=False)
    for k, v in model.state_dict().items():  # refused before any step
        assert torch.equal(v, before[k])


def test_rejects_mismatched_shapes(problem):
    x, y, xv, yv = problem
    with pytest.raises(ValueError):
        train(_mlp(), x, y[:-1], xv, yv, TrainConfig(epochs=1), progress=False)
    with pytest.raises(ValueError):
        train(_mlp(), x, y, xv, yv, TrainConfig(epochs=1), teacher_logits=torch.zeros(len(x) - 1, 2), progress=False)


def test_batchnorm_batch_of_one_is_skipped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    x, y = _linear_problem(40, seed=4)
    n = (len(x) // 4) * 4 + 1  # last batch holds one sample
    x, y = x[:n], y[:n]
    res = train(model, x, y, x, y, TrainConfig(epochs=2, batch_size=4), seed=0, progress=False)
    assert len(res.history) == 2 and all(math.isfinite(h["loss"]) for h in res.history)


def test_predict_and_accuracy():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    model.train()
    x = torch.rand(10, *SHAPE)
    out = predict(model, x, batch=3)
    assert out.shape == (10, 3)
    assert model.training  # mode restored
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))
    y = out.argmax(1)
    assert accuracy(model, x, y, batch=4) == 100.0
    assert accuracy(model, x, (y + 1) % 3) == 0.0
    with pytest.raises(ValueError):
        accuracy(model, x[:0], y[:0])


# ---------------------------------------------------------------------------------------
# augmentation
# ---------------------------------------------------------------------------------------


def test_flip_crop_is_a_shift_of_the_padded_image():
    x = torch.rand(64, 3, 6, 5, generator=torch.Generator().manual_seed(0)) + 0.5  # no zeros inside
    out = augment_batch(x, "flip-crop", torch.Generator().manual_seed(1), pad=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    padded_flipped = torch.nn.functional.pad(x.flip(-1), (2, 2, 2, 2))
    seen_shifts, flips = set(), 0
    for i in range(len(x)):  # a test may loop: find each output among all 25 shifts x 2 flips
        found = [(f, dy, dx) for f, src in ((0, padded), (1, padded_flipped)) for dy in range(5) for dx in range(5)
                 if torch.equal(out[i], src[i, :, dy:dy + 6, dx:dx + 5])]
        assert len(found) >= 1, i
        f, dy, dx = found[0]
        flips += f
        seen_shifts.add((dy, dx))
    assert 16 <= flips <= 48  # about half are mirrored
    assert len(seen_shifts) >= 15  # shifts are drawn per image, not per batch
    # deterministic under the generator; "none" is the identity and draws nothing
    again = augment_batch(x, "flip-crop", torch.Generator().manual_seed(1), pad=2)
    assert torch.equal(out, again)
    g = torch.Generator().manual_seed(3)
    before = g.get_state()
    assert augment_batch(x, "none", g) is x and torch.equal(g.get_state(), before)
    with pytest.raises(ValueError, match="augment"):
        augment_batch(x, "rotate", g)


def test_augment_changes_training_and_stays_deterministic(problem):
    x, y, xv, yv = problem
    cfg, seed = TrainConfig(epochs=2, batch_size=64, lr=1e-2, augment="flip-crop"), 0
    a = train(_mlp(), x, y, xv, yv, cfg, seed=seed, progress=False)
    b = train(_mlp(), x, y, xv, yv, cfg, seed=seed, progress=False)
    plain = train(_mlp(), x, y, xv, yv, TrainConfig(epochs=2, batch_size=64, lr=1e-2), seed=0, progress=False)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert any(not torch.equal(a.state_dict[k], plain.state_dict[k]) for k in a.state_dict)


def test_settings_key_tracks_every_field_and_validation_names_the_key():
    from zsdb3kd.settings import ConfigError, validate

    plain = TrainConfig(epochs=3)
    assert plain.key() == TrainConfig(epochs=3).key()
    for change in ({"epochs": 4}, {"augment": "flip-crop"}, {"kl_reduction": "sum"}, {"lr": 2e-3}):
        assert plain.replace(**change).key() != plain.key()
    with pytest.raises(ConfigError, match=r"kl_reduction: Input should be 'batchmean' or 'sum' \(got 'mean'\)"):
        validate(TrainConfig, {"kl_reduction": "mean"})
    with pytest.raises(ConfigError, match="epoch: unknown key; did you mean 'epochs'"):
        validate(TrainConfig, {"epoch": 3})


# ---------------------------------------------------------------------------------------
# interrupted training resumes exactly
# ---------------------------------------------------------------------------------------


def _interrupt_after(monkeypatch, epochs_done: int) -> None:
    """Make the epoch after ``epochs_done`` raise KeyboardInterrupt (as Ctrl-C would)."""
    real = distill.accuracy
    calls = {"n": 0}

    def fake(*a, **k):
        calls["n"] += 1
        if calls["n"] > epochs_done:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(distill, "accuracy", fake)


@pytest.mark.parametrize("augment", ["none", "flip-crop"])
def test_interrupted_training_resumes_to_the_same_result(problem, tmp_path, monkeypatch, augment):
    x, y, xv, yv = problem
    cfg, seed = TrainConfig(epochs=5, batch_size=32, lr=1e-2, augment=augment), 3
    tl = torch.randn(len(x), 2, generator=torch.Generator().manual_seed(2))
    whole = train(_mlp(dropout=0.3), x, y, xv, yv, cfg, seed=seed, teacher_logits=tl, progress=False)
    ck = tmp_path / "student.train.pt"
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            train(_mlp(dropout=0.3), x, y, xv, yv, cfg, seed=seed, teacher_logits=tl, progress=False, checkpoint=ck,
                  checkpoint_every=1e9)  # only the interruption writes it
    assert ck.exists()
    torch.manual_seed(12345)  # the global generator (dropout) must come from the checkpoint, not from here
    resumed = train(_mlp(seed=7, dropout=0.3), x, y, xv, yv, cfg, seed=seed, teacher_logits=tl, progress=False, checkpoint=ck)
    assert not ck.exists()  # removed once training ends
    assert [h["epoch"] for h in resumed.history] == list(range(5))
    assert resumed.history == whole.history and resumed.best_epoch == whole.best_epoch
    for k in whole.state_dict:
        assert torch.equal(resumed.state_dict[k], whole.state_dict[k]), k


def test_interrupted_twice_and_periodic_saves(problem, tmp_path, monkeypatch):
    x, y, xv, yv = problem
    cfg, seed = TrainConfig(epochs=6, batch_size=32, lr=1e-2), 1
    whole = train(_mlp(), x, y, xv, yv, cfg, seed=seed, progress=False)
    ck = tmp_path / "t.train.pt"
    for done in (2, 1):  # 2 epochs, then 1 more; each run saves every epoch (checkpoint_every=0)
        with monkeypatch.context() as m:
            _interrupt_after(m, done)
            with pytest.raises(KeyboardInterrupt):
                train(_mlp(), x, y, xv, yv, cfg, seed=seed, progress=False, checkpoint=ck, checkpoint_every=0)
        assert torch.load(ck, weights_only=True)["state"]["epoch"] == (2 if done == 2 else 3)
    resumed = train(_mlp(), x, y, xv, yv, cfg, seed=seed, progress=False, checkpoint=ck)
    assert resumed.history == whole.history
    assert all(torch.equal(resumed.state_dict[k], whole.state_dict[k]) for k in whole.state_dict)


def test_checkpoint_of_another_run_or_a_foreign_file_is_refused(problem, tmp_path, monkeypatch):
    x, y, xv, yv = problem
    cfg = TrainConfig(epochs=3, batch_size=32, lr=1e-2)
    ck = tmp_path / "t.train.pt"
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            train(_mlp(), x, y, xv, yv, cfg, progress=False, checkpoint=ck)
    with pytest.raises(ValueError, match="other settings.*delete it"):
        train(_mlp(), x, y, xv, yv, TrainConfig(epochs=3, batch_size=32, lr=2e-2), progress=False, checkpoint=ck)
    with pytest.raises(ValueError, match="other settings"):  # same size, other data
        train(_mlp(), x.flip(0), y.flip(0), xv, yv, cfg, progress=False, checkpoint=ck)
    with pytest.raises(ValueError, match="other settings"):  # other soft labels (e.g. another robustness file)
        train(_mlp(), x, y, xv, yv, cfg, teacher_logits=torch.zeros(len(x), 2), progress=False, checkpoint=ck)
    with pytest.raises(ValueError, match="other settings"):  # another validation split
        train(_mlp(), x, y, xv[1:], yv[1:], cfg, progress=False, checkpoint=ck)
    assert ck.exists()  # a refused checkpoint is left alone

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "zsdb3kd-train-checkpoint/1", "state": Evil()}, ck)
    with pytest.raises(ValueError, match="cannot read the training checkpoint"):
        train(_mlp(), x, y, xv, yv, cfg, progress=False, checkpoint=ck)
    torch.save({"model": {}}, ck)
    with pytest.raises(ValueError, match="not a zsdb3kd training checkpoint"):
        train(_mlp(), x, y, xv, yv, cfg, progress=False, checkpoint=ck)
    ck.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        train(_mlp(), x, y, xv, yv, cfg, progress=False, checkpoint=ck)

"""Zero-shot pseudo-sample synthesis (``zsdb3kd.synthesis``) against tiny linear teachers.

The 1x8x8 teacher is the shared ``LinearTeacher`` (K=4); a second linear teacher works on
3x32x32 inputs. For a linear teacher the exact boundary distance is a small QP, so the
synthesis' distance log can be checked against the truth.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import K, SHAPE, LinearTeacher, exact_distance
from safetensors.torch import load_file
from torch import nn

from zsdb3kd.oracle import FunctionOracle, QueryBudgetExceeded, TorchOracle
from zsdb3kd.synthesis import (
    NOISE_KINDS, PseudoSamples, SynthesisError, SynthesisSettings, draw_noise, sample_class_noise, synthesize,
    untargeted_search,
)

SHAPE3 = (3, 32, 32)




class LinearTeacher3(nn.Module):
    """``W x + b`` on 3x32x32 images, biases centred so that every class owns part of the box."""

    def __init__(self, seed: int = 3, k: int = K) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = SHAPE3[0] * SHAPE3[1] * SHAPE3[2]
        self.w = nn.Parameter(torch.randn(k, d, generator=g) / d ** 0.5, requires_grad=False)
        self.b = nn.Parameter(-self.w.sum(1) * 0.5, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1) @ self.w.T + self.b


def _labels(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


# small, fast settings for the 1x8x8 teacher
SMALL = dict(per_class=4, iterations=3, snapshots=(0, 1, 3, 7), queries_per_search=60, search_k=10, search_dirs=2,
             noise_batch=64, noise="mixed")


# ---------------------------------------------------------------------------------------
# draw_noise
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [SHAPE, SHAPE3])
@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_draw_noise_shape_range_and_determinism(kind, shape):
    a = draw_noise(kind, 7, shape, torch.Generator().manual_seed(5))
    b = draw_noise(kind, 7, shape, torch.Generator().manual_seed(5))
    c = draw_noise(kind, 7, shape, torch.Generator().manual_seed(6))
    assert a.shape == (7, *shape) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)  # same seed, same noise
    assert not torch.equal(a, c)  # another seed, other noise
    assert float(a.std()) > 0.01  # not a constant image
    # samples differ from each other (each is drawn with its own scales)
    flat = a.reshape(7, -1)
    assert (torch.cdist(flat, flat) + torch.eye(7) * 1e9).min() > 0


def test_mixed_noise_is_half_paper_half_smooth():
    for n in (1, 6, 7):
        mixed = draw_noise("mixed", n, SHAPE3, torch.Generator().manual_seed(11))
        g = torch.Generator().manual_seed(11)
        expected = torch.cat([draw_noise("paper", n // 2, SHAPE3, g), draw_noise("smooth", n - n // 2, SHAPE3, g)])
        assert torch.equal(mixed, expected)


def test_smooth_noise_is_low_frequency():
    g = torch.Generator().manual_seed(0)

    def roughness(x):  # mean absolute difference between horizontal neighbours
        return float((x[..., 1:] - x[..., :-1]).abs().mean())

    paper = draw_noise("paper", 200, SHAPE3, g)
    smooth = draw_noise("smooth", 200, SHAPE3, g)
    assert roughness(smooth) < 0.25 * roughness(paper)  # measured: 0.024 vs 0.35


def test_draw_noise_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown noise kind"):
        draw_noise("gaussian", 3, SHAPE, torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    dict(per_class=0),
    dict(per_class=-3),
    dict(iterations=-1),
    dict(step=0.0),
    dict(queries_per_search=40, search_k=40),  # must exceed search_k
    dict(queries_per_search=10, search_k=40),
    dict(noise="gaussian"),
    dict(search="random"),
    dict(noise_batch=0),
    dict(noise_queries=0),
])
def test_invalid_settings_are_refused(bad):
    with pytest.raises(ValueError):
        SynthesisSettings(**bad)


def test_settings_key_tracks_every_field():
    base = SynthesisSettings(**SMALL)
    assert base.key() == SynthesisSettings(**SMALL).key()
    assert base.key() != SynthesisSettings(**{**SMALL, "seed": 1}).key()
    assert base.key() != SynthesisSettings(**{**SMALL, "queries_per_search": 61}).key()
    assert base.key() != SynthesisSettings(**{**SMALL, "noise": "paper"}).key()


# ---------------------------------------------------------------------------------------
# stage 1: class noise
# ---------------------------------------------------------------------------------------


class RecordingOracle(FunctionOracle):
    """A FunctionOracle that keeps every batch it was asked and the answers."""

    def __init__(self, fn, shape, k, **kw):
        self.asked: list[tuple[torch.Tensor, torch.Tensor]] = []

        def rec(x):
            y = fn(x)
            self.asked.append((x.clone(), y.clone()))
            return y

        super().__init__(rec, shape, k, **kw)


def test_sample_class_noise_keeps_first_hits_of_every_class():
    teacher = LinearTeacher()
    oracle = RecordingOracle(lambda x: _labels(teacher, x), SHAPE, K)
    s = SynthesisSettings(per_class=5, noise_batch=16, noise="mixed", noise_queries=10_000)
    x, y = sample_class_noise(oracle, s, progress=False)
    assert x.shape == (K * 5, *SHAPE) and y.shape == (K * 5,)
    assert torch.equal(y, torch.arange(K).repeat_interleave(5))  # sorted by class, per_class each
    assert torch.equal(_labels(teacher, x), y)  # the teacher really calls each sample its class
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    # every query went through the oracle, nothing else: its count is the sum of the batches
    assert oracle.queries == sum(len(b) for b, _ in oracle.asked) <= s.noise_queries
    assert all(len(b) <= s.noise_batch for b, _ in oracle.asked)
    # the kept samples are the first ``per_class`` ones labelled c, in query order
    all_x = torch.cat([b for b, _ in oracle.asked])
    all_y = torch.cat([l for _, l in oracle.asked])
    for c in range(K):
        assert torch.equal(x[y == c], all_x[all_y == c][:5])
    # it stopped as soon as every class was full: before the last batch some class was short
    before_last = torch.cat([l for _, l in oracle.asked[:-1]]) if len(oracle.asked) > 1 else torch.empty(0)
    assert int(torch.bincount(before_last.long(), minlength=K).min()) < 5
    # deterministic under the settings' seed
    x2, y2 = sample_class_noise(TorchOracle(teacher, SHAPE, K), s, progress=False)
    assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.parametrize("shape", [SHAPE, SHAPE3])
def test_sample_class_noise_within_budget(shape):
    teacher = LinearTeacher() if shape == SHAPE else LinearTeacher3()
    oracle = TorchOracle(teacher, shape, K)
    s = SynthesisSettings(per_class=3, noise_batch=50, noise_queries=2000, noise="smooth")
    x, y = sample_class_noise(oracle, s, progress=False)
    assert x.shape == (K * 3, *shape)
    assert torch.equal(_labels(teacher, x), y)
    assert 0 < oracle.queries <= s.noise_queries


def test_class_never_answered_is_an_error_with_counts():
    teacher = LinearTeacher()
    # a teacher that never answers class 3
    oracle = FunctionOracle(lambda x: _labels(teacher, x).clamp(max=2), SHAPE, K)
    s = SynthesisSettings(per_class=2, noise_batch=64, noise_queries=500)  # 500 is not a multiple of 64
    with pytest.raises(SynthesisError) as e:
        sample_class_noise(oracle, s, progress=False)
    assert oracle.queries == 500  # the whole budget and not one query more
    msg = str(e.value)
    m = re.search(r"per class: (.*?)\. ", msg)
    assert m, msg
    counts = {int(c): int(n) for c, n in re.findall(r"(\d+): (\d+)", m.group(1))}
    assert sorted(counts) == list(range(K))
    assert counts[3] == 0
    assert sum(counts.values()) == 500  # every labelled query is reported
    assert all(counts[c] > 0 for c in range(3))
    # synthesize surfaces the same error
    with pytest.raises(SynthesisError, match="3: 0"):
        synthesize(FunctionOracle(lambda x: _labels(teacher, x).clamp(max=2), SHAPE, K), s, progress=False)


# ---------------------------------------------------------------------------------------
# synthesize
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run():
    teacher = LinearTeacher()
    oracle = TorchOracle(teacher, SHAPE, K)
    s = SynthesisSettings(**SMALL)
    return teacher, oracle, s, synthesize(oracle, s, progress=False)


def test_synthesize_keeps_labels_and_snapshots(small_run):
    teacher, oracle, s, p = small_run
    N = K * s.per_class
    assert p.x.shape == (N, *SHAPE)
    assert torch.equal(p.y, torch.arange(K).repeat_interleave(s.per_class))
    assert float(p.x.min()) >= 0 and float(p.x.max()) <= 1
    assert torch.equal(_labels(teacher, p.x), p.y)  # pushing never changed a label
    # snapshots at the requested rounds that exist (7 > iterations is skipped)
    assert sorted(p.snapshots) == [0, 1, 3]
    for it, xs in p.snapshots.items():
        assert xs.shape == p.x.shape
        assert torch.equal(_labels(teacher, xs), p.y), f"snapshot {it}"
    assert torch.equal(p.snapshots[s.iterations], p.x)
    # snapshot 0 is the raw class noise of stage 1
    x0, _ = sample_class_noise(TorchOracle(teacher, SHAPE, K), s, progress=False)
    assert torch.equal(p.snapshots[0], x0)
    # the samples moved (a sample whose few random initial directions all miss a boundary stays put
    # in that round; on this teacher 1 of 16 never moves)
    moved = (p.x - x0).reshape(N, -1).norm(dim=1) > 0
    assert int(moved.sum()) >= N * 3 // 4


def test_synthesize_pushes_away_from_the_boundary(small_run):
    teacher, _, s, p = small_run
    md = p.mean_distance
    assert md.shape == (s.iterations + 1,)
    assert torch.isfinite(md).all()
    assert float(md[-1]) > float(md[0])
    assert float(md[-1]) > 1.5 * float(md[0])  # measured 0.37 -> 1.14
    # the true (exact) untargeted distance grew too, not just its estimate
    def exact(x):
        return torch.tensor([min(exact_distance(teacher, x[i], t) for t in range(K) if t != int(p.y[i]))
                             for i in range(len(p.y))])

    e0, e1 = exact(p.snapshots[0]), exact(p.x)
    assert float(e1.mean()) > 1.5 * float(e0.mean())  # measured 0.19 -> 0.61
    assert (e1 >= e0 - 1e-6).float().mean() >= 0.75  # per sample (measured: all 16)


def test_untargeted_search_finds_real_boundary_points():
    teacher = LinearTeacher()
    s = SynthesisSettings(**{**SMALL, "search_dirs": 4, "queries_per_search": 100})
    x, y = sample_class_noise(TorchOracle(teacher, SHAPE, K), s, progress=False)
    oracle = TorchOracle(teacher, SHAPE, K)
    theta, lam, best, q = untargeted_search(oracle, x, y, s, torch.Generator().manual_seed(0))
    N = len(y)
    assert theta.shape == (N, x[0].numel()) and lam.shape == best.shape == q.shape == (N,)
    assert int(q.max()) <= s.queries_per_search * s.first_round_factor  # round 0 budget (no warm start)
    assert int(q.sum()) == oracle.queries
    found = torch.isfinite(best)
    assert float(found.float().mean()) >= 0.75
    exact = torch.tensor([min(exact_distance(teacher, x[i], t) for t in range(K) if t != int(y[i]))
                          for i in range(N)])
    # a reported distance is that of a point the teacher labelled differently: never below the truth
    assert (best[found] >= exact[found] * (1 - 1e-4)).all()
    assert float((best[found] / exact[found]).median()) < 2.0  # measured 1.36 (15 of 16 found)
    # theta points to a point of another class, at distance lam
    f = torch.nonzero(found).squeeze(1)
    assert torch.allclose(theta[f].norm(dim=1), torch.ones(len(f)), atol=1e-4)
    tip = (x[f].reshape(len(f), -1) + lam[f, None] * theta[f]).clamp(0, 1).view(-1, *SHAPE)
    assert (_labels(teacher, tip) != y[f]).all()


def _band(x: torch.Tensor) -> torch.Tensor:
    """A non-linear teacher: the class is the band of the mean intensity (4 bands of width 0.25), so
    moving away from one band edge soon crosses the other."""
    return (x.reshape(len(x), -1).mean(1) * K).floor().long().clamp(0, K - 1)


def test_moves_that_would_change_the_label_are_halved():
    # a step of 2.0 (L2) shifts the mean of an 8x8 image by up to 0.25, a whole band: unchecked moves
    # change labels (without the check 1 of 16 final labels and snapshots 1..3 are wrong)
    s = SynthesisSettings(**{**SMALL, "step": 2.0, "snapshots": (0, 1, 2, 3)})
    oracle = FunctionOracle(_band, SHAPE, K)
    p = synthesize(oracle, s, progress=False)
    assert torch.equal(_band(p.x), p.y)
    for it, xs in p.snapshots.items():
        assert torch.equal(_band(xs), p.y), f"snapshot {it}"
    for it in range(s.iterations):
        moved = (p.snapshots[it + 1] - p.snapshots[it]).reshape(len(p.y), -1).norm(dim=1)
        assert float(moved.max()) <= s.step + 1e-5  # a move is at most lam (clipping only shortens it)
        assert float(moved.max()) > 0
    assert float(p.mean_distance[-1]) > float(p.mean_distance[0])
    assert p.provenance["total_queries"] == oracle.queries


def test_synthesize_provenance_counts_every_query(small_run):
    _, oracle, s, p = small_run
    prov = p.provenance
    assert prov["total_queries"] == oracle.queries
    assert prov["queries_this_session"] == oracle.queries
    assert prov["queries_noise"] + prov["queries_push"] == prov["total_queries"]
    assert prov["queries_noise"] > 0 and prov["queries_noise"] % s.noise_batch == 0
    assert prov["n"] == K * s.per_class
    assert prov["settings"]["seed"] == s.seed
    N = K * s.per_class
    # per round: one search per sample (round 0 with first_round_factor x the budget), <= max_halvings + 1
    # label checks per sample; plus the final measurement
    rounds = s.first_round_factor + (s.iterations - 1) + 1
    assert prov["queries_push"] <= N * (s.queries_per_search * rounds + (s.max_halvings + 1) * s.iterations)


def test_pseudo_samples_save_load_roundtrip(small_run, tmp_path):
    _, _, _, p = small_run
    path = p.save(tmp_path / "sub" / "pseudo.safetensors")
    q = PseudoSamples.load(path)
    assert torch.equal(q.x, p.x) and torch.equal(q.y, p.y)
    assert torch.equal(q.mean_distance, p.mean_distance)
    assert sorted(q.snapshots) == sorted(p.snapshots)
    assert all(torch.equal(q.snapshots[k], p.snapshots[k]) for k in p.snapshots)
    assert q.provenance["total_queries"] == p.provenance["total_queries"]
    with pytest.raises(FileNotFoundError):
        PseudoSamples.load(tmp_path / "missing.safetensors")


def test_synthesize_3x32x32():
    teacher = LinearTeacher3()
    oracle = TorchOracle(teacher, SHAPE3, K)
    s = SynthesisSettings(per_class=2, iterations=2, snapshots=(0, 2), queries_per_search=60, search_k=10,
                          search_dirs=2, noise_batch=64, noise="smooth")
    p = synthesize(oracle, s, progress=False)
    assert p.x.shape == (K * 2, *SHAPE3)
    assert torch.equal(p.y, torch.arange(K).repeat_interleave(2))
    assert float(p.x.min()) >= 0 and float(p.x.max()) <= 1
    assert torch.equal(_labels(teacher, p.x), p.y)
    assert sorted(p.snapshots) == [0, 2]
    for xs in p.snapshots.values():
        assert xs.shape == p.x.shape and torch.equal(_labels(teacher, xs), p.y)
    assert p.mean_distance.shape == (3,) and torch.isfinite(p.mean_distance).all()
    assert float(p.mean_distance[-1]) > float(p.mean_distance[0])
    assert p.provenance["total_queries"] == oracle.queries


def test_synthesize_zero_iterations():
    teacher = LinearTeacher()
    oracle = TorchOracle(teacher, SHAPE, K)
    s = SynthesisSettings(**{**SMALL, "iterations": 0})
    p = synthesize(oracle, s, progress=False)
    assert sorted(p.snapshots) == [0]
    assert torch.equal(p.snapshots[0], p.x)  # nothing moved
    assert p.mean_distance.shape == (1,) and torch.isfinite(p.mean_distance).all()
    assert p.provenance["total_queries"] == oracle.queries


# ---------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------

RESUME = dict(per_class=3, iterations=4, snapshots=(0, 2, 4), queries_per_search=50, search_k=10, search_dirs=2,
              noise_batch=64, noise="mixed", seed=3)


@pytest.fixture(scope="module")
def reference_run():
    """An uninterrupted run, without a work_dir."""
    oracle = TorchOracle(LinearTeacher(), SHAPE, K)
    return synthesize(oracle, SynthesisSettings(**RESUME), progress=False)


def _assert_same(p, ref):
    assert torch.equal(p.x, ref.x)
    assert torch.equal(p.y, ref.y)
    torch.testing.assert_close(p.mean_distance, ref.mean_distance, rtol=0, atol=0, equal_nan=True)
    assert sorted(p.snapshots) == sorted(ref.snapshots)
    for k in ref.snapshots:
        assert torch.equal(p.snapshots[k], ref.snapshots[k]), f"snapshot {k}"
    assert p.provenance["total_queries"] == ref.provenance["total_queries"]
    assert p.provenance["queries_noise"] == ref.provenance["queries_noise"]


def test_work_dir_does_not_change_the_result(reference_run, tmp_path):
    oracle = TorchOracle(LinearTeacher(), SHAPE, K)
    p = synthesize(oracle, SynthesisSettings(**RESUME), work_dir=tmp_path / "w", progress=False)
    _assert_same(p, reference_run)
    # the samples fit one chunk: kept finished, with every round's distances, beside the class noise
    st = load_file(str(tmp_path / "w" / "chunk-00000.safetensors"))
    assert torch.equal(st["x"], p.x) and st["best"].shape == (len(p.y), RESUME["iterations"] + 1)
    assert torch.equal(load_file(str(tmp_path / "w" / "noise.safetensors"))["x"], p.snapshots[0])


@pytest.mark.parametrize("where", ["mid-push", "final-measurement"])
def test_interrupted_run_resumes_to_the_same_result(reference_run, tmp_path, where):
    ref = reference_run
    s = SynthesisSettings(**RESUME)
    q_noise, total = ref.provenance["queries_noise"], ref.provenance["total_queries"]
    # mid-push: just under half of the pushing queries (round 0 alone takes 3/7 of them, so the
    # interruption falls in a later round); final: every round done, the last measurement not
    budget = q_noise + (total - q_noise) // 2 if where == "mid-push" else total - 1
    work = tmp_path / "work"
    cut = TorchOracle(LinearTeacher(), SHAPE, K, budget=budget)
    with pytest.raises(QueryBudgetExceeded):
        synthesize(cut, s, work_dir=work, progress=False)
    st = load_file(str(work / "partial-00000.safetensors"))  # the one chunk's last finished round
    done = int(st["round"])
    if where == "mid-push":
        assert 1 <= done < s.iterations
    else:
        assert done == s.iterations
    # resume with a fresh oracle
    fresh = TorchOracle(LinearTeacher(), SHAPE, K)
    p = synthesize(fresh, s, work_dir=work, progress=False)
    _assert_same(p, ref)
    # the finished rounds were not repeated
    assert p.provenance["queries_this_session"] == fresh.queries
    assert fresh.queries == total - q_noise - int(st["queries"])


def test_work_dir_of_other_settings_is_refused(tmp_path):
    work = tmp_path / "work"
    s = SynthesisSettings(**{**RESUME, "iterations": 1})
    synthesize(TorchOracle(LinearTeacher(), SHAPE, K), s, work_dir=work, progress=False)
    other = SynthesisSettings(**{**RESUME, "iterations": 1, "seed": 4})
    oracle = TorchOracle(LinearTeacher(), SHAPE, K)
    with pytest.raises(ValueError, match="synthesis state of a different run"):
        synthesize(oracle, other, work_dir=work, progress=False)
    assert oracle.queries == 0  # refused before any query
    # the same settings are still accepted
    p = synthesize(TorchOracle(LinearTeacher(), SHAPE, K), s, work_dir=work, progress=False)
    assert torch.equal(_labels(LinearTeacher(), p.x), p.y)


# ---------------------------------------------------------------------------------------
# random-image transfer set (random-ce)
# ---------------------------------------------------------------------------------------


def test_random_images_are_deterministic_8_bit_and_sliceable():
    from zsdb3kd.synthesis import random_images

    full = random_images("smooth", 250, SHAPE, seed=3, chunk=100)
    assert full.dtype == torch.uint8 and full.shape == (250, *SHAPE)
    assert torch.equal(full, random_images("smooth", 250, SHAPE, seed=3, chunk=100))
    assert not torch.equal(full, random_images("smooth", 250, SHAPE, seed=4, chunk=100))
    # any slice regenerates without the rest (chunk i has its own seed)
    assert torch.equal(random_images("smooth", 70, SHAPE, seed=3, chunk=100, start=160), full[160:230])
    assert int(full.max()) > 200  # the blobs use the whole range, not a faint band
    with pytest.raises(ValueError, match="unknown image kind"):
        random_images("pink", 5, SHAPE, seed=0)


def test_label_random_images_labels_what_the_teacher_sees_and_resumes(tmp_path):
    from zsdb3kd.synthesis import label_random_images

    teacher = LinearTeacher()
    oracle = TorchOracle(teacher, SHAPE, K)
    x, y = label_random_images(oracle, "smooth", 230, seed=1, chunk=100, work_dir=tmp_path, progress=False)
    assert oracle.queries == 230  # one query per image, nothing else
    assert torch.equal(y, _labels(teacher, x.float() / 255))
    assert len(list(tmp_path.glob("chunk-*.safetensors"))) == 3
    # a rerun (e.g. after an interruption) asks the teacher nothing and returns the same set
    again = TorchOracle(teacher, SHAPE, K)
    x2, y2 = label_random_images(again, "smooth", 230, seed=1, chunk=100, work_dir=tmp_path, progress=False)
    assert again.queries == 0 and torch.equal(x, x2) and torch.equal(y, y2)
    # a lost chunk is asked again, and only that chunk
    sorted(tmp_path.glob("chunk-*.safetensors"))[1].unlink()
    third = TorchOracle(teacher, SHAPE, K)
    _, y3 = label_random_images(third, "smooth", 230, seed=1, chunk=100, work_dir=tmp_path, progress=False)
    assert third.queries == 100 and torch.equal(y, y3)
    # the total query budget holds
    capped = TorchOracle(teacher, SHAPE, K, budget=150)
    with pytest.raises(QueryBudgetExceeded):
        label_random_images(capped, "smooth", 230, seed=1, chunk=100, progress=False)
    assert capped.queries <= 150

"""The budgeted zero-shot student (zsdb3kd.budget): budget accounting, resume, determinism,
switchable ingredients, any input shape. Tiny teachers built here; no real data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zsdb3kd.budget import V1, BudgetSettings, build_student, plan_rounds, train_budgeted
from zsdb3kd.budget import candidates as C
from zsdb3kd.budget import method as M
from zsdb3kd.budget.select import choose, uncertainty
from zsdb3kd.settings import ConfigError, validate
from zsdb3kd.oracle import TorchOracle

K = 4


class TinyTeacher(nn.Module):
    """A fixed random linear classifier on the flattened image, classes roughly balanced on noise."""

    def __init__(self, shape, k: int = K, seed: int = 0) -> None:
        super().__init__()
        d = shape[0] * shape[1] * shape[2]
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(k, d, generator=g) / d**0.5, requires_grad=False)
        self.b = nn.Parameter(-self.w.sum(1) * 0.4, requires_grad=False)

    def forward(self, x):
        return x.reshape(x.shape[0], -1) @ self.w.T + self.b


class Interrupt(RuntimeError):
    pass


class FailingTeacher(TinyTeacher):
    """Raises before answering its ``fail_at``-th call (0-based): a kill between two calls."""

    def __init__(self, shape, fail_at: int | None = None) -> None:
        super().__init__(shape)
        self.calls = 0
        self.fail_at = fail_at

    def forward(self, x):
        if self.fail_at is not None and self.calls == self.fail_at:
            raise Interrupt("simulated kill")
        self.calls += 1
        return super().forward(x)


def oracle_for(shape, budget=None, teacher=None):
    # max_batch large: one oracle call = one teacher forward (so FailingTeacher counts calls)
    return TorchOracle(teacher or TinyTeacher(shape), tuple(shape), K, budget=budget, max_batch=10**7)


# fast settings: few candidates, few steps; every ingredient on
FAST = BudgetSettings(rounds=3, init_fraction=0.25, pool_factor=3.0, epochs_per_round=1.0, final_epochs=2.0,
                      batch_size=32, augment_labelled=0.5, label_smoothing=0.05)
SHAPE = (1, 8, 12)
BUDGET = 240


def bits(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().contiguous().numpy().tobytes() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- budget accounting

@pytest.mark.parametrize("budget", [1, 5, 97, 1000, 12345])
@pytest.mark.parametrize("rounds", [0, 1, 3, 7])
@pytest.mark.parametrize("init_fraction", [0.05, 0.3, 0.9])
def test_plan_rounds_sums_to_budget(budget, rounds, init_fraction):
    plan = plan_rounds(budget, rounds, init_fraction)
    assert sum(plan) == budget
    assert len(plan) == rounds + 1 and min(plan) >= 0 and plan[0] >= 1


@pytest.mark.parametrize("budget,rounds", [(1, 0), (7, 2), (64, 1), (150, 4), (301, 3)])
def test_budget_never_exceeded_and_count_matches(budget, rounds):
    oracle = oracle_for(SHAPE, budget=budget)  # the oracle itself raises past the budget
    res = train_budgeted(oracle, "mlp", budget, FAST.replace(rounds=rounds))
    assert oracle.queries == res.queries == res.paid == budget
    assert sum(e["queries"] for e in res.log) == budget
    assert res.log[-1]["total_queries"] == budget
    assert res.x.shape == (budget, *SHAPE) and res.y.shape == (budget,)
    assert int(res.is_val.sum()) == res.log[-1]["held_out"]


def test_an_oracle_with_less_budget_left_stops_the_run():
    oracle = oracle_for(SHAPE, budget=100)
    with pytest.raises(Exception, match="budget"):
        train_budgeted(oracle, "mlp", 200, FAST)
    assert oracle.queries <= 100


# ----------------------------------------------------------------------------- resume

@pytest.mark.parametrize("acquisition", ["margin", "committee"])  # committee also resumes the earlier snapshot
@pytest.mark.parametrize("fail_at", [1, 2])
def test_interrupted_between_calls_resumes_to_the_same_student_paying_nothing_twice(tmp_path, fail_at, acquisition):
    s = FAST.replace(acquisition=acquisition)
    ref = train_budgeted(oracle_for(SHAPE), "mlp", BUDGET, s, work_dir=tmp_path / "ref")
    o1 = oracle_for(SHAPE, teacher=FailingTeacher(SHAPE, fail_at=fail_at))
    with pytest.raises(Interrupt):
        train_budgeted(o1, "mlp", BUDGET, s, work_dir=tmp_path / "run")
    o2 = oracle_for(SHAPE)
    res = train_budgeted(o2, "mlp", BUDGET, s, work_dir=tmp_path / "run")
    assert o1.queries + o2.queries == BUDGET == res.queries
    assert bits(res.student) == bits(ref.student)
    assert torch.equal(res.x, ref.x) and torch.equal(res.y, ref.y) and torch.equal(res.is_val, ref.is_val)
    o3 = oracle_for(SHAPE)  # a third run finds everything done: not one query
    again = train_budgeted(o3, "mlp", BUDGET, s, work_dir=tmp_path / "run")
    assert o3.queries == 0 and bits(again.student) == bits(ref.student)


def _kill_on_call(monkeypatch, module, name: str, at: int) -> dict:
    """``module.name`` raises :class:`Interrupt` on its ``at``-th call (1-based), as a kill while
    training would; returns its call counter (``{"n": calls so far}``)."""
    real, calls = getattr(module, name), {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise Interrupt("killed while training")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def test_interrupted_while_training_replays_the_stored_answers(tmp_path, monkeypatch):
    ref = train_budgeted(oracle_for(SHAPE), "mlp", BUDGET, FAST)
    _kill_on_call(monkeypatch, M, "fit", 2)  # round 1: its answers are stored, then the process dies
    o1 = oracle_for(SHAPE)
    with pytest.raises(Interrupt):
        train_budgeted(o1, "mlp", BUDGET, FAST, work_dir=tmp_path)
    monkeypatch.undo()
    o2 = oracle_for(SHAPE)
    res = train_budgeted(o2, "mlp", BUDGET, FAST, work_dir=tmp_path)
    assert o1.queries == 60 + 60 and o1.queries + o2.queries == BUDGET
    assert bits(res.student) == bits(ref.student)


def test_interrupted_part_way_through_training_continues_from_its_saved_step(tmp_path, monkeypatch):
    from zsdb3kd.budget import train as T

    ref = train_budgeted(oracle_for(SHAPE), "mlp", BUDGET, FAST)
    total = sum(e["steps"] for e in ref.log)
    assert ref.log[-1]["steps"] > 3
    kill_at = total - 2  # the third-last step of the final training: two earlier ones were saved
    monkeypatch.setattr(M, "SAVE_EVERY", 0.0)  # a save after every step
    calls = _kill_on_call(monkeypatch, T, "_step", kill_at)
    o1 = oracle_for(SHAPE)
    with pytest.raises(Interrupt):
        train_budgeted(o1, "mlp", BUDGET, FAST, work_dir=tmp_path)
    last = len(ref.log) - 1
    assert (tmp_path / f"training-{last}.pt").exists() and o1.queries == BUDGET
    calls["n"] = 0
    o2 = oracle_for(SHAPE)
    res = train_budgeted(o2, "mlp", BUDGET, FAST, work_dir=tmp_path)
    assert calls["n"] == total - (kill_at - 1)  # only the steps not saved are trained again
    assert o2.queries == 0
    assert bits(res.student) == bits(ref.student)
    assert [e["loss"] for e in res.log] == [e["loss"] for e in ref.log]
    assert not (tmp_path / f"training-{last}.pt").exists()  # removed once the round is kept


def test_an_unreadable_training_state_is_refused_with_its_name(tmp_path):
    o1 = oracle_for(SHAPE, teacher=FailingTeacher(SHAPE, fail_at=1))  # round 0 kept, round 1 not
    with pytest.raises(Interrupt):
        train_budgeted(o1, "mlp", BUDGET, FAST, work_dir=tmp_path)
    bad = tmp_path / "training-1.pt"
    bad.write_bytes(b"not a checkpoint")
    o2 = oracle_for(SHAPE)
    with pytest.raises(ValueError, match=r"training-1\.pt \(a damaged file.*delete it to train from the start"):
        train_budgeted(o2, "mlp", BUDGET, FAST, work_dir=tmp_path)  # round 1's answers are kept before training
    bad.unlink()  # as the message says: that round trains from its start, nothing paid twice
    o3 = oracle_for(SHAPE)
    res = train_budgeted(o3, "mlp", BUDGET, FAST, work_dir=tmp_path)
    assert o1.queries + o2.queries + o3.queries == BUDGET and o2.queries == 60
    assert bits(res.student) == bits(train_budgeted(oracle_for(SHAPE), "mlp", BUDGET, FAST).student)


def test_resume_refuses_other_settings(tmp_path):
    train_budgeted(oracle_for(SHAPE), "mlp", 60, FAST.replace(rounds=1), work_dir=tmp_path)
    for kw in ({"seed": 3}, {"settings": FAST.replace(rounds=2)}):
        args = {"settings": FAST.replace(rounds=1), **kw}
        with pytest.raises(ValueError, match="other settings"):
            train_budgeted(oracle_for(SHAPE), "mlp", 60, args.pop("settings"), work_dir=tmp_path, **args)


def test_stored_answers_for_other_images_are_refused(tmp_path):
    train_budgeted(oracle_for(SHAPE), "mlp", 60, FAST.replace(rounds=1), work_dir=tmp_path)
    (tmp_path / "state.json").unlink()  # as if the state were lost but the answers kept: round 0 is asked again
    stored = tmp_path / "query-r0.safetensors"
    from zsdb3kd.store import write_tensors

    write_tensors(stored, {"labels": torch.zeros(15, dtype=torch.long)}, metadata={"digest": "0" * 16})
    with pytest.raises(RuntimeError, match="other images"):
        train_budgeted(oracle_for(SHAPE), "mlp", 60, FAST.replace(rounds=1), work_dir=tmp_path)


# ----------------------------------------------------------------------------- determinism

def test_deterministic_under_seed():
    a = train_budgeted(oracle_for(SHAPE), "mlp", BUDGET, FAST)
    b = train_budgeted(oracle_for(SHAPE), "mlp", BUDGET, FAST)
    c = train_budgeted(oracle_for(SHAPE), "mlp", BUDGET, FAST, seed=1)
    assert bits(a.student) == bits(b.student) and torch.equal(a.x, b.x)
    assert not torch.equal(a.x, c.x)


def test_candidates_are_deterministic_and_in_range():
    for shape in [(1, 28, 28), (3, 32, 32), (1, 8, 12), (2, 5, 3)]:
        for kind in C.GENERATORS:
            x1 = C.GENERATORS[kind](6, shape, torch.Generator().manual_seed(4))
            x2 = C.GENERATORS[kind](6, shape, torch.Generator().manual_seed(4))
            assert x1.shape == (6, *shape) and torch.equal(x1, x2)
            assert float(x1.min()) >= 0 and float(x1.max()) <= 1 and torch.isfinite(x1).all()
        g = torch.Generator().manual_seed(0)
        x = C.synthesize(20, shape, g, {"noise": 1, "shapes": 1, "strokes": 1})
        y = C.mutate(x, 9, g, fresh=x)
        assert x.shape == (20, *shape) and y.shape == (9, *shape)
        assert float(y.min()) >= 0 and float(y.max()) <= 1


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 12), (3, 32, 32)])
def test_dip_candidates_shape_range_determinism(shape):
    assert "dip" in C.KINDS and C.GENERATORS["dip"] is C.dip
    x1 = C.dip(10, shape, torch.Generator().manual_seed(7))
    x2 = C.dip(10, shape, torch.Generator().manual_seed(7))
    x3 = C.dip(10, shape, torch.Generator().manual_seed(8))
    assert x1.shape == (10, *shape) and x1.dtype == torch.float32
    assert torch.isfinite(x1).all() and float(x1.min()) >= 0 and float(x1.max()) <= 1
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert float(x1.reshape(10, -1).std(1).min()) > 0  # not flat images
    x = C.synthesize(12, shape, torch.Generator().manual_seed(0), {"dip": 1, "noise": 1})
    assert x.shape == (12, *shape) and float(x.min()) >= 0 and float(x.max()) <= 1


# ----------------------------------------------------------------------------- ingredients

OFF = {
    "synthetic mix = old blobs": dict(candidates={"smooth": 1.0}),
    "no deform/cutmix": dict(deform_p=0.0, cutmix_p=0.0),
    "no mutation": dict(mutate_fraction=0.0),
    "no active choice": dict(acquisition="random"),
    "entropy": dict(acquisition="entropy"),
    "no class balance": dict(class_balance=False, balanced_sampling=False),
    "no augmentation": dict(augment_labelled=0.0, label_smoothing=0.0),
    "mixup on": dict(mixup=0.5),
    "mixup off": dict(mixup=0.0),
    "fresh final student": dict(final_fresh=True),
    "single round": dict(rounds=0),
    "rare classes boosted": dict(rare_boost=1.0),
    "committee of snapshots": dict(acquisition="committee"),
}


@pytest.mark.parametrize("name", list(OFF))
def test_each_ingredient_can_be_switched_off(name):
    oracle = oracle_for(SHAPE, budget=120)
    res = train_budgeted(oracle, "mlp", 120, FAST.replace(**OFF[name]))
    assert oracle.queries == res.queries == 120
    if name == "single round":
        assert len(res.log) == 1


def test_ingredients_change_what_is_asked():
    """Switching an ingredient off is not a no-op: the queried images differ."""
    base = train_budgeted(oracle_for(SHAPE), "mlp", 120, FAST).x
    for name in ("no mutation", "no active choice", "synthetic mix = old blobs", "rare classes boosted",
                 "committee of snapshots"):
        assert not torch.equal(base, train_budgeted(oracle_for(SHAPE), "mlp", 120, FAST.replace(**OFF[name])).x), name


def test_mixup_blends_images_and_labels_alike():
    from zsdb3kd.budget.train import mix

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 8, 12, generator=g)
    y = torch.randint(0, 5, (64,), generator=g)
    same, t0 = mix(x, y, 0.0, 5, torch.Generator().manual_seed(1))
    assert torch.equal(same, x) and torch.equal(t0, torch.nn.functional.one_hot(y, 5).float())
    xm, t = mix(x, y, 1.0, 5, torch.Generator().manual_seed(1))
    assert torch.allclose(t.sum(1), torch.ones(64))
    own = t[torch.arange(64), y]
    assert bool((own >= 0.5 - 1e-6).all()) and bool((own < 1).any())  # every image keeps at least half its weight
    # each mixed image is own * x + (1 - own) * partner, and the partner's label carries 1 - own
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    lam = own.where(y != y[perm], torch.nan)
    ok = ~lam.isnan()
    assert torch.allclose(xm[ok], lam[ok, None, None, None] * x[ok] + (1 - lam[ok, None, None, None]) * x[perm][ok])


def test_mixup_changes_the_student():
    a = train_budgeted(oracle_for(SHAPE), "mlp", 120, FAST.replace(mixup=0.0)).student
    b = train_budgeted(oracle_for(SHAPE), "mlp", 120, FAST.replace(mixup=0.5)).student
    assert any(not torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_final_fresh_trains_a_new_student_on_every_labelled_image():
    """``final_fresh``: the last round's student starts from its own seed-derived weights, not the
    warm-started ones, and is trained on exactly the labelled images that are not held out."""
    from zsdb3kd.budget.train import fit
    from zsdb3kd.store import derive_seed, generator

    s = FAST.replace(final_fresh=True)
    res = train_budgeted(oracle_for(SHAPE), "mlp", 120, s, seed=3)
    warm = train_budgeted(oracle_for(SHAPE), "mlp", 120, FAST.replace(final_fresh=False), seed=3)
    assert torch.equal(res.x, warm.x)  # the rounds before the last are the same
    again = build_student("mlp", K, SHAPE, derive_seed(3, "budget", "final"))
    last = len(res.log) - 1
    fit(again, res.x[~res.is_val], res.y[~res.is_val], s.final_epochs, s, generator(3, "budget", last, "train"), K,
        torch.device("cpu"), cosine=True)
    for name, p in res.student.state_dict().items():
        assert torch.equal(p, again.state_dict()[name]), name
        assert not torch.equal(p, warm.student.state_dict()[name]), name


def test_a_setting_added_later_keeps_the_names_of_recipes_measured_before_it():
    from zsdb3kd.settings import content_key

    s = BudgetSettings()
    before = s.model_dump(mode="json")
    for name in ("recipe", "mutate_errors", "mutate_same_class"):
        del before[name]  # the recipe as it was named before the setting existed
    assert s.key() == content_key(before)
    # the keys of the records in docs/results: recipe v2 (budgeted-combo) and v1
    assert s.key() == "64443510f026a2c2"
    assert BudgetSettings(recipe="v1").key() == BudgetSettings(**V1).key() == "740b77bcd607a2a0"
    assert s.replace(mutate_errors=0.5).key() != s.key()
    assert s.replace(mutate_same_class=0.5).key() not in (s.key(), s.replace(mutate_errors=0.5).key())


def test_a_named_recipe_sets_its_settings_and_those_given_beside_it_win():
    v1 = BudgetSettings(recipe="v1")
    assert {k: getattr(v1, k) for k in V1} == V1 and v1.recipe == "v1"
    mine = BudgetSettings(recipe="v1", mixup=0.3, final_epochs=90)
    assert (mine.mixup, mine.final_epochs, mine.weight_decay) == (0.3, 90, V1["weight_decay"])
    # from the command line and a run file alike
    from zsdb3kd.cli import BUDGET, build_parser

    args = build_parser().parse_args(["extract", "--teacher", "t.safetensors", "--budget", "10", "--out", "s",
                                      "--recipe", "v1", "--mixup", "0.3", "--final-epochs", "90"])
    assert BUDGET.build(args) == mine
    from zsdb3kd.experiment.config import RunConfig

    assert RunConfig.model_validate({"budget": {"recipe": "v1", "mixup": 0.3, "final_epochs": 90}}).budget == mine
    # another recipe in a copy: its own settings replace the old recipe's, the ones set beside it stay
    back = mine.replace(recipe="v2")
    assert (back.mixup, back.final_epochs) == (0.3, 90)
    assert back.candidates == BudgetSettings().candidates and back.weight_decay == BudgetSettings().weight_decay
    assert BudgetSettings().replace(recipe="v1") == v1 and v1.replace(recipe="v2") == BudgetSettings(recipe="v2")
    with pytest.raises(ConfigError, match="recipe"):
        validate(BudgetSettings, {"recipe": "v3"})


def test_auto_runs_v2_on_one_channel_images_and_v1_on_colour_ones_keeping_what_was_given(tmp_path, monkeypatch):
    auto = BudgetSettings()
    assert auto.recipe == "auto" and auto.key() == BudgetSettings(recipe="v2").key()
    assert auto.for_input((1, 28, 28)) == BudgetSettings(recipe="v2")
    assert auto.for_input((3, 32, 32)) == BudgetSettings(recipe="v1")
    assert BudgetSettings(recipe="v2").for_input((3, 32, 32)).recipe == "v2"  # a named recipe stays
    assert auto.for_input((4, 8, 8)).recipe == "v1" and auto.for_input((64,)).recipe == "v2"  # RGBA; flat features
    # given settings stay given, even one at v2's value (mixup) and through a copy
    colour = BudgetSettings(mixup=0.5, lr=2e-3).replace(batch_size=64).for_input((3, 32, 32))
    assert (colour.recipe, colour.mixup, colour.lr, colour.batch_size) == ("v1", 0.5, 2e-3, 64)
    assert (colour.weight_decay, colour.final_epochs) == (V1["weight_decay"], V1["final_epochs"])
    # a run resolves it before its first query, and stores the resolved recipe's identity
    run = M._Run(oracle_for((3, 8, 8)), "mlp", 10, FAST, 0, None, None, "cpu", None)
    assert run.s == FAST.for_input((3, 8, 8)) and run.s.recipe == "v1" and run.s.mixup == 0.0
    assert run._meta()["settings"] == FAST.for_input((3, 8, 8)).identity() != FAST.identity()
    # and so does a run file's row, whose artifacts are named by the resolved recipe
    from zsdb3kd.experiment import extract

    seen = {}

    def spy(oracle, student, budget, s, **kw):
        seen["s"], seen["work"] = s, kw["work_dir"]
        raise Interrupt("stop before training")

    monkeypatch.setattr(extract, "train_budgeted", spy)
    with pytest.raises(Interrupt):
        extract.budgeted_row("budgeted", 10, oracle_for((3, 8, 8)), "mlp", BudgetSettings(), 0, tmp_path, "sha",
                             None, None, "cpu", [])
    assert seen["s"] == BudgetSettings(recipe="v1")
    with pytest.raises(Interrupt):
        extract.budgeted_row("budgeted", 10, oracle_for((3, 8, 8)), "mlp", BudgetSettings(recipe="v1"), 0, tmp_path,
                             "sha", None, None, "cpu", [])
    assert seen["s"] == BudgetSettings(recipe="v1")
    first = seen["work"]
    with pytest.raises(Interrupt):
        extract.budgeted_row("budgeted", 10, oracle_for((3, 8, 8)), "mlp", BudgetSettings(), 0, tmp_path, "sha",
                             None, None, "cpu", [])
    assert seen["work"] == first


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_mutate_errors_varies_the_images_the_student_gets_wrong(share):
    run = M._Run(oracle_for(SHAPE), "mlp", BUDGET, FAST.replace(mutate_errors=share), 0, None, None, "cpu", None)
    xl = torch.rand(40, *SHAPE, generator=torch.Generator().manual_seed(1))
    p = M.predict(run.student, xl).argmax(1)
    yl = p.clone()
    yl[30:] = (p[30:] + 1) % K  # the student gets the last 10 wrong
    which = run.parents(xl, yl, 400, torch.Generator().manual_seed(0))  # indices into xl
    wrong_share = float((which >= 30).float().mean())
    w = (1.0 / torch.bincount(yl, minlength=K).float())[yl]  # the rest: class-balanced over all of them
    expected = share + (1 - share) * float(w[30:].sum() / w.sum())
    assert abs(wrong_share - expected) < 0.08, (share, wrong_share, expected)
    if share == 1.0:
        assert bool((which >= 30).all())


def test_same_class_partners_share_the_label_and_cover_the_class():
    y = torch.tensor([2, 0, 2, 1, 0, 2, 3, 2])
    idx = torch.tensor([0, 1, 3, 6] + [2] * 400)
    mates = M.same_class_partners(y, idx, torch.Generator().manual_seed(0))
    assert torch.equal(y[mates], y[idx])
    assert mates[2] == 3 and mates[3] == 6  # alone in its class: itself
    assert set(mates[4:].tolist()) == {0, 2, 5, 7}  # every image of class 2 is drawn


def test_every_candidate_a_variation_needs_no_fresh_image():
    """mutate_fraction = 1 leaves no fresh candidate to make in later rounds (it used to fail there)."""
    assert C.synthesize(0, SHAPE, torch.Generator(), BudgetSettings().candidates).shape == (0, *SHAPE)
    res = train_budgeted(oracle_for(SHAPE), "mlp", 300, FAST.replace(mutate_fraction=1.0), seed=0)
    assert res.queries == 300


def test_mutate_crosses_with_the_given_partners_only_when_asked():
    from zsdb3kd.budget.transforms import mutate

    x, fresh, mates = torch.zeros(50, 1, 8, 8), torch.full((50, 1, 8, 8), 0.5), torch.ones(50, 1, 8, 8)
    bright = lambda out: float((out.flatten(1) > 0.75).any(1).float().mean())  # noqa: E731  (a partner's box)
    plain = mutate(x, 400, torch.Generator().manual_seed(0), fresh=fresh)
    assert torch.equal(mutate(x, 400, torch.Generator().manual_seed(0), fresh=fresh, partners=mates, p_partner=0.0),
                       plain)  # the recipe's stream: no extra draw
    assert bright(plain) == 0.0
    assert 0.2 < bright(mutate(x, 400, torch.Generator().manual_seed(0), fresh=fresh, partners=mates,
                               p_partner=1.0)) < 0.4  # the cut-mixed 30%
    with pytest.raises(ValueError, match="partners"):
        mutate(x, 4, torch.Generator(), partners=mates[:3], p_partner=1.0)


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_mutate_same_class_gives_each_varied_image_a_partner_of_its_class(share, monkeypatch):
    seen = {}

    def spy(parents, n, g, *, fresh=None, partners=None, p_partner=0.0):
        seen.update(parents=parents, partners=partners, p=p_partner)
        return parents[:n]

    monkeypatch.setattr(M.C, "mutate", spy)
    run = M._Run(oracle_for(SHAPE), "mlp", BUDGET, FAST.replace(mutate_same_class=share), 0, None, None, "cpu", None)
    g0 = torch.Generator().manual_seed(1)
    xl, yl = torch.rand(60, *SHAPE, generator=g0), torch.randint(0, K, (60,), generator=g0)
    run.candidates(1, 200, xl, yl)
    assert seen["p"] == share
    if share == 0.0:
        assert seen["partners"] is None
        return
    row = lambda imgs: (imgs.flatten(1)[:, None] == xl.flatten(1)[None]).all(2).float().argmax(1)  # noqa: E731
    assert torch.equal(yl[row(seen["partners"])], yl[row(seen["parents"])])


def test_bad_settings_fail_with_the_key_named():
    BudgetSettings()
    for bad, key in [(dict(val_fraction=0.7), "val_fraction"), (dict(acquisition="oracle"), "acquisition"),
                     (dict(candidates={"x": 1.0}), "candidates"), (dict(init_fraction=1.0), "init_fraction"),
                     (dict(epochs_per_round=0, final_epochs=0), "never train"), (dict(mixup=1.5), "mixup")]:
        with pytest.raises(ConfigError, match=key):
            BudgetSettings().replace(**bad)
    with pytest.raises(ValueError, match="at least 1"):
        plan_rounds(0, 3, 0.2)


# ----------------------------------------------------------------------------- shapes and pool

@pytest.mark.parametrize("shape,arch", [((1, 8, 12), "cnn-small"), ((1, 28, 28), "lenet5-half"),
                                        ((3, 32, 32), "cnn-small"), ((1, 8, 12), "mlp")])
def test_runs_for_any_input_shape(shape, arch):
    oracle = oracle_for(shape, budget=90)
    res = train_budgeted(oracle, arch, 90, FAST.replace(rounds=2))
    assert res.queries == 90 and res.student(torch.zeros(2, *shape)).shape == (2, K)


def test_student_that_cannot_take_the_shape_fails_before_any_query():
    oracle = oracle_for((1, 8, 12), budget=100)
    with pytest.raises(ValueError, match="cannot take"):
        train_budgeted(oracle, "lenet5", 100, FAST)
    assert oracle.queries == 0
    with pytest.raises(ValueError):
        build_student("no-such-model", K, (1, 8, 12), 0)


def test_real_pool_each_image_queried_once(tmp_path):
    pool = torch.rand(400, *SHAPE, generator=torch.Generator().manual_seed(2))
    oracle = oracle_for(SHAPE, budget=150)
    res = train_budgeted(oracle, "mlp", 150, FAST.replace(rounds=3), pool=pool, work_dir=tmp_path)
    assert oracle.queries == 150
    q, xs = (pool * 255).round(), (res.x * 255).round()
    match = (xs.reshape(150, 1, -1) == q.reshape(1, 400, -1)).all(-1)
    assert bool(match.any(1).all())  # every query is a pool image
    assert int(match.any(0).sum()) == 150  # and none twice
    with pytest.raises(ValueError, match="cannot feed"):
        train_budgeted(oracle_for(SHAPE), "mlp", 500, FAST, pool=pool)


def test_choose_is_class_balanced_and_distinct():
    g = torch.Generator().manual_seed(0)
    pred = torch.cat([torch.zeros(500, dtype=torch.long), torch.ones(50, dtype=torch.long), torch.full((50,), 2)])
    score = torch.rand(600, generator=g)
    idx = choose(score, pred, 90, 3, g)
    assert idx.numel() == 90 and idx.unique().numel() == 90
    assert torch.bincount(pred[idx], minlength=3).tolist() == [30, 30, 30]
    idx = choose(score, pred, 200, 3, g)  # classes 1 and 2 cannot fill their quotas: the rest comes from class 0
    assert idx.unique().numel() == 200 and torch.bincount(pred[idx], minlength=3).tolist() == [100, 50, 50]
    top = choose(score, pred, 10, 3, g, balance=False, explore=1.0)
    assert set(top.tolist()) == set(score.topk(10).indices.tolist())


def test_choose_gives_each_class_its_weighted_quota():
    """``class_weight`` (what ``rare_boost`` passes): quotas in proportion, filled where a class
    has the candidates."""
    g = torch.Generator().manual_seed(0)
    pred = torch.arange(3).repeat_interleave(200)
    idx = choose(torch.rand(600, generator=g), pred, 60, 3, g, class_weight=torch.tensor([1.0, 2.0, 3.0]))
    assert torch.bincount(pred[idx], minlength=3).tolist() == [10, 20, 30]


def test_rare_boost_asks_more_about_the_classes_the_teacher_seldom_gives():
    """A linear teacher that seldom gives class 3 and often class 1: weighting the quotas by
    1 / labels so far buys more of class 3 and less of class 1 than equal quotas do."""
    teacher = TinyTeacher(SHAPE)
    with torch.no_grad():
        teacher.b[3] -= 0.2
    s = FAST.replace(rounds=4, epochs_per_round=3)
    equal, boosted = (torch.bincount(train_budgeted(oracle_for(SHAPE, teacher=teacher), "mlp", 600,
                                                    s.replace(rare_boost=b)).y, minlength=K) for b in (0.0, 1.0))
    assert int(equal.argmax()) == 1 and int(equal.argmin()) == 3, equal
    assert boosted[3] >= 1.3 * equal[3] and boosted[1] < equal[1], (equal, boosted)


def test_acquisition_scores_rank_sure_and_unsure_predictions():
    sure, torn, flat = [0.97, 0.01, 0.01, 0.01], [0.49, 0.49, 0.01, 0.01], [0.25, 0.25, 0.25, 0.25]
    p = torch.tensor([sure, torn, flat])
    for kind in ("margin", "entropy"):  # the unsure first: what the student cannot tell yet
        s = uncertainty(p, kind)
        assert s[0] < s[1] <= s[2], (kind, s)
    c = uncertainty(p, "confident")  # the opposite: the student's prototypes of a class
    assert c[0] > c[1] > c[2]
    assert uncertainty(p, "random").eq(0).all()
    assert torch.equal(uncertainty(p, "committee"), uncertainty(p, "margin"))  # no earlier snapshot yet
    # two snapshots both sure of class 0 score low; sure of different classes, high; a
    # torn pair that agrees sits between (margin of the mean, plus the disagreement)
    now = torch.tensor([sure, sure, torn])
    earlier = torch.tensor([sure, [0.01, 0.97, 0.01, 0.01], torn])
    k = uncertainty(now, "committee", earlier)
    assert k[0] < k[2] < k[1], k
    assert k[1] == pytest.approx(1 + 0.96) and k[0] == pytest.approx(1 - 0.96)
    with pytest.raises(ValueError, match="unknown acquisition"):
        uncertainty(p, "loudest")


def test_active_choice_learns_a_linear_teacher_better_than_chance():
    """A real learning check: 600 queries to a linear 4-class teacher on 8x12 inputs give a
    student that agrees with it on fresh synthetic images far above chance (25%)."""
    teacher = TinyTeacher(SHAPE)
    res = train_budgeted(oracle_for(SHAPE, teacher=teacher), "mlp", 600,
                         FAST.replace(rounds=4, epochs_per_round=5, final_epochs=20))
    x = C.synthesize(2000, SHAPE, torch.Generator().manual_seed(9), {"noise": 1, "shapes": 1})
    agree = (res.student(x).argmax(1) == teacher(x).argmax(1)).float().mean()
    assert agree > 0.6, float(agree)

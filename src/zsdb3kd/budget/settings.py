"""The budgeted student's recipe: one typed settings class behind the library, the
``[budget]`` section of a run file and the ``zsdb3kd extract`` flags.

The defaults are the recipe that measured best while the method was developed
(docs/budget.md says what each ingredient is shown to add). Every ingredient can be
switched off on its own, which is how the ablations are run:

=========================  ==========================================================
ingredient                 off
=========================  ==========================================================
diverse synthetic images   ``candidates = {smooth = 1}``, ``deform_p = 0``, ``cutmix_p = 0``
variations of labelled     ``mutate_fraction = 0``
active choice              ``acquisition = "random"``
class balance              ``class_balance = false``, ``balanced_sampling = false``
augmented labelled images  ``augment_labelled = 0``
rounds                     ``rounds = 0`` (one non-active round: the ``random`` baseline)
=========================  ==========================================================

The defaults since 2026-12-04 (recipe v2) add to the first recipe (v1, ``V1``) every lever
that measured ahead of it on average: handwriting-like ``curves`` in the candidate mix, ``mixup``
(half of each batch blended with another of its images, the labels blended alike),
``weight_decay = 5e-4`` and a freshly initialised final student (``final_fresh``) trained for
``final_epochs = 120``. Paired by seed with v1 they were ahead at every budget measured
(Fashion-MNIST +0.4 to +2.8 points up to 20,000 queries, ten of ten seeds at 10,000; MNIST +2.0
at 20,000) and level at 50,000 (77.4% over three seeds, v1 77.4-77.8%; docs/budget.md). ``recipe = "v1"`` (the
settings ``V1``) restores the first recipe; settings given beside it override it. The default,
``recipe = "auto"``, runs v2 on one-channel images and v1 on colour ones: on CIFAR-10 v1 was ahead
of v2 in every pair measured (docs/budget.md). Off by default, on request:
``acquisition = "committee"`` (the student and its snapshot of one round earlier) and
``rare_boost`` (more queries for the classes the teacher has given least), measured level
(docs/budget.md), ``mutate_errors`` (vary the labelled images the student gets wrong) and ``mutate_same_class``
(cross a varied image with another of its class).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from ..settings import Settings, content_key, validate
from .candidates import GENERATORS

#: the first recipe (the defaults until 2026-12-04): ``BudgetSettings(**V1)``
V1: dict = {"candidates": {"objects": 2.0, "noise": 1.0, "strokes": 1.0, "shapes": 1.0}, "mixup": 0.0,
            "weight_decay": 0.0, "final_fresh": False, "final_epochs": 60.0}


#: named recipes: the settings each changes from the field defaults (recipe v2)
RECIPES: dict[str, dict] = {"v2": {}, "v1": V1}
Recipe = Literal["auto", "v2", "v1"]

Acquisition = Literal["margin", "entropy", "random", "confident", "committee"]
ACQUISITIONS: tuple[str, ...] = get_args(Acquisition)


class BudgetSettings(Settings):
    """Budgeted student: rounds of synthesise, choose, query, train."""

    recipe: Recipe = Field("auto", description="named starting point: v2, v1 (the first recipe), or auto: v2 for "
                                               "one-channel images, v1 for colour ones (what measured best on "
                                               "each); settings given beside it override it")
    rounds: int = Field(8, ge=0, description="active rounds after the first (0: one round, no active choice)")
    init_fraction: float = Field(0.2, gt=0, lt=1, description="share of the budget spent in the first round")
    val_fraction: float = Field(0.05, ge=0, lt=0.5, description="share of each round's queries held out to "
                                                                 "report agreement with the teacher")
    candidates: dict[str, float] = Field({"objects": 2.0, "noise": 1.0, "strokes": 1.0, "shapes": 1.0, "curves": 2.0},
                                         description="zero-shot: mix of synthetic image kinds and their weights")
    deform_p: float = Field(0.5, ge=0, le=1, description="share of fresh candidates given an affine/elastic "
                                                         "deformation")
    cutmix_p: float = Field(0.25, ge=0, le=1, description="share of fresh candidates cut-mixed with another")
    mutate_fraction: float = Field(0.5, ge=0, le=1, description="zero-shot: share of later rounds' candidates that "
                                                                "are variations of labelled images")
    mutate_errors: float = Field(0.0, ge=0, le=1, description="zero-shot: share of the varied images drawn among "
                                                              "labelled images the current student gets wrong")
    mutate_same_class: float = Field(0.0, ge=0, le=1, description="zero-shot: share of the varied images whose "
                                                                  "cut-mix/mixup partner is a labelled image of "
                                                                  "the parent's class (else any candidate)")
    pool_factor: float = Field(8.0, ge=1, description="free candidates scored per query")
    acquisition: Acquisition = Field(
        "margin", description="how the student ranks candidates (random: no active choice; confident: "
                              "the student's most confident, the opposite of margin; committee: the student "
                              "and its snapshot of one round earlier, where they disagree or are both unsure)")
    explore: float = Field(2.0, ge=1, description="rank only a random 1/explore of the candidates (diversity)")
    class_balance: bool = Field(True, description="equal queries per class the student predicts")
    rare_boost: float = Field(0.0, ge=0, description="with class_balance: a class's share of the queries "
                                                     "weighted by (1 + its teacher labels so far)^-rare_boost "
                                                     "(0: equal shares)")
    batch_size: int = Field(128, ge=1, description="images per training step")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    weight_decay: float = Field(5e-4, ge=0, description="Adam weight decay")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the cross-entropy")
    epochs_per_round: float = Field(5.0, ge=0, description="passes over the labelled images after each round")
    final_epochs: float = Field(120.0, ge=0, description="passes after the last round (cosine learning rate)")
    final_fresh: bool = Field(True, description="after the last round, train a freshly initialised student "
                                                 "instead of the warm-started one")
    balanced_sampling: bool = Field(True, description="training batches drawn class-balanced over the "
                                                      "teacher's labels")
    augment_labelled: float = Field(0.5, ge=0, le=1, description="share of each batch shifted by one pixel")
    mixup: float = Field(0.5, ge=0, le=1, description="share of each batch mixed with another of its images, "
                                                      "labels mixed alike")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        """The named recipe's settings, where the same mapping does not give them."""
        if isinstance(data, dict) and data.get("recipe") in RECIPES:
            return {**RECIPES[data["recipe"]], **data}
        return data

    def replace(self, **changes: Any) -> "BudgetSettings":
        """A validated copy with ``changes`` applied. Settings that were given (not defaults)
        stay given; a new ``recipe`` brings its own settings in place of the old recipe's and
        keeps the others that were given."""
        given = self.model_dump(include=self.model_fields_set - {"recipe"})
        if changes.get("recipe", self.recipe) != self.recipe:
            preset = RECIPES.get(self.recipe, {})
            given = {k: v for k, v in given.items() if k not in preset or v != preset[k]}
        return validate(type(self), {**given, "recipe": self.recipe, **changes})

    def for_input(self, input_shape: Sequence[int]) -> "BudgetSettings":
        """The settings of a run on ``(C, H, W)`` images: ``recipe = "auto"`` becomes v1 for
        images of more than one channel and v2 for the rest, keeping what was set beside it; a named
        recipe stays. On Fashion-MNIST and MNIST v2 was ahead of v1 at every budget measured;
        on CIFAR-10 v1 was ahead in every pair (docs/budget.md). Until a run resolves it,
        ``auto`` has v2's values (and key)."""
        if self.recipe != "auto":
            return self
        colour = len(input_shape) == 3 and int(input_shape[0]) > 1
        return self.replace(recipe="v1" if colour else "v2")

    def identity(self) -> dict:
        """The settings that name the recipe: every value (the ``recipe`` preset's name is not
        one: its values are), less those added after recipes were named (``LATER``) while they
        are at the value that keeps the recipe as it was, so a recipe measured, or a run begun,
        before a setting existed keeps its name."""
        d = self.model_dump(mode="json")
        del d["recipe"]
        for name, unchanged in LATER.items():
            if d[name] == unchanged:
                del d[name]
        return d

    def key(self) -> str:
        """Content hash of :meth:`identity` (16 hex digits)."""
        return content_key(self.identity())

    @field_validator("candidates")
    @classmethod
    def _kinds(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(GENERATORS))
        if unknown:
            raise ValueError(f"unknown candidate kinds {unknown}; known: {', '.join(GENERATORS)}")
        if any(w < 0 for w in v.values()) or not any(w > 0 for w in v.values()):
            raise ValueError("weights must be >= 0 and one at least positive")
        return v

    @model_validator(mode="after")
    def _steps(self) -> "BudgetSettings":
        if self.epochs_per_round == 0 and self.final_epochs == 0:
            raise ValueError("epochs_per_round and final_epochs are both 0: the student would never train")
        return self


#: settings added after recipes were named by their key, and the value that changes nothing
LATER: dict = {"mutate_errors": 0.0, "mutate_same_class": 0.0}


def plan_rounds(budget: int, rounds: int, init_fraction: float) -> list[int]:
    """Queries per round: ``init_fraction`` of ``budget`` first, the rest split evenly; every
    count is >= 0 and they sum to ``budget`` exactly."""
    if budget < 1:
        raise ValueError(f"the budget must be at least 1 query, got {budget}")
    if rounds == 0:
        return [budget]
    first = max(1, min(budget, round(budget * init_fraction)))
    base, extra = divmod(budget - first, rounds)
    return [first] + [base + (1 if i < extra else 0) for i in range(rounds)]

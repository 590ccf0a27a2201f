"""The budgeted student: the most accurate student for a total query budget.

>>> from zsdb3kd.budget import BudgetSettings, train_budgeted
>>> result = train_budgeted(oracle, "lenet5-half", 10_000)  # doctest: +SKIP

:mod:`.settings` holds the recipe, :mod:`.candidates` the synthetic images, :mod:`.select`
the acquisition, :mod:`.ledger` the query accounting and replay, :mod:`.train` the student's
training and :mod:`.method` the rounds.
"""

from .method import BudgetResult, build_student, train_budgeted
from .settings import V1, BudgetSettings, plan_rounds

__all__ = ["V1", "BudgetResult", "BudgetSettings", "build_student", "plan_rounds", "train_budgeted"]

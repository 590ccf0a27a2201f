"""Whole experiments from one TOML file: ``config`` (the schema) -> ``plan`` (the most queries
each stage can spend) -> ``stages`` / ``run`` (teacher, synthesis, soft labels, students)
-> ``report``."""

from .config import RunConfig, load_config, parse_student_method
from .plan import format_plan, plan_queries
from .run import plan_experiment, run_experiment
from .stages import distill_student, train_teacher

__all__ = ["RunConfig", "distill_student", "format_plan", "load_config", "parse_student_method", "plan_experiment",
           "plan_queries", "run_experiment", "train_teacher"]

"""The streaming engine: plan (data), runner (reads units as task vectors) and executors."""

from .execute import Runner, resolve_device
from .executors import Executor, LocalExecutor
from .plan import Plan, Unit, make_plan

__all__ = ["Executor", "LocalExecutor", "Plan", "Runner", "Unit", "make_plan", "resolve_device"]

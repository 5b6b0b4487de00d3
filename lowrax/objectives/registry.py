"""Training objectives by name, as adapter methods are: what `objective:` may say, which
model tasks each trains, which config section holds its settings, and the checks that
span sections. `lowrax train` looks an objective up here (its run setup: lowrax.train.objective_runs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from lowrax.core.registry import Registry
from lowrax.errors import LowraxError


@dataclass(frozen=True)
class Objective:
    name: str
    tasks: tuple[str, ...]  # the model tasks (model.task) it trains
    section: str | None = None  # the config section of its settings (preference, distill); None: none
    check: Callable[[Any], None] | None = None  # (TrainConfig) -> None, raising LowraxError on a bad combination
    description: str = ""


_OBJECTIVES: Registry[Objective] = Registry("objective", "objective must be one of {names}, got {name!r}")


def register_objective(objective: Objective) -> Objective:
    return _OBJECTIVES.register(objective.name, objective)


def objective_names() -> list[str]:
    return _OBJECTIVES.names()


def objective_named(name: str) -> Objective:
    """The objective registered as `name`, or an error listing those that exist."""
    return _OBJECTIVES[name]


def check_objective(cfg: Any) -> None:
    """The run's objective exists, trains its model.task, and its own checks pass."""
    objective = objective_named(cfg.objective)
    if cfg.model.task not in objective.tasks:
        raise LowraxError(f"objective {objective.name!r} trains model.task {' or '.join(objective.tasks)}; "
                          f"model.task is {cfg.model.task!r}")
    if objective.check is not None:
        objective.check(cfg)

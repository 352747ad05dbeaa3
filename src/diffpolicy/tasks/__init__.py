"""Tasks: each file says how to make its env, which observations and action it has, how to judge success
and how its scripted expert acts. Adding a task touches only its own file and a config preset."""

from __future__ import annotations

import importlib
from typing import Any

from diffpolicy.tasks.base import Rollout, Task

_REGISTRY = {
    "trajectory2d": "diffpolicy.tasks.trajectory2d:Trajectory2DTask",
    "pusht": "diffpolicy.tasks.pusht:PushTTask",
}


def make_task(name: str, **kwargs: Any) -> Task:
    """Build a task by name (tasks are imported lazily so one task's dependencies never burden another)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task '{name}'; available: {', '.join(sorted(_REGISTRY))}")
    module_name, cls_name = _REGISTRY[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"task '{name}' cannot be loaded: {e}") from e
    return getattr(module, cls_name)(**kwargs)


__all__ = ["Rollout", "Task", "make_task"]

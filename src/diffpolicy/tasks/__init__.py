"""Tasks: each file says how to make its env, which observations and action it has, how to judge success
and how its scripted expert acts. Adding a task touches only its own file, its presets and its tests:
`make_task("NAME")` imports `diffpolicy.tasks.NAME` and uses the Task subclass whose `name` is NAME, so
there is no list here to edit."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

from diffpolicy.tasks.base import Rollout, Task

_NOT_TASKS = {"base", "record"}  # modules in this package that define no task


def available_tasks() -> list[str]:
    """Names of the task modules in this package (without importing them)."""
    return sorted(
        m.name
        for m in pkgutil.iter_modules(__path__)
        if m.name not in _NOT_TASKS and not m.name.startswith("_")
    )


def task_class(name: str) -> type[Task]:
    """The Task subclass for `name` (its module is imported lazily so one task's dependencies never burden
    another)."""
    if name not in available_tasks():
        raise ValueError(f"unknown task '{name}'; available: {', '.join(available_tasks())}")
    try:
        module = importlib.import_module(f"diffpolicy.tasks.{name}")
    except ModuleNotFoundError as e:
        raise ValueError(f"task '{name}' cannot be loaded: {e} (install its extra, see the README)") from e
    found = [
        c
        for _, c in inspect.getmembers(module, inspect.isclass)
        if issubclass(c, Task) and c is not Task and c.__module__ == module.__name__ and c.name == name
    ]
    if len(found) != 1:
        raise ValueError(
            f"diffpolicy.tasks.{name} must define exactly one Task subclass with name = '{name}'"
        )
    return found[0]


def make_task(name: str, **kwargs: Any) -> Task:
    """Build a task by name with its keyword arguments (the preset's `task.kwargs`)."""
    return task_class(name)(**kwargs)


__all__ = ["Rollout", "Task", "available_tasks", "make_task", "task_class"]

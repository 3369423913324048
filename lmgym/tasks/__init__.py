"""Tasks: what an lmgym env asks the agent to continue and how it scores the continuation, a task
being prompts + reward + assets (the models and the tokenizer), built as a ``ContinuationTask``.

Both envs take ``task=NAME`` (default ``"imdb"``, ``lmgym.tasks.imdb``) and pass their other keyword
arguments to the task's factory::

    register_task("my-task", my_factory)  # my_factory(**kwargs) -> ContinuationTask
    env = gym.make("IMDBContinuation-v0", task="my-task")

Importing this package loads no model library; a factory runs when an env is built.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

TaskFactory = Callable[..., Any]
"""``factory(**env_kwargs)`` -> an ``lmgym.task.ContinuationTask`` (or an object with its interface)."""

_TASKS: dict[str, TaskFactory] = {}


def register_task(name: str, factory: TaskFactory) -> None:
    """Make ``factory`` the task called ``name``; ValueError if the name is taken."""
    if name in _TASKS:
        raise ValueError(f"task {name!r} is already registered")
    _TASKS[name] = factory


def task_names() -> list[str]:
    """The registered task names, sorted."""
    return sorted(_TASKS)


def make_task(task: str = "imdb", **kwargs: Any) -> Any:
    """The task called ``task``, built from ``kwargs`` by its factory; ValueError naming the choices."""
    if task not in _TASKS:
        raise ValueError(f"task must be one of {task_names()}, got {task!r}")
    return _TASKS[task](**kwargs)


def _imdb(**kwargs: Any) -> Any:
    from lmgym.tasks.imdb import imdb_task

    return imdb_task(**kwargs)


register_task("imdb", _imdb)

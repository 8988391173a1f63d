"""Novel tasks to fine-tune on: a :class:`Task` builds records and scores completions.

``get_task("jigsaw", grid="2x2", form="image")`` returns a task; ``parse_task_args("grid=2x2,form=text")``
turns the CLI's ``--task-args`` string into the keyword arguments it takes. Every task record stores its own
``meta.task`` and ``meta.task_args``, so :func:`task_of_record` rebuilds the task that scores it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dynamics.errors import DynamicsError

RewardFunc = Callable[..., list[float]]


@dataclass
class Task:
    """A task: how to build its records and how to score a completion against a record's ``answer``.

    ``reward_funcs`` follow TRL's signature ``f(completions, answer, **kwargs) -> list[float]`` (completions as
    strings or as lists of message dicts); ``score`` returns ``accuracy, hit, format, total`` with
    ``total = hit + accuracy + format``; ``max_new_tokens`` is a generation budget that fits a gold completion.
    """

    name: str
    build: Callable[[int, int], list[dict]]
    reward_funcs: list[RewardFunc]
    score: Callable[[str, str], dict[str, float]]
    max_new_tokens: int
    config: Any = None
    args: dict = field(default_factory=dict)


def _coerce(value: str) -> Any:
    """A ``--task-args`` value as int, float, bool or None where it reads as one, else the string."""
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def parse_task_args(text: str | None) -> dict[str, Any]:
    """``"grid=2x2,form=text,shots=1"`` -> ``{"grid": "2x2", "form": "text", "shots": 1}``."""
    out: dict[str, Any] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise DynamicsError(f"expected key=value, got {part!r}", field="task-args")
        out[key.strip().replace("-", "_")] = _coerce(value.strip())
    return out


def format_task_args(args: dict[str, Any]) -> str:
    """The inverse of :func:`parse_task_args` (keys in the given order)."""
    return ",".join(f"{k}={v}" for k, v in args.items())


def _registry() -> dict[str, Callable[..., Task]]:
    from dynamics.tasks import jigsaw

    return {"jigsaw": jigsaw.make_task}


def get_task(name: str, **task_args: Any) -> Task:
    """The task called ``name`` configured by ``task_args`` (see e.g. :class:`dynamics.tasks.jigsaw.JigsawConfig`)."""
    registry = _registry()
    if name not in registry:
        raise DynamicsError(f"unknown task {name!r}; choose one of {', '.join(sorted(registry))}", field="task")
    return registry[name](**task_args)


def task_of_record(record: dict) -> Task | None:
    """The task that built ``record`` (from ``meta.task`` and ``meta.task_args``), or None for other records.
    An unknown task or a bad argument is an error about the record's field (``meta.task (record ID)``)."""
    meta = record.get("meta") or {}
    if meta.get("task") is None:
        return None
    try:
        return get_task(meta["task"], **parse_task_args(meta.get("task_args") or ""))
    except DynamicsError as e:
        where = "meta.task" if e.field == "task" else "meta.task_args"
        raise DynamicsError(e.message, field=f"{where} (record {record['id']})") from None

"""The one exception type for user mistakes, and a check of options' numeric bounds that raises it.

A :class:`DynamicsError` carries where the mistake is (file, line, field) so that the CLI can print it on one
line and exit with status 2. Bugs raise ordinary exceptions.
"""

from __future__ import annotations

import math
from os import PathLike
from typing import Any


class DynamicsError(Exception):
    """A problem with the user's input: a bad file, an unknown model spec, contradictory options."""

    def __init__(
        self,
        message: str,
        *,
        file: str | PathLike | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = None if file is None else str(file)
        self.line = line
        self.field = field

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file + (f":{self.line}" if self.line is not None else "") + ": "
        field = ""
        if self.field:  # a command-line option (``--name``) or a field of a record or config
            field = f"option {self.field}: " if self.field.startswith("--") else f"field '{self.field}': "
        return f"{where}{field}{self.message}".replace("\n", " ")


def check_bounds(config: Any, at_least: dict[str, float], above: dict[str, float] | None = None) -> None:
    """Each option named in ``at_least`` is None or a finite number >= its bound; in ``above``, > its bound."""
    for bounds, op in ((at_least, ">="), (above or {}, ">")):
        for name, bound in bounds.items():
            value = getattr(config, name)
            if value is not None and not (math.isfinite(value) and (value >= bound if op == ">=" else value > bound)):
                raise DynamicsError(f"{name} must be {op} {bound}, got {value}", field=name)

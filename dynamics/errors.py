"""The one exception type for user mistakes.

A :class:`DynamicsError` carries where the mistake is (file, line, field) so that the CLI can print it on one
line and exit with status 2. Bugs raise ordinary exceptions.
"""

from __future__ import annotations

from os import PathLike


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
        field = f"field '{self.field}': " if self.field else ""
        return f"{where}{field}{self.message}".replace("\n", " ")

"""``dynamics data ...``: check record files (the jigsaw builder registers here too)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer

from dynamics.cli.app import console, data_app


@data_app.command("check")
def check(
    files: list[Path] = typer.Argument(..., help="Record files (.jsonl or .parquet) to validate."),
    prompts_only: bool = typer.Option(False, "--prompts-only", help="Completions are optional (RFT prompt sets)."),
) -> None:
    """Validate record files; print a summary, or the first problem as file:line: field: message."""
    from dynamics.data import read_records

    for f in files:
        recs = read_records(f, require_completion=not prompts_only)
        images = sum(len(r.get("images", [])) for r in recs)
        cats = Counter(str(r.get("meta", {}).get("category", "-")) for r in recs)
        top = ", ".join(f"{k}: {v}" for k, v in cats.most_common(5))
        console.print(f"{f}: {len(recs)} records, {images} images; categories {top}")

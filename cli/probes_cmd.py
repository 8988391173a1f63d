"""``dynamics probes build``: score a probe suite with a model and keep what it knows."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from dynamics.cli.app import console, probes_app


@probes_app.command("build")
def build(
    out: Path = typer.Option(..., "--out", "-o", help="Output probes file (.jsonl)."),
    model: str = typer.Option("default", "--model", "-m", help="Model spec whose responses are stored."),
    suite: str | None = typer.Option(None, "--suite",
                                     help="text | visual | a records file (default: text, or visual for VLMs)."),
    keep_correct: bool = typer.Option(False, "--keep-correct",
                                      help="Keep only the items the model answers correctly."),
    limit: int | None = typer.Option(None, "--limit", help="Score only the first N items."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", help="Response length budget."),
    batch_size: int = typer.Option(64, "--batch-size", help="Generation batch size."),
) -> None:
    """Store the model's greedy response (meta.base_response) with each item; print accuracy and log p."""
    from dynamics.probes import ProbeBuildConfig, build_probes

    cfg = ProbeBuildConfig(model=model, suite=suite, keep_correct=keep_correct, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, limit=limit)
    summary = build_probes(cfg, out)
    table = Table(title=f"{model} on the {summary['suite']} suite")
    for col in ("category", "items", "accuracy", "log p gold", "kept"):
        table.add_column(col, justify="left" if col == "category" else "right")
    for cat, row in summary["per_category"].items():
        kept = summary["n_kept"] if cat == "all" else summary["kept_per_category"].get(cat, 0)
        table.add_row(cat, str(row["n"]), f"{row['accuracy']:.1%}", f"{row['logp']:.2f}", str(kept))
    console.print(table)
    console.print(f"{out}: {summary['n_kept']} of {summary['n_items']} items "
                  f"(summary in {Path(out).with_suffix('.summary.json')})")

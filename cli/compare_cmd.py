"""``dynamics compare``: compare training-data distributions (see :mod:`dynamics.analyses.compare`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from dynamics.cli.app import app, console


def _ci(value: float, lo: float, hi: float) -> str:
    return f"{value:.3g}" + ("" if lo != lo else f" [{lo:.3g}, {hi:.3g}]")


@app.command("compare")
def compare(
    data: list[Path] = typer.Option(..., "--data", help="A record file (.jsonl/.parquet); give two or more."),
    label: list[str] = typer.Option([], "--label", help="A name per --data, in order (default: file names)."),
    model: str | None = typer.Option(None, "--model", help="Base model spec: adds length in tokens, log p and "
                                     "perplexity of each completion."),
    influence: list[Path] = typer.Option([], "--influence", help="Influence folder of one of the data sets "
                                         "(matched by its manifest's training file); repeatable."),
    step: int | None = typer.Option(None, "--step", help="Influence checkpoint step (default: the earliest)."),
    out: Path = typer.Option(..., "--out", help="Output folder for the tables and the figure."),
    alpha: float = typer.Option(0.05, "--alpha", help="Test level; intervals are at confidence 1 − alpha."),
    resamples: int = typer.Option(2000, "--resamples", help="Bootstrap resamples for the intervals."),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(8, "--batch-size"),
) -> None:
    """Per-sample length, base-model log p and influence of two or more data sets; two-sample tests
    (Kolmogorov–Smirnov, Mann–Whitney U) and effect sizes with bootstrap intervals; tables and a figure."""
    from dynamics.analyses.compare import MEASURES, CompareConfig
    from dynamics.analyses.compare import compare as run_compare

    res = run_compare(CompareConfig(data=data, out=out, labels=label, model=model, influence=influence, step=step,
                                    batch_size=batch_size, alpha=alpha, n_resamples=resamples, seed=seed))
    paired = "n_paired" in res.tests.columns
    table = Table(title=f"compare (A vs B; intervals {100 * (1 - alpha):g}%)")
    for col in ("A vs B", "measure", "mean A", "mean B", "A − B [CI]", "Cliff's δ [CI]", "KS p", "MWU p",
                "differs", *(["same prompts: A − B [CI] (n)"] if paired else [])):
        table.add_column(col, justify="left" if col in ("A vs B", "measure") else "right")
    for r in res.tests.itertuples():
        extra = []
        if paired:
            extra = ["–" if r.n_paired != r.n_paired else
                     f"{_ci(r.paired_diff, r.paired_diff_lo, r.paired_diff_hi)} ({r.n_paired:.0f})"]
        table.add_row(f"{r.a} vs {r.b}", MEASURES[r.metric][1], f"{r.mean_a:.3g}", f"{r.mean_b:.3g}",
                      _ci(r.mean_diff, r.mean_diff_lo, r.mean_diff_hi),
                      _ci(r.cliffs_delta, r.cliffs_delta_lo, r.cliffs_delta_hi), f"{r.ks_p:.2g}", f"{r.mwu_p:.2g}",
                      "[bold]yes[/]" if r.differs else "no", *extra)
    console.print(table)
    console.print(f"wrote {', '.join(str(p) for p in res.paths)}")

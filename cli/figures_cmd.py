"""``dynamics figures``: regenerate every figure from stored results (see :mod:`dynamics.analyses.figures`)."""

from __future__ import annotations

from pathlib import Path

import typer

from dynamics.cli.app import app, console


@app.command("figures")
def figures(
    runs: Path = typer.Option(..., "--runs", help="Folder of stored results: a study folder made by `dynamics "
                              "demo`, or any folder holding run, influence and compare folders."),
    out: Path = typer.Option(Path("figures"), "--out", help="Where the figures, findings.json and README.md go."),
) -> None:
    """Regenerate every figure from stored results (nothing is recomputed); skip, with a note, the figures
    whose inputs are absent; write README.md listing each figure and the command that made it."""
    from dynamics.analyses.figures import FiguresConfig, make_figures

    report = make_figures(FiguresConfig(runs=runs, out=out), progress=console.is_terminal)
    for name, reason in report.skipped:
        console.print(f"[yellow]skipped[/] {name}: {reason}")
    for made in report.made:
        console.print(f"{made.name}: " + ", ".join(str(p) for p in made.paths))
    for finding in report.findings.values():
        for c in finding.claims:
            colour = {"held": "green", "did not hold": "red"}.get(c.verdict, "yellow")
            console.print(f"  [{colour}]{c.verdict}[/]: {c.statement}")
    console.print(f"{len(report.made)} figures, {len(report.skipped)} skipped; see {report.readme}")

"""``dynamics demo``: the study end to end on the embedded model (see :mod:`dynamics.demo`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from dynamics.cli.app import app, console


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Folder for every result, figure and the report."),
    quick: bool = typer.Option(False, "--quick", help="The short plan (about 5 minutes on 2 cores)."),
    vlm: bool = typer.Option(False, "--vlm", help="The same pipeline on the tiny Qwen2.5-VL with image jigsaw "
                             "(mechanics only)."),
    seeds: int | None = typer.Option(None, "--seeds", help="Runs per configuration (default 1)."),
    base_rollouts: bool = typer.Option(False, "--base-rollouts", help="Add SFT on rollouts sampled from the base "
                                       "model (a variant of the simulated rollouts, sampled from the RFT model)."),
    force: bool = typer.Option(False, "--force", help="Recompute every stage instead of reusing stored results."),
) -> None:
    """SFT vs RFT vs SFT on simulated rollouts: learning, forgetting and influence; report.md + report.html."""
    import json

    from dynamics.demo import DemoConfig, run_demo

    report = run_demo(DemoConfig(out=str(out), quick=quick, vlm=vlm, seeds=seeds, base_rollouts=base_rollouts,
                                     force=force), log=console.print)
    state = json.loads((out / "demo.json").read_text())
    table = Table(title="where the time went")
    for col in ("stage", "seconds", "this time"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for name, s in state["stages"].items():
        table.add_row(name, f"{s['seconds']:.0f}", "cached" if s.get("cached") else "ran")
    console.print(table)
    findings = json.loads((out / "figures" / "findings.json").read_text())
    claims = Table(title="claims of the study, as measured here")
    for col in ("claim", "estimate [95% CI]", "verdict"):
        claims.add_column(col)
    from dynamics.analyses.report import fmt_claim

    for f in findings.values():
        for c in f["claims"]:
            claims.add_row(c["statement"], *fmt_claim(c))
    console.print(claims)
    console.print(f"report: {report} and {report.with_suffix('.html')}")

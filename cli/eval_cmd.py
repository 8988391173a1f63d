"""``dynamics eval``: novel-task and prior-knowledge scores of a model, a checkpoint, or every checkpoint of a run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from dynamics.cli.app import app, console


@app.command("eval")
def eval_(
    model: str = typer.Option(..., "--model", "-m", help="Model spec, checkpoint folder or run folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (eval.parquet, summary.jsonl, manifest.json)."),
    task: str | None = typer.Option("jigsaw", "--task", help="Task whose records are built for evaluation."),
    task_args: str = typer.Option("", "--task-args", help="Task arguments, e.g. preset=text or grid=2x2,form=image."),
    task_data: Path | None = typer.Option(None, "--task-data", help="Evaluate on these task records instead."),
    n_task: int = typer.Option(50, "--n-task", help="Number of task records to build."),
    task_seed: int = typer.Option(1234, "--task-seed", help="Seed of the built task records."),
    probes: str | None = typer.Option(None, "--probes", "-p",
                                      help="Probes file, or text | visual (default: the built-in suite)."),
    no_task: bool = typer.Option(False, "--no-task", help="Score the probes only."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Task answer budget."),
    probe_max_new_tokens: int = typer.Option(48, "--probe-max-new-tokens", help="Probe answer budget."),
    batch_size: int = typer.Option(16, "--batch-size", help="Generation batch size."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, ..."),
) -> None:
    """Greedy task accuracy/reward and probe accuracy/log p, per model step; results to OUT/eval.parquet."""
    from dynamics.evaluate import EvalConfig, run_eval, summaries

    cfg = EvalConfig(task=None if no_task else task, task_args=task_args,
                     task_data=None if no_task or task_data is None else str(task_data), n_task=n_task,
                     task_seed=task_seed, probes=probes, max_new_tokens=max_new_tokens,
                     probe_max_new_tokens=probe_max_new_tokens, batch_size=batch_size, device=device)
    df = run_eval(model, None, None, cfg, out)
    table = Table(title=f"eval of {model}")
    cols = [("step", "step", "{}"), ("task acc", "task_accuracy", "{:.1%}"), ("task reward", "task_reward", "{:.2f}"),
            ("probe acc", "probe_accuracy", "{:.1%}"), ("probe log p", "probe_logp", "{:.2f}"),
            ("probe log p (base resp.)", "probe_logp_base", "{:.2f}")]
    for name, _, _ in [("model", None, None), *cols]:
        table.add_column(name, justify="left" if name == "model" else "right")
    for s in summaries(df):
        table.add_row(s["model"], *[fmt.format(s[key]) if s.get(key) is not None else "-" for _, key, fmt in cols])
    console.print(table)
    console.print(f"{len(df)} rows -> {out / 'eval.parquet'}")

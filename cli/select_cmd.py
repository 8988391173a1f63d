"""``dynamics select``: keep the training data that preserves prior knowledge."""

from __future__ import annotations

from pathlib import Path

import typer

from dynamics.cli.app import app, console


@app.command("select")
def select(
    data: Path = typer.Option(..., "--data", help="Training records to select from."),
    probes: Path | None = typer.Option(None, "--probes", help="Prior-knowledge probe records (with "
                                       "--from-influence: optional, checked to be the table's)."),
    out: Path = typer.Option(..., "--out", help="Kept records (.jsonl/.parquet); decisions go next to it."),
    budget: str = typer.Option("0.5", "--budget", help="Samples to keep: a count (200) or a fraction (0.25)."),
    strategy: str = typer.Option("drop-harmful", "--strategy",
                                 help="drop-harmful | keep-aligned | simulate-rollouts."),
    model: str = typer.Option("default", "--model", help="Model spec or checkpoint to score with (not used with "
                              "--from-influence)."),
    from_influence: Path | None = typer.Option(
        None, "--from-influence", help="Rank by a stored `dynamics influence` output (folder or influence.parquet) "
        "as it was computed, instead of computing the kernels: score a large set once (sharded, resumable, "
        "torchrun), select from it many times."),
    step: int | None = typer.Option(None, "--step", help="With --from-influence: the training step of the "
                                    "table's checkpoint to rank by (default: the earliest)."),
    params: str = typer.Option("linear", "--params", help="Influence scope: linear | all | lora | regex."),
    mode: str = typer.Option("exact", "--mode", help="Influence mode: exact | projected."),
    batch_size: int = typer.Option(8, "--batch-size"),
    target: str = typer.Option("base", "--target", help="Probe completion: base | gold."),
    tokens: str = typer.Option("content", "--tokens", help="Completion tokens scored: content | all."),
    task: str = typer.Option("jigsaw", "--task", help="simulate-rollouts: task that scores samples."),
    task_args: str = typer.Option("", "--task-args", help="simulate-rollouts: e.g. grid=2x2,form=text."),
    samples: int = typer.Option(8, "--samples", help="simulate-rollouts: samples per prompt."),
    temperature: float = typer.Option(1.0, "--temperature", help="simulate-rollouts: sampling temperature."),
) -> None:
    """Rank training samples by predicted interference with the probes and keep the least harmful."""
    from dynamics.influence import InfluenceConfig
    from dynamics.select import SelectConfig, decisions_path
    from dynamics.select import select as run_select

    cfg = SelectConfig(data=str(data), probes=probes and str(probes), out=str(out), budget=budget,
                       strategy=strategy, model=model, task=task, task_args=task_args, samples=samples,
                       temperature=temperature, from_influence=from_influence and str(from_influence), step=step,
                       influence=InfluenceConfig(params=params, mode=mode, batch_size=batch_size, target=target,
                                                   tokens=tokens))
    path, table = run_select(cfg)
    kept = table[table.decision == "kept"]
    console.print(f"kept {len(kept)} of {len(table)} samples, ranked by the kernels of {table.ckpt.iloc[0]} -> "
                  f"{path}  (decisions: {decisions_path(path)})")
    console.print(f"mean kernel kept {kept.mean_kernel.mean():.4g} vs all {table.mean_kernel.mean():.4g}; "
                  f"mean cosine kept {kept.mean_cosine.mean():+.4f} vs all {table.mean_cosine.mean():+.4f}")

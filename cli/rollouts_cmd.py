"""``dynamics rollouts``: RFT-simulated rollouts (sample K per prompt, score, optionally keep the correct ones),
or the rollouts an RFT run logged (see :mod:`dynamics.train.rollouts`)."""

from __future__ import annotations

from pathlib import Path

import typer

from dynamics.cli.app import app, console


@app.command("rollouts")
def rollouts(
    out: Path = typer.Option(..., "--out", help="Output records (.jsonl/.parquet), ready for `train sft --data`."),
    model: str = typer.Option("default", "--model", help="Model spec (or checkpoint) to sample from."),
    task: str = typer.Option("jigsaw", "--task", help="Task that scores the samples."),
    task_args: str = typer.Option("", "--task-args", help="Task options, e.g. grid=2x2,form=text."),
    data: Path | None = typer.Option(None, "--data", help="Prompt records with answers, e.g. the SFT training set "
                                     "(default: --n-prompts built by the task)."),
    n_prompts: int = typer.Option(64, "--n-prompts", help="Prompts built by the task when --data is not given."),
    prompts_seed: int = typer.Option(0, "--prompts-seed", help="Seed of the built prompts."),
    samples: int = typer.Option(8, "--samples", help="Completions per prompt, K."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature (0: greedy, one sample)."),
    top_p: float = typer.Option(1.0, "--top-p"),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Default: the task's budget."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    batch_size: int = typer.Option(16, "--batch-size"),
    bf16: bool = typer.Option(False, "--bf16", help="Sample under bf16 autocast, as `train rft --bf16` "
                              "does (CPU: needs avx512_bf16/AMX to be fast)."),
    keep: str = typer.Option("all", "--keep", help="all, or correct: only rollouts with accuracy 1 (SFT-ready)."),
    from_run: Path | None = typer.Option(None, "--from-run", help="Extract the rollouts an RFT run logged instead."),
    steps: str | None = typer.Option(None, "--steps", help="With --from-run: step range A:B (inclusive)."),
    shard_size: int = typer.Option(64, "--shard-size", help="Prompts per resumable shard."),
    resume: bool = typer.Option(False, "--resume", help="Keep the finished shards of an interrupted run."),
) -> None:
    """Sample K completions per prompt and score them with the task reward, or extract an RFT run's rollouts;
    write them as records with reward (and advantage, step)."""
    from dynamics.train.rollouts import RolloutsConfig, make_rollouts

    path, s = make_rollouts(RolloutsConfig(
        out=str(out), model=model, task=task, task_args=task_args, data=str(data) if data else None,
        n_prompts=n_prompts, prompts_seed=prompts_seed, samples=samples, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, bf16=bf16, keep=keep,
        from_run=str(from_run) if from_run else None, steps=steps, shard_size=shard_size, resume=resume))
    acc = "" if s["accuracy"] is None else f", accuracy {s['accuracy']:.3f}"
    console.print(f"{path}: {s['kept']} of {s['rollouts']} rollouts over {s['prompts']} prompts "
                  f"(mean reward {s['reward_mean']:.3f}{acc})")

"""``dynamics train sft|rft``: fine-tune into a run folder (see :mod:`dynamics.train`).

Every TRL / transformers training option is reachable through ``--config FILE`` (YAML or JSON); the flags
below override the file. Multi-process: ``accelerate launch --num_processes N -m dynamics.cli train ...``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from dynamics.cli.app import console, train_app

CONFIG = typer.Option(None, "--config", help="YAML/JSON file of options: any field of the run config, i.e. every "
                      "TRL SFTConfig/GRPOConfig option plus dynamics' own.")
OUT = typer.Option(..., "--out", help="Run folder (metrics.jsonl, eval.jsonl, checkpoint-STEP/, ...).")
MODEL = typer.Option(None, "--model", help="Model spec to train (default: default).")
MAX_STEPS = typer.Option(None, "--max-steps", help="Optimizer steps (overrides --epochs).")
EPOCHS = typer.Option(None, "--epochs", help="Passes over the data (default 1).")
LR = typer.Option(None, "--lr", help="Peak learning rate.")
SEED = typer.Option(None, "--seed")
BF16 = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast (CPU: needs avx512_bf16/AMX to be fast).")
LORA = typer.Option(None, "--lora", help="Train a LoRA adapter of rank R instead of all weights.")
EVERY = typer.Option(None, "--checkpoint-every", help="Save a checkpoint every N steps.")
SCHEDULE = typer.Option(None, "--checkpoint-schedule", help="every:N | log:K | steps:A,B | none; the last step is "
                        "always saved.")
OPTIMIZER = typer.Option(None, "--optimizer-state", help="Keep optimizer.pt in all checkpoints, the last one "
                         "(default; needed by --resume) or none.")
EVAL_EVERY = typer.Option(None, "--eval-every", help="Evaluate task accuracy and probes every N steps (and at step 0 "
                          "and the end) into eval.jsonl.")
EVAL_TASK = typer.Option(None, "--eval-task", help="Task whose held-out prompts are evaluated.")
EVAL_TASK_ARGS = typer.Option(None, "--eval-task-args", help="Options of --eval-task, e.g. grid=2x2,form=text.")
EVAL_DATA = typer.Option(None, "--eval-data", help="Task evaluation records (instead of building --eval-n).")
EVAL_N = typer.Option(None, "--eval-n", help="Task prompts built for evaluation (default 50).")
PROBES = typer.Option(None, "--probes", help="Probe records evaluated during training.")
MONITOR = typer.Option(None, "--monitor", help="Probe records: forecast their log p change every step from the "
                       "training gradients (live interference monitor, RUN/monitor.jsonl).")
MONITOR_REFRESH = typer.Option(None, "--monitor-refresh", help="Recompute the probe gradients (and measure their log "
                               "p) every N steps (default 10).")
MONITOR_PARAMS = typer.Option(None, "--monitor-params", help="Parameters the monitor contracts: linear | all | lora | "
                              "a pattern (default: lora for LoRA runs, else linear).")
MONITOR_MAX_MEMORY = typer.Option(None, "--monitor-max-memory", help="GiB the monitor holds probe gradients "
                                  "materialised in (default 8; the rest contract in the slower ghost form).")
MONITOR_DTYPE = typer.Option(None, "--monitor-dtype", help="The monitor's probe store: float32 | bfloat16 | auto "
                             "(default: the gradients' dtype, bfloat16 where that would not fit its memory).")
RESUME = typer.Option(False, "--resume", help="Continue the run in --out from its newest complete checkpoint.")
OVERWRITE = typer.Option(False, "--overwrite", help="Delete the run in --out first.")
# the flags whose names differ from the config fields they set (the others are ``--field-name``)
FLAGS = {"output_dir": "--out", "num_train_epochs": "--epochs", "learning_rate": "--lr",
         "per_device_train_batch_size": "--batch-size", "gradient_accumulation_steps": "--grad-accum",
         "lora_r": "--lora", "num_generations": "--group-size", "max_completion_length": "--max-new-tokens"}


def _finish(result: object) -> None:
    """Leave the process group (under ``accelerate launch``; gloo's threads, left to interpreter teardown, aborted
    one rank in about 1 of 6 two-process runs), then let the main process report."""
    from dynamics.distributed import shutdown

    shutdown()
    r = result
    if not r.main_process:  # under accelerate launch every process returns; one reports
        return
    m = r.metrics
    shown = ", ".join(f"{k} {m[k]:.4g}" for k in ("loss", "reward_mean", "accuracy", "grad_norm")
                      if isinstance(m.get(k), (int, float)))
    console.print(f"{r.run}: {r.steps} steps in {r.seconds:.1f} s ({r.s_per_step:.2f} s/step); "
                  f"checkpoints {r.checkpoints}")
    if shown:
        console.print(f"last step: {shown}")
    if r.eval:
        console.print("last eval: " + ", ".join(f"{k} {v:.4g}" for k, v in r.eval.items()
                                                if k != "step" and "/" not in k and isinstance(v, (int, float))))


@train_app.command("sft")
def sft(
    out: Path = OUT,
    data: Path | None = typer.Option(None, "--data", help="Training records (.jsonl/.parquet): gold answers, "
                                     "or rollouts from `dynamics rollouts`."),
    model: str | None = MODEL,
    config: Path | None = CONFIG,
    max_steps: int | None = MAX_STEPS,
    epochs: float | None = EPOCHS,
    lr: float | None = LR,
    batch_size: int | None = typer.Option(None, "--batch-size", help="Records per step and process (default 8)."),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help="Gradient accumulation steps."),
    seed: int | None = SEED,
    bf16: bool | None = BF16,
    lora: int | None = LORA,
    checkpoint_every: int | None = EVERY,
    checkpoint_schedule: str | None = SCHEDULE,
    optimizer_state: str | None = OPTIMIZER,
    eval_every: int | None = EVAL_EVERY,
    eval_task: str | None = EVAL_TASK,
    eval_task_args: str | None = EVAL_TASK_ARGS,
    eval_data: Path | None = EVAL_DATA,
    eval_n: int | None = EVAL_N,
    probes: Path | None = PROBES,
    monitor: Path | None = MONITOR,
    monitor_refresh: int | None = MONITOR_REFRESH,
    monitor_params: str | None = MONITOR_PARAMS,
    monitor_max_memory: float | None = MONITOR_MAX_MEMORY,
    monitor_dtype: str | None = MONITOR_DTYPE,
    resume: bool = RESUME,
    overwrite: bool = OVERWRITE,
) -> None:
    """Supervised fine-tuning on prompt/completion records (completion tokens only, the project's tokenization)."""
    from dynamics.train.run import load_config
    from dynamics.train.sft import SFTRunConfig, train_sft

    cfg = load_config(
        SFTRunConfig, config, FLAGS, output_dir=str(out), data=str(data) if data else None, model=model,
        max_steps=max_steps, num_train_epochs=epochs, learning_rate=lr, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, seed=seed, bf16=bf16, lora_r=lora,
        checkpoint_every=checkpoint_every, checkpoint_schedule=checkpoint_schedule, optimizer_state=optimizer_state,
        eval_every=eval_every, eval_task=eval_task, eval_task_args=eval_task_args,
        eval_data=str(eval_data) if eval_data else None, eval_n=eval_n, probes=str(probes) if probes else None,
        monitor=str(monitor) if monitor else None, monitor_refresh=monitor_refresh, monitor_params=monitor_params,
        monitor_max_memory=monitor_max_memory, monitor_dtype=monitor_dtype,
        resume=resume or None, overwrite=overwrite or None)
    _finish(train_sft(cfg))


@train_app.command("rft")
def rft(
    out: Path = OUT,
    task: str | None = typer.Option(None, "--task", help="Task whose rewards are optimised (default jigsaw)."),
    task_args: str | None = typer.Option(None, "--task-args", help="Task options, e.g. grid=2x2,form=text."),
    data: Path | None = typer.Option(None, "--data", help="Prompt records with answers (default: built by the "
                                     "task)."),
    n_prompts: int | None = typer.Option(None, "--n-prompts", help="Training prompts built by the task (128)."),
    model: str | None = MODEL,
    config: Path | None = CONFIG,
    max_steps: int | None = MAX_STEPS,
    epochs: float | None = EPOCHS,
    lr: float | None = LR,
    prompts_per_step: int | None = typer.Option(None, "--prompts-per-step", help="Prompts per step, split over the processes (default 2)."),
    group_size: int | None = typer.Option(None, "--group-size", help="Completions per prompt, G (default 8)."),
    beta: float | None = typer.Option(None, "--beta", help="KL coefficient to the initial model (default 0)."),
    epsilon: float | None = typer.Option(None, "--epsilon", help="PPO clip range ε (default 0.2)."),
    temperature: float | None = typer.Option(None, "--temperature", help="Sampling temperature (default 1)."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Completion budget (default: the "
                                              "task's)."),
    seed: int | None = SEED,
    bf16: bool | None = BF16,
    lora: int | None = LORA,
    checkpoint_every: int | None = EVERY,
    checkpoint_schedule: str | None = SCHEDULE,
    optimizer_state: str | None = OPTIMIZER,
    eval_every: int | None = EVAL_EVERY,
    eval_n: int | None = EVAL_N,
    eval_data: Path | None = EVAL_DATA,
    probes: Path | None = PROBES,
    monitor: Path | None = MONITOR,
    monitor_refresh: int | None = MONITOR_REFRESH,
    monitor_params: str | None = MONITOR_PARAMS,
    monitor_max_memory: float | None = MONITOR_MAX_MEMORY,
    monitor_dtype: str | None = MONITOR_DTYPE,
    resume: bool = RESUME,
    overwrite: bool = OVERWRITE,
) -> None:
    """Reinforcement fine-tuning with GRPO on a task's rewards; every rollout is logged to RUN/rollouts.jsonl."""
    from dynamics.train.rft import RFTRunConfig, train_rft
    from dynamics.train.run import load_config

    cfg = load_config(
        RFTRunConfig, config, FLAGS, output_dir=str(out), task=task, task_args=task_args,
        data=str(data) if data else None, n_prompts=n_prompts, model=model, max_steps=max_steps,
        num_train_epochs=epochs, learning_rate=lr, prompts_per_step=prompts_per_step, num_generations=group_size,
        beta=beta, epsilon=epsilon, temperature=temperature, max_completion_length=max_new_tokens, seed=seed,
        bf16=bf16, lora_r=lora, checkpoint_every=checkpoint_every, checkpoint_schedule=checkpoint_schedule,
        optimizer_state=optimizer_state, eval_every=eval_every, eval_n=eval_n,
        eval_data=str(eval_data) if eval_data else None, probes=str(probes) if probes else None,
        monitor=str(monitor) if monitor else None, monitor_refresh=monitor_refresh, monitor_params=monitor_params,
        monitor_max_memory=monitor_max_memory, monitor_dtype=monitor_dtype,
        resume=resume or None, overwrite=overwrite or None)
    _finish(train_rft(cfg))

"""``dynamics train sft|rft``: fine-tune into a run folder (see :mod:`dynamics.train`).

Every TRL / transformers training option is reachable through ``--config FILE`` (YAML or JSON); the flags
below override the file. Multi-process: ``accelerate launch --num_processes N -m dynamics.cli train ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
EVAL_DATA = typer.Option(None, "--eval-data", help="Task evaluation records (instead of building --eval-n); one "
                         "without meta.task is scored by --eval-task (default: the training task of train rft).")
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


def _run_config(cls: type, options: dict[str, Any]) -> Any:
    """The run config from ``--config`` and a command's options, which are named as the config's fields (so an
    error about a field names its flag); paths become strings, and an unset switch leaves the file's value."""
    from dynamics.train.run import load_config

    options = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    options["resume"] = options["resume"] or None
    options["overwrite"] = options["overwrite"] or None
    return load_config(cls, options.pop("config"), **options)


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
    output_dir: Path = OUT,
    data: Path | None = typer.Option(None, "--data", help="Training records (.jsonl/.parquet): gold answers, "
                                     "or rollouts from `dynamics rollouts`."),
    model: str | None = MODEL,
    config: Path | None = CONFIG,
    max_steps: int | None = MAX_STEPS,
    num_train_epochs: float | None = EPOCHS,
    learning_rate: float | None = LR,
    per_device_train_batch_size: int | None = typer.Option(None, "--batch-size",
                                                           help="Records per step and process (default 8)."),
    gradient_accumulation_steps: int | None = typer.Option(None, "--grad-accum", help="Gradient accumulation steps."),
    seed: int | None = SEED,
    bf16: bool | None = BF16,
    lora_r: int | None = LORA,
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
    options = dict(locals())
    from dynamics.train.sft import SFTRunConfig, train_sft

    _finish(train_sft(_run_config(SFTRunConfig, options)))


@train_app.command("rft")
def rft(
    output_dir: Path = OUT,
    task: str | None = typer.Option(None, "--task", help="Task whose rewards are optimised (default jigsaw)."),
    task_args: str | None = typer.Option(None, "--task-args", help="Task options, e.g. grid=2x2,form=text."),
    data: Path | None = typer.Option(None, "--data", help="Prompt records with answers (default: built by the "
                                     "task)."),
    n_prompts: int | None = typer.Option(None, "--n-prompts", help="Training prompts built by the task (128)."),
    model: str | None = MODEL,
    config: Path | None = CONFIG,
    max_steps: int | None = MAX_STEPS,
    num_train_epochs: float | None = EPOCHS,
    learning_rate: float | None = LR,
    prompts_per_step: int | None = typer.Option(None, "--prompts-per-step", help="Prompts per step, split over the processes (default 2)."),
    num_generations: int | None = typer.Option(None, "--group-size", help="Completions per prompt, G (default 8)."),
    beta: float | None = typer.Option(None, "--beta", help="KL coefficient to the initial model (default 0)."),
    epsilon: float | None = typer.Option(None, "--epsilon", help="PPO clip range ε (default 0.2)."),
    temperature: float | None = typer.Option(None, "--temperature", help="Sampling temperature (default 1)."),
    max_completion_length: int | None = typer.Option(None, "--max-new-tokens", help="Completion budget (default: "
                                                     "the task's)."),
    seed: int | None = SEED,
    bf16: bool | None = BF16,
    lora_r: int | None = LORA,
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
    options = dict(locals())
    from dynamics.train.rft import RFTRunConfig, train_rft

    _finish(train_rft(_run_config(RFTRunConfig, options)))

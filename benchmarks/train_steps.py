"""Seconds per optimizer step of ``dynamics train sft`` and ``dynamics train rft`` on the default model.

Targets (issue 7's budgets, 2 CPU cores, bf16 autocast): SFT about 2.2 s/step at batch 8 on jigsaw gold
records; GRPO about 7 s/step with 2 prompts x 8 completions and the jigsaw text task's completion budget.
Each run trains ``--steps`` steps after one warm-up step (not counted); the step times come from the run's
``metrics.jsonl`` (time between consecutive logged steps), so checkpoint saving is outside them.

    python -m benchmarks.train_steps [--model default] [--steps 4] [--no-bf16] [--threads N] [--task-args ...]
                                     [--json out.json]

On a machine shared with other jobs, OpenMP threads waiting for descheduled siblings inflate these times
several-fold; compare with ``--threads 1`` and report the load average printed with the result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dynamics.runtime import tune_cpu_allocator
from dynamics.store import read_jsonl_rows
from dynamics.tasks import get_task, parse_task_args
from dynamics.train.rft import RFTRunConfig, train_rft
from dynamics.train.run import load_config
from dynamics.train.sft import SFTRunConfig, train_sft


def step_times(run: Path) -> list[float]:
    rows = read_jsonl_rows(run / "metrics.jsonl")
    return [b["time"] - a["time"] for a, b in zip(rows, rows[1:], strict=False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--task-args", default="", help="jigsaw options, e.g. preset=text-0shot")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tune_cpu_allocator()  # as the dynamics command does
    if args.threads:
        torch.set_num_threads(args.threads)
    bf16 = not args.no_bf16
    task = get_task("jigsaw", **parse_task_args(args.task_args))
    common = dict(model=args.model, max_steps=args.steps + 1, bf16=bf16, disable_tqdm=True, seed=0,
                  optimizer_state="none", checkpoint_schedule="none", overwrite=True)
    out = {"model": args.model, "task_args": args.task_args, "bf16": bf16, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "load_avg": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sft = train_sft(load_config(SFTRunConfig, None, output_dir=f"{tmp}/sft", per_device_train_batch_size=8,
                                    **common), task.build(8 * (args.steps + 1), 0))
        out["sft_total_s"] = time.perf_counter() - t0
        out["sft_s_per_step"] = statistics.median(step_times(sft.run))
        t0 = time.perf_counter()
        rft = train_rft(load_config(RFTRunConfig, None, output_dir=f"{tmp}/rft", n_prompts=2 * (args.steps + 1),
                                    task_args=args.task_args, **common))
        out["rft_total_s"] = time.perf_counter() - t0
        out["rft_s_per_step"] = statistics.median(step_times(rft.run))
    out["load_avg_end"] = os.getloadavg()
    print(f"SFT  batch 8:           {out['sft_s_per_step']:.2f} s/step (target ~2.2)")
    print(f"GRPO 2 prompts x 8:     {out['rft_s_per_step']:.2f} s/step (target ~7)")
    print(f"load average {out['load_avg']} -> {out['load_avg_end']} on {out['cpus']} CPUs, {out['threads']} threads")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

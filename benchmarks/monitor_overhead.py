"""Overhead of the live interference monitor (``dynamics train sft --monitor``) on the default model.

Target (issue 10): at most 25% of the SFT step time with 32 probes. Two SFT runs on the same jigsaw records, batch
8, one without and one with the monitor (probe gradients refreshed only at the start, as between refreshes), each
of ``--warmup`` steps (not counted: the process's heap grows to its working size, with page faults, over the
first two or three steps), ``--steps`` timed steps and one last step, timed apart: at the last step (as at a
refresh step) the monitor takes that step's predicted change by a pass of its own over the probe store. Step
times come from each run's ``metrics.jsonl`` (the time between consecutive logged steps). Prints the medians and
their ratio, measured in the same process; with ``--repeat R``, R such pairs and the median of their overheads
(a shared machine's speed drifts by tens of percent over minutes).

    python -m benchmarks.monitor_overhead [--warmup 3] [--steps 4] [--repeat 1] [--probes 32] [--bf16]
                                          [--params linear] [--max-memory GiB] [--dtype auto] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from benchmarks.train_steps import step_times
from dynamics.data import write_records
from dynamics.probes import text_suite
from dynamics.runtime import tune_cpu_allocator
from dynamics.store import read_jsonl_rows
from dynamics.tasks import get_task
from dynamics.train.run import load_config
from dynamics.train.sft import SFTRunConfig, train_sft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--probes", type=int, default=32)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--params", default="linear")
    ap.add_argument("--max-memory", type=float, default=None,
                    help="GiB of probe store held materialised (--monitor-max-memory; default 8)")
    ap.add_argument("--dtype", default="auto", help="the monitor's store: auto | float32 | bfloat16 (--monitor-dtype)")
    ap.add_argument("--repeat", type=int, default=1, help="pairs of runs (plain, monitored); the median pair counts")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tune_cpu_allocator()  # as the dynamics command does
    total = args.warmup + args.steps + 1
    records = get_task("jigsaw").build(8 * total, 0)
    out = {"warmup": args.warmup, "steps": args.steps, "repeat": args.repeat, "probes": args.probes, "bf16": args.bf16, "params": args.params,
           "max_memory_gb": args.max_memory, "dtype": args.dtype, "load_avg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        probes = write_records(f"{tmp}/probes.jsonl", text_suite()[:: len(text_suite()) // args.probes][: args.probes])
        for rep in range(args.repeat):  # pairs of runs: drift in the machine's speed hits both runs of a pair
            for name, monitor in (("plain", None), ("monitor", str(probes))):
                run = f"{tmp}/{name}{rep}"
                cfg = load_config(SFTRunConfig, None, output_dir=run, model="default", max_steps=total,
                                  per_device_train_batch_size=8, bf16=args.bf16, disable_tqdm=True, seed=0,
                                  optimizer_state="none", checkpoint_schedule="none", monitor=monitor,
                                  monitor_refresh=10_000, monitor_params=args.params,
                                  monitor_max_memory=args.max_memory, monitor_dtype=args.dtype)
                train_sft(cfg, records)
                times = step_times(Path(run))  # steps 2, 3, ... (the first logged row is step 1's)
                out.setdefault(f"{name}_s_steps", []).append(times)
                out.setdefault(f"{name}_s_per_step", []).append(statistics.median(times[args.warmup - 1: -1]))
                out.setdefault(f"{name}_s_last_step", []).append(times[-1])
                if monitor:
                    first = read_jsonl_rows(Path(run) / "monitor.jsonl")[0]
                    out.setdefault("store", []).append({k: first.get(k) for k in ("store_dtype", "materialised_gib")})
    out["overhead_per_pair"] = [m / p - 1 for p, m in zip(out["plain_s_per_step"], out["monitor_s_per_step"],
                                                            strict=True)]
    out["overhead"] = statistics.median(out["overhead_per_pair"])
    out["load_avg_after"] = os.getloadavg()
    print(f"SFT step, batch 8: {' / '.join(f'{t:.2f}' for t in out['plain_s_per_step'])} s; with the monitor "
          f"({args.probes} probes, {args.params}): {' / '.join(f'{t:.2f}' for t in out['monitor_s_per_step'])} s; "
          f"overhead {' / '.join(f'{100 * o:.0f}%' for o in out['overhead_per_pair'])}, median "
          f"{100 * out['overhead']:.0f}% (target <= 25%); last step "
          f"{' / '.join(f'{t:.2f}' for t in out['plain_s_last_step'])} s and "
          f"{' / '.join(f'{t:.2f}' for t in out['monitor_s_last_step'])} s; "
          f"load {out['load_avg_before'][0]:.1f} -> {out['load_avg_after'][0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

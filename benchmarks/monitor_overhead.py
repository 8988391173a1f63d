"""Overhead of the live interference monitor (``dynamics train sft --monitor``) on the default model.

Target (issue 10): at most 25% of the SFT step time with 32 probes. Two SFT runs of ``--steps`` steps (after one
warm-up step, not counted) on the same jigsaw records, batch 8, one without and one with the monitor (probe
gradients refreshed only at the start, as between refreshes); step times come from each run's ``metrics.jsonl``
(the time between consecutive logged steps). Prints both medians and their ratio, measured in the same process.

    python -m benchmarks.monitor_overhead [--steps 6] [--probes 32] [--bf16] [--params linear] [--json out.json]
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
from dynamics.tasks import get_task
from dynamics.train.run import load_config
from dynamics.train.sft import SFTRunConfig, train_sft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--probes", type=int, default=32)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--params", default="linear")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tune_cpu_allocator()  # as the dynamics command does
    records = get_task("jigsaw").build(8 * (args.steps + 1), 0)
    out = {"steps": args.steps, "probes": args.probes, "bf16": args.bf16, "params": args.params,
           "load_avg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        probes = write_records(f"{tmp}/probes.jsonl", text_suite()[:: len(text_suite()) // args.probes][: args.probes])
        for name, monitor in (("plain", None), ("monitor", str(probes))):
            cfg = load_config(SFTRunConfig, None, output_dir=f"{tmp}/{name}", model="default", max_steps=args.steps + 1,
                              per_device_train_batch_size=8, bf16=args.bf16, disable_tqdm=True, seed=0,
                              optimizer_state="none", checkpoint_schedule="none", monitor=monitor,
                              monitor_refresh=10_000, monitor_params=args.params)
            train_sft(cfg, records)
            times = step_times(Path(f"{tmp}/{name}"))[1:]  # the first interval holds the warm-up step
            out[f"{name}_s_per_step"] = statistics.median(times)
    out["overhead"] = out["monitor_s_per_step"] / out["plain_s_per_step"] - 1
    out["load_avg_after"] = os.getloadavg()
    print(f"SFT step, batch 8: {out['plain_s_per_step']:.2f} s; with the monitor ({args.probes} probes, "
          f"{args.params}): {out['monitor_s_per_step']:.2f} s; overhead {100 * out['overhead']:.0f}% (target <= 25%)"
          f"; load {out['load_avg_before'][0]:.1f} -> {out['load_avg_after'][0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

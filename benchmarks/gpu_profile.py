"""Where `dynamics` exact spends its time on a GPU: one warm call timed, then one under torch.profiler, for a bf16
model with fp32 products, with ``--products model``, and an fp32 model (N 64, 8 probes, 128 tokens, batch 8), next
to the floor (one batched forward+backward). Tables of ops by GPU and CPU time go to $OUT/prof_<case>.txt.

    OUT=/tmp python -m benchmarks.gpu_profile          # on a CUDA machine (DEV=cpu SPEC=tiny-llama to try it here)

COLD=1 profiles the first call instead (after only the one-sample forward+backward the benchmark's subprocesses
warm up with), to see what a fresh process pays once; CASES picks some of bfloat16-float32,bfloat16-model,float32-float32.
"""
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.influence import bench_model
from benchmarks.influence_core import make_records, standard_forward_backward
from benchmarks.methods import Inputs, dynamics_exact

out = os.environ.get("OUT", "/tmp")
DEV, SPEC = os.environ.get("DEV", "cuda"), os.environ.get("SPEC", "random-llama-1536x16")
sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)
COLD = os.environ.get("COLD") == "1"
CASES = os.environ.get("CASES", "bfloat16-float32,bfloat16-model,float32-float32").split(",")
for dtype, products in (c.split("-") for c in CASES):
    lm = bench_model(SPEC, dtype, DEV)
    tr = make_records(lm.tokenizer, 64, 128, "t", 0)
    pr = make_records(lm.tokenizer, 8, 128, "p", 1)
    inputs = Inputs.of(lm, tr, pr)
    standard_forward_backward(lm, tr[:1], 1)
    if COLD:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as cold:
            dynamics_exact(lm, inputs, device=DEV, products=products)
            sync()
        with open(f"{out}/prof_cold_{dtype}-{products}.txt", "w") as f:
            f.write(cold.key_averages().table(sort_by="self_cpu_time_total", row_limit=50, max_name_column_width=80))
            f.write(cold.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=80))
    else:
        dynamics_exact(lm, inputs, device=DEV, products=products)  # warm
    sync()
    t = time.perf_counter()
    dynamics_exact(lm, inputs, device=DEV, products=products)
    sync()
    plain = time.perf_counter() - t
    t = time.perf_counter()
    standard_forward_backward(lm, tr, 8)
    sync()
    fl = time.perf_counter() - t
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        dynamics_exact(lm, inputs, device=DEV, products=products)
        sync()
    ka = prof.key_averages()
    tag = f"{dtype}-{products}"
    print(f"== {tag}: dynamics {plain:.3f} s, floor {fl:.3f} s", flush=True)
    print(ka.table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60), flush=True)
    with open(f"{out}/prof_{tag}.txt", "w") as f:
        f.write(f"dynamics {plain:.3f} s floor {fl:.3f} s\n")
        f.write(ka.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=80))
        f.write(ka.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=80))
        f.write(prof.key_averages(group_by_stack_n=0).table(sort_by="cpu_time_total", row_limit=40,
                                                            max_name_column_width=80))
    del lm, inputs
    torch.cuda.empty_cache()

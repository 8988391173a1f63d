"""The train x probe gradient-kernel matrix by ``dynamics`` and by the tools people would use instead, timed
on the same inputs in one run, each method in a fresh subprocess (so its peak memory is its own).

    bash benchmarks/setup_peers.sh                      # once: .venv-bench with opacus, bergson, kronfluence
    .venv-bench/bin/python -m benchmarks.influence --json out.json [--models tiny-llama,default]
        [--train 16,64,256 --tokens 32,64,512 --probes 8 --cap 240 --repeat 3 --device cuda --dtype bfloat16]

Two sweeps per model: N_train over ``--train`` at ``--base-tokens`` tokens per sample, and sequence length over
``--tokens`` at ``--base-train`` samples. Every method computes K[u, o] = ⟨g(u), g(o)⟩
(g the gradient of a sample's completion log-likelihood) over a parameter set (scope, see
:mod:`benchmarks.methods`), and its error is measured against ``dynamics`` exact on the same scope. A method
that runs past ``--cap`` seconds (or fails, e.g. out of memory) is recorded as such and not run on the larger
sizes of that sweep. Peers not installed in the running environment are reported as missing.

Writes the JSON (every measurement), ``benchmarks/RESULTS.md`` (ratio tables, targets, machine, command) and
``figures/benchmark_scaling.png`` (log-log time against N_train and sequence length, fitted exponents).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Method:
    """One way of computing the kernel: ``fn`` is ``module:function`` taking ``(lm, inputs, **kwargs)``."""

    name: str
    fn: str
    scope: str
    kind: str  # exact | projected | floor
    needs: str = ""  # the library it imports (to report it missing)
    kwargs: dict = field(default_factory=dict)
    variant: bool = False  # a variant of dynamics itself: run only when named in --methods


K_DIM = 1024  # projected features per layer (kron: 32 x 32) or in all (jl)
METHODS = [
    Method("forward+backward (floor)", "benchmarks.methods:floor", "-", "floor"),
    Method("dynamics exact linear", "benchmarks.methods:dynamics_exact", "linear", "exact"),
    Method("dynamics exact linear ghost", "benchmarks.methods:dynamics_exact", "linear", "exact",
           kwargs={"contraction": "ghost"}, variant=True),  # the planner's two forced choices, to check its pick per device
    Method("dynamics exact linear dense", "benchmarks.methods:dynamics_exact", "linear", "exact",
           kwargs={"contraction": "dense"}, variant=True),
    Method("dynamics exact linear model-dtype", "benchmarks.methods:dynamics_exact", "linear", "exact",
           kwargs={"products": "model"}, variant=True),  # a bf16 model's products and store in bf16
    Method("dynamics exact linear per-layer", "benchmarks.methods:dynamics_exact", "linear", "exact",
           kwargs={"group_bytes": 1}, variant=True),  # ghost layers contracted one at a time, not in shape groups
    Method("dynamics exact linear cudnn", "benchmarks.methods:dynamics_exact", "linear", "exact",
           kwargs={"cudnn_attention": True}, variant=True),  # attention as torch picks it (cuDNN on Hopper GPUs)
    Method("dynamics exact all", "benchmarks.methods:dynamics_exact", "all", "exact"),
    Method("dynamics exact body", "benchmarks.methods:dynamics_exact", "body", "exact"),
    Method("dynamics projected kron", "benchmarks.methods:dynamics_projected", "body", "projected",
           kwargs={"projection": "kron", "proj_dim": K_DIM}),
    Method("dynamics projected jl", "benchmarks.methods:dynamics_projected", "body", "projected",
           kwargs={"projection": "jl", "proj_dim": K_DIM}),
    Method("naive loop linear", "benchmarks.methods:naive", "linear", "exact"),
    Method("naive loop all", "benchmarks.methods:naive", "all", "exact"),
    Method("torch.func linear", "benchmarks.methods:torch_func", "linear", "exact"),
    Method("torch.func all", "benchmarks.methods:torch_func", "all", "exact"),
    Method("opacus linear", "benchmarks.peers:opacus", "linear", "exact", "opacus"),
    Method("kronfluence linear", "benchmarks.peers:kronfluence", "linear", "exact", "kronfluence"),
    Method("bergson body", "benchmarks.peers:bergson", "body", "exact", "bergson"),
    Method("bergson projected per-module", "benchmarks.peers:bergson", "body", "projected", "bergson",
           {"projection_dim": 32, "projection_target": "per_module"}),
    Method("bergson projected global", "benchmarks.peers:bergson", "body", "projected", "bergson",
           {"projection_dim": K_DIM, "projection_target": "global"}),
]
BY_NAME = {m.name: m for m in METHODS}
REFERENCE = {"linear": "dynamics exact linear", "all": "dynamics exact all", "body": "dynamics exact body"}
# which dynamics row each method is compared with (time and memory ratios)
BASELINE = {**{m.name: REFERENCE[m.scope] for m in METHODS if m.scope in REFERENCE},
            "forward+backward (floor)": "dynamics exact linear",
            "bergson projected per-module": "dynamics projected kron",
            "bergson projected global": "dynamics projected jl"}


@dataclass
class Case:
    model: str
    n_train: int
    n_probes: int
    tokens: int
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    sweep: str = ""
    warm: bool = False  # time a method's second call in its process (one-time costs, e.g. kernel builds, left out)


# ------------------------------------------------------------------------------------------------ models
def bench_model(spec: str, dtype: str = "float32", device: str = "cpu"):
    """A project model spec, or ``random-llama-<hidden>x<layers>`` (a randomly initialised Llama with a 32k
    vocabulary over the tiny byte tokenizer, for GPU runs where no other weights exist)."""
    from dynamics.models import DTYPES, LoadedModel, load_model, tiny_tokenizer

    if not spec.startswith("random-llama-"):
        return load_model(spec, dtype=dtype, device=device)
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers = (int(x) for x in spec.removeprefix("random-llama-").split("x"))
    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=32768, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                      num_key_value_heads=max(1, hidden // 256), max_position_embeddings=4096,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(DTYPES[dtype]).eval()
    return LoadedModel(model=model, tokenizer=tok, kind="causal-lm", name=spec)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


# ------------------------------------------------------------------------------------------------ worker
def worker(method: Method, case: Case, records: Path, out: Path) -> None:
    """Run one method on one case in this (fresh) process; write ``result.json`` and ``K.pt`` into ``out``."""
    from benchmarks.influence_core import standard_forward_backward
    from benchmarks.methods import Inputs
    from dynamics.data import read_records

    if method.needs:
        importlib.import_module(method.needs)
    module, name = method.fn.split(":")
    fn = getattr(importlib.import_module(module), name)
    lm = bench_model(case.model, case.dtype, case.device)
    inputs = Inputs.of(lm, read_records(records / "train.jsonl"), read_records(records / "probes.jsonl"))
    standard_forward_backward(lm, inputs.train_records[:1], 1)  # first kernels of the process: not timed
    kwargs = {"scope": method.scope, "batch_size": case.batch_size, "device": case.device, **method.kwargs}
    if case.warm:
        fn(lm, inputs, **kwargs)
    # a full collection scans every object of the process (0.2 s with transformers loaded): freeze what is here
    # so that one does not land in a 40-ms call of one method and not in another's
    gc.collect()
    gc.freeze()
    cuda = case.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = rss_mb()
    t0 = time.perf_counter()
    K = fn(lm, inputs, **kwargs)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"seconds": seconds, "peak_rss_mb": peak, "base_rss_mb": base, "extra_mb": peak - base}
    if cuda:
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if K is not None:
        torch.save(K, out / "K.pt")
    (out / "result.json").write_text(json.dumps(result))


def run_one(method: Method, case: Case, records: Path, cap: float) -> tuple[dict, torch.Tensor | None]:
    """``worker`` in a subprocess with a time cap; the result (or the reason there is none) and K."""
    if method.needs and importlib.util.find_spec(method.needs) is None:
        return {"status": f"not installed ({method.needs})"}, None
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "benchmarks.influence", "--worker", method.name, "--case",
               json.dumps(asdict(case)), "--records", str(records), "--out", out]
        # passive OpenMP waits: on a CPU shared with other jobs, spinning threads slow small kernels 50-fold
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=cap, env=env, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"status": f"over the {cap:.0f} s cap"}, None
        if res.returncode:
            lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
            why = "killed (out of memory?)" if res.returncode < 0 else (lines[-1][:160] if lines else "failed")
            return {"status": f"failed: {why}"}, None
        result = {"status": "ok", **json.loads(Path(out, "result.json").read_text())}
        K = torch.load(Path(out, "K.pt")) if Path(out, "K.pt").exists() else None
        return result, K


# ------------------------------------------------------------------------------------------------ driver
def write_inputs(case: Case, folder: Path) -> None:
    from benchmarks.influence_core import make_records
    from dynamics.data import write_records

    tok = _tokenizer(case.model)
    write_records(folder / "train.jsonl", make_records(tok, case.n_train, case.tokens, "t", 0))
    write_records(folder / "probes.jsonl", make_records(tok, case.n_probes, case.tokens, "p", 1))


def _tokenizer(spec: str):
    from dynamics.models import load_model, tiny_tokenizer

    return tiny_tokenizer() if spec.startswith("random-llama-") else load_model(spec).tokenizer


def run_case(case: Case, methods: list[Method], cap: float, dead: dict[str, str], log,
             last: dict[str, tuple[int, float]] | None = None, repeat: int = 1) -> list[dict]:
    """Every method on one case, skipping those in ``dead`` (over the cap or failed on a smaller size) and those
    whose time on the previous size of the sweep, scaled linearly with the size, predicts a run past the cap
    (``last``: method -> (size, seconds)). With ``repeat`` > 1 every method runs that many times, the methods
    interleaved (so drift in the machine's speed hits all of them alike), and its row is its median run (all
    times in ``seconds_runs``)."""
    last = {} if last is None else last
    size = case.n_train if case.sweep == "n_train" else case.tokens
    from benchmarks.methods import relative_error
    from benchmarks.report import memory

    rows, kernels = [], {}
    runs: dict[str, list[dict]] = {m.name: [] for m in methods}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        write_inputs(case, folder)
        for rep in range(repeat):
            for m in methods:
                guess = last[m.name][1] * size / last[m.name][0] if m.name in last else 0.0
                if rep and runs[m.name][0]["status"] != "ok":
                    continue
                if rep:
                    res, K = run_one(m, case, folder, cap)
                elif m.name in dead:
                    res, K = {"status": f"skipped ({dead[m.name]} on a smaller size)"}, None
                elif guess > cap:
                    res, K = {"status": f"skipped (predicted {guess:.0f} s, over the {cap:.0f} s cap)"}, None
                    dead[m.name] = "predicted over the cap"
                else:
                    res, K = run_one(m, case, folder, cap)
                    if res["status"] == "ok":
                        last[m.name] = (size, res["seconds"])
                    elif not res["status"].startswith("not installed"):
                        dead[m.name] = res["status"]
                if K is not None:
                    kernels.setdefault(m.name, K)
                runs[m.name].append(res)
        for m in methods:
            ok = sorted((r for r in runs[m.name] if r["status"] == "ok"), key=lambda r: r["seconds"])
            res = ok[(len(ok) - 1) // 2] if ok and len(ok) == len(runs[m.name]) else next(
                r for r in runs[m.name] if r["status"] != "ok")
            if len(ok) > 1:
                res = {**res, "seconds_runs": [r["seconds"] for r in runs[m.name]]}
            row = {**asdict(case), "method": m.name, "scope": m.scope, "kind": m.kind, **res}
            rows.append(row)
            log(row)
    for row in rows:
        ref = REFERENCE.get(row["scope"])
        if row["method"] in kernels and ref in kernels and ref != row["method"]:
            row.update(relative_error(kernels[row["method"]], kernels[ref]))
        naive = "naive loop " + row["scope"]
        if row["method"] == ref and ref in kernels and naive in kernels:  # dynamics itself against the brute force
            row.update(relative_error(kernels[ref], kernels[naive]))
    by_name = {r["method"]: r for r in rows}
    for row in rows:
        base = by_name.get(BASELINE.get(row["method"], ""))
        if row.get("status") == "ok" and base and base.get("status") == "ok":
            row["time_ratio"] = row["seconds"] / base["seconds"]
            row["mem_ratio"] = max(memory(row), 1.0) / max(memory(base), 1.0)
    return rows


def machine() -> dict:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "ram_gb": round(mem, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_avg": round(os.getloadavg()[0], 1)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for lib in ("transformers", "opacus", "bergson", "kronfluence"):
        try:
            info[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            info[lib] = "not installed"
    return info


def cases(args: argparse.Namespace) -> list[Case]:
    out = []
    common = {"n_probes": args.probes, "batch_size": args.batch_size, "device": args.device, "dtype": args.dtype,
              "warm": args.warm}
    for model in args.models.split(","):
        for n in _ints(args.train):
            out.append(Case(model, n, tokens=args.base_tokens, sweep="n_train", **common))
        for t in _ints(args.tokens):
            out.append(Case(model, args.base_train, tokens=t, sweep="tokens", **common))
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny-llama,default")
    ap.add_argument("--train", default="16,32,64,128,256,512", help="N_train sweep (at --base-tokens)")
    ap.add_argument("--tokens", default="32,64,128,256,512", help="sequence-length sweep (at --base-train)")
    ap.add_argument("--base-train", type=int, default=16)
    ap.add_argument("--base-tokens", type=int, default=64)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    ap.add_argument("--methods", default="", help="comma-separated method names (default: all)")
    ap.add_argument("--cap", type=float, default=240, help="seconds per method and size before it is dropped")
    ap.add_argument("--warm", action="store_true",
                    help="time each method's second call in its process, not its first (GPU memory is that "
                         "call's; on CPU the peak RSS is the process's, so it includes the first call)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per method and size (interleaved; rows are medians)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    ap.add_argument("--figure", type=Path, default=ROOT / "figures" / "benchmark_scaling.png")
    ap.add_argument("--report-only", type=Path, nargs="+",
                    help="rewrite RESULTS.md and the figure from saved --json files (runs merged)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--records", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(BY_NAME[args.worker], Case(**json.loads(args.case)), args.records, args.out)

    from benchmarks.report import memory, write_figure, write_results

    if args.report_only:
        reports = [json.loads(p.read_text()) for p in args.report_only]
        write_figure([r for rep in reports for r in rep["rows"]], args.figure)
        return write_results(reports, args.results, args.figure)
    methods = [BY_NAME[n.strip()] for n in args.methods.split(",")] if args.methods else \
        [m for m in METHODS if not m.variant]
    command = " ".join([Path(sys.executable).relative_to(ROOT).as_posix() if Path(sys.executable).is_relative_to(
        ROOT) else "python", "-m", "benchmarks.influence", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    rows: list[dict] = []
    dead: dict[tuple, dict] = {}
    last: dict[tuple, dict] = {}

    def log(row: dict) -> None:
        took = f"{row['seconds']:8.2f} s  {memory(row):8.0f} MB" if row.get("status") == "ok" else row["status"]
        print(f"{row['model']:>12s} N={row['n_train']:<4d} T={row['tokens']:<4d} {row['method']:32s} {took}",
              flush=True)

    started = time.time()
    for path in (args.json, args.results, args.figure):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
    for case in cases(args):
        key = (case.model, case.sweep)
        rows += run_case(case, methods, args.cap, dead.setdefault(key, {}), log, last.setdefault(key, {}), args.repeat)
        report = {"machine": machine(), "command": command, "started": time.strftime(
            "%Y-%m-%d %H:%M", time.localtime(started)), "minutes": (time.time() - started) / 60, "rows": rows}
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
    write_figure(rows, args.figure)
    write_results([report], args.results, args.figure)
    print(f"wrote {args.results} and {args.figure}")


if __name__ == "__main__":
    main()

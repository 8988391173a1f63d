"""Error of the projected kernels over random draws: `dynamics` kron and jl against bergson's per-module and
global projections at equal feature dimension, each against `dynamics` exact on the same (body) scope.

One draw is not a measurement: on SmolLM2 the kron error of single draws spans 0.06-0.12. This script takes
``--seeds`` draws of each projection on the benchmark's inputs (``make_records``: N_train train and 8 probe records
of ``--tokens`` tokens) and reports each method's mean, min and max relative Frobenius error.

    .venv-bench/bin/python -m benchmarks.projection_error [--model default] [--seeds 5] [--methods kron,bergson-per-module]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from benchmarks.influence import K_DIM, bench_model
from benchmarks.influence_core import make_records
from benchmarks.methods import Inputs, dynamics_exact, dynamics_projected, relative_error

METHODS = {
    "kron": lambda lm, inp, s: dynamics_projected(lm, inp, projection="kron", proj_dim=K_DIM, proj_seed=s),
    "jl": lambda lm, inp, s: dynamics_projected(lm, inp, projection="jl", proj_dim=K_DIM, proj_seed=s),
    "bergson-per-module": lambda lm, inp, s: _bergson(lm, inp, s, 32, "per_module"),
    "bergson-global": lambda lm, inp, s: _bergson(lm, inp, s, K_DIM, "global"),
}


def _bergson(lm, inp, seed: int, dim: int, target: str) -> torch.Tensor:
    from benchmarks.peers import bergson

    return bergson(lm, inp, projection_dim=dim, projection_target=target, projection_seed=seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--train", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--methods", default="kron,bergson-per-module")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    lm = bench_model(args.model)
    inp = Inputs.of(lm, make_records(lm.tokenizer, args.train, args.tokens, "t", 0),
                    make_records(lm.tokenizer, 8, args.tokens, "p", 1))
    exact = dynamics_exact(lm, inp, scope="body")
    out = {"model": args.model, "n_train": args.train, "tokens": args.tokens, "seeds": args.seeds, "errors": {}}
    for name in args.methods.split(","):
        errs = [relative_error(METHODS[name](lm, inp, s), exact)["rel_fro"] for s in range(args.seeds)]
        out["errors"][name] = errs
        print(f"{name:20s} mean {statistics.mean(errs):.4f}  min {min(errs):.4f}  max {max(errs):.4f}  "
              f"draws {' '.join(f'{e:.4f}' for e in errs)}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

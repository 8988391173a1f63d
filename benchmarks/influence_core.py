"""Speed of ``dynamics influence`` against its floor, measured in one run on the same inputs.

The floor is one standard batched forward+backward over the same samples (loss over all completion tokens,
``.backward()`` into weight gradients): the kernel needs each sample's activations and output gradients and
nothing more. Targets (issue 4): the whole CLI run, model load included, within 1.25x of that floor on the
default model with 64 training samples x 16 probes of about 64 tokens (exact ``linear`` scope), and at least 2x
faster than the naive loop (one backward per sample, flatten, dot).

    python -m benchmarks.influence_core [--model default] [--train 64] [--probes 16] [--tokens 64] [--json out.json]

Prints the time of each method, its ratio to the floor, peak memory, and the time split of the CLI run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dynamics.data import collate, encode_record, write_records
from dynamics.gradients import scope_parameters
from dynamics.influence import InfluenceConfig, compute
from dynamics.models import load_model

WORDS = ["river", "stone", "light", "garden", "winter", "paper", "window", "music", "number", "travel", "morning", "silver", "forest", "market", "letter", "bridge", "animal", "doctor", "planet", "yellow"]


def make_records(tokenizer, n: int, tokens: int, prefix: str, seed: int) -> list[dict]:
    """n records of about ``tokens`` tokens each (a quarter of them completion)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        def text(k: int) -> str:
            words = []
            while len(tokenizer(" ".join(words))["input_ids"]) < k:
                words.append(rng.choice(WORDS))
            return " ".join(words)

        comp = max(4, tokens // 4)
        out.append({"id": f"{prefix}{i}", "prompt": text(tokens - comp - 12), "completion": text(comp)})
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def standard_forward_backward(lm, records: list[dict], batch_size: int) -> float:
    """The floor: batched forward+backward, loss over every completion token, weight gradients formed."""
    model = lm.model
    model.zero_grad(set_to_none=True)
    enc = [encode_record(lm.tokenizer, r) for r in records]
    t0 = time.perf_counter()
    for i in range(0, len(enc), batch_size):
        b = {k: v.to(model.device) for k, v in collate(enc[i:i + batch_size], lm.tokenizer.pad_token_id).items()}
        labels = b["input_ids"].masked_fill(b["completion_mask"] == 0, -100)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels)
        out.loss.backward()
    elapsed = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return elapsed


def naive_loop(lm, train: list[dict], probes: list[dict], scope: str = "linear") -> tuple[float, torch.Tensor]:
    """One backward per sample, flatten, dot (probe gradients kept, train gradients streamed)."""
    model = lm.model
    params = list(scope_parameters(model, scope).values())

    def flat_grad(rec: dict) -> torch.Tensor:
        b = {k: v.to(model.device) for k, v in collate([encode_record(lm.tokenizer, rec)], lm.tokenizer.pad_token_id).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, b["input_ids"][:, 1:, None])[..., 0]
        obj = (logp * b["completion_mask"][:, 1:]).sum()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(obj, params)])

    t0 = time.perf_counter()
    G_p = torch.stack([flat_grad(p) for p in probes])
    K = torch.stack([G_p @ flat_grad(t) for t in train])
    return time.perf_counter() - t0, K


def cli_run(spec: str, train_path: Path, probe_path: Path, out: Path, batch_size: int) -> tuple[float, dict]:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "dynamics.cli", "influence", "--ckpt", spec, "--train", str(train_path),
                          "--probes", str(probe_path), "--out", str(out), "--target", "gold",
                          "--batch-size", str(batch_size)], capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(res.stderr)
    return elapsed, json.loads((out / "manifest.json").read_text())["timings_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--train", type=int, default=64)
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    lm = load_model(args.model)
    train = make_records(lm.tokenizer, args.train, args.tokens, "t", 0)
    probes = make_records(lm.tokenizer, args.probes, args.tokens, "p", 1)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_records(tmp / "train.jsonl", train)
        write_records(tmp / "probes.jsonl", probes)
        floor = standard_forward_backward(lm, train + probes, args.batch_size)
        results["standard forward+backward (floor)"] = {"seconds": floor}
        t0 = time.perf_counter()
        df = compute(lm, train, probes, InfluenceConfig(batch_size=args.batch_size, target="gold"))
        results["dynamics exact linear (in process)"] = {"seconds": time.perf_counter() - t0}
        for scope in ("all",):
            t0 = time.perf_counter()
            compute(lm, train, probes, InfluenceConfig(params=scope, batch_size=args.batch_size, target="gold"))
            results[f"dynamics exact {scope} (in process)"] = {"seconds": time.perf_counter() - t0}
        t0 = time.perf_counter()
        compute(lm, train, probes, InfluenceConfig(mode="projected", batch_size=args.batch_size, target="gold"))
        results["dynamics projected kron k=1024 (in process)"] = {"seconds": time.perf_counter() - t0}
        cli_s, split = cli_run(args.model, tmp / "train.jsonl", tmp / "probes.jsonl", tmp / "out", args.batch_size)
        results["dynamics exact linear (CLI, end to end)"] = {"seconds": cli_s, "split": split}
        if not args.skip_naive:
            naive_s, K_naive = naive_loop(lm, train, probes)
            K = torch.tensor(df["kernel"].to_numpy()).reshape(len(train), len(probes))
            err = float((K - K_naive.double()).abs().max() / K_naive.abs().max())
            results["naive loop (per-sample backward, flatten, dot)"] = {"seconds": naive_s, "max_rel_err": err}
    print(f"model={args.model} train={args.train} probes={args.probes} tokens~{args.tokens} "
          f"threads={torch.get_num_threads()} cpus={os.cpu_count()}")
    print(f"{'method':52s} {'seconds':>9s} {'x floor':>8s}")
    for name, r in results.items():
        r["ratio_to_floor"] = r["seconds"] / floor
        print(f"{name:52s} {r['seconds']:9.2f} {r['ratio_to_floor']:8.2f}" + (f"   split {r['split']}" if "split"
                                                                                 in r else ""))
    if "naive loop (per-sample backward, flatten, dot)" in results:
        speedup = results["naive loop (per-sample backward, flatten, dot)"]["seconds"] / results[
            "dynamics exact linear (CLI, end to end)"]["seconds"]
        print(f"CLI end to end is {speedup:.2f}x faster than the naive loop")
    print(f"peak RSS of this process: {peak_rss_mb():.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

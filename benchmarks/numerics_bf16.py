"""Error of bf16 against fp32 on the default model (docs/numerics.md): influence with ``--dtype bfloat16``
(bf16 weights and activations, products accumulated in fp32, and with ``--products model`` in bf16) and one SFT loss/gradient under bf16 autocast
(what ``train --bf16`` does; weights stay fp32).

    .venv/bin/python -m benchmarks.numerics_bf16 [--n 6] [--out benchmarks/results/numerics_bf16.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dynamics.data import collate, encode_record
from dynamics.influence import InfluenceConfig, compute
from dynamics.models import load_model
from dynamics.probes import load_probes
from dynamics.store import versions, write_json
from dynamics.tasks import get_task


def rel(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Relative errors of ``a`` against the reference ``b``: of the whole (Frobenius) and the worst entry."""
    a, b = a.double().flatten(), b.double().flatten()
    return {"rel_fro": float((a - b).norm() / b.norm()),
            "rel_max": float(((a - b).abs() / b.abs().clamp(min=1e-12)).max()),
            "abs_max": float((a - b).abs().max())}


def influence_error(train: list[dict], probes: list[dict]) -> dict:
    """The bf16 kernels (products in fp32, and in bf16 with ``products="model"``) against the fp32 one."""
    runs = {"float32": ("float32", "float32"), "bfloat16": ("bfloat16", "float32"),
            "bfloat16_model_products": ("bfloat16", "model")}
    tables, secs, models = {}, {}, {}
    for name, (dtype, products) in runs.items():
        lm = models.setdefault(dtype, load_model("default", dtype=dtype))
        t0 = time.perf_counter()
        tables[name] = compute(lm, train, probes, InfluenceConfig(dtype=dtype, products=products, target="gold",
                                                                  batch_size=4))
        secs[name] = round(time.perf_counter() - t0, 2)
    ref = tables["float32"]
    out = {}
    for name in ("bfloat16", "bfloat16_model_products"):
        low = tables[name]
        err = {col: rel(torch.tensor(low[col].to_numpy()), torch.tensor(ref[col].to_numpy()))
               for col in ("kernel", "train_norm", "probe_norm")}
        cos_ref, cos_low = torch.tensor(ref["cosine"].to_numpy()), torch.tensor(low["cosine"].to_numpy())
        err["cosine"] = {"abs_max": float((cos_low - cos_ref).abs().max()),
                         "abs_mean": float((cos_low - cos_ref).abs().mean()),
                         "range_fp32": [float(cos_ref.min()), float(cos_ref.max())]}
        err["kernel_sign_agreement"] = float((torch.tensor(low["kernel"].to_numpy()).sign()
                                              == torch.tensor(ref["kernel"].to_numpy()).sign()).double().mean())
        out[name] = err
    out["seconds"] = secs
    return out


def sft_step_error(records: list[dict]) -> dict:
    """Loss (mean completion NLL) and its gradient for one batch, bf16 autocast vs fp32."""
    lm = load_model("default")
    batch = collate([encode_record(lm.processing_class, r) for r in records], lm.tokenizer.pad_token_id)
    labels = batch["input_ids"].masked_fill(batch.pop("completion_mask") == 0, -100)
    res = {}
    for name, enabled in (("float32", False), ("bfloat16", True)):
        lm.model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss = lm.model(**batch, labels=labels).loss
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in lm.model.parameters() if p.grad is not None])
        res[name] = (loss.detach().double(), grad.double())
    (l32, g32), (l16, g16) = res["float32"], res["bfloat16"]
    return {"loss_fp32": float(l32), "loss_bf16": float(l16), "loss_rel": float((l16 - l32).abs() / l32.abs()),
            "grad": rel(g16, g32),
            "grad_cosine": float(g16 @ g32 / (g16.norm() * g32.norm()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6, help="training samples and probes each")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/numerics_bf16.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train = get_task("jigsaw", preset="text").build(args.n, 0)
    probes = load_probes("text")[:: max(1, len(load_probes("text")) // args.n)][: args.n]
    result = {"model": "default", "n_train": len(train), "n_probes": len(probes),
              "influence": influence_error(train, probes), "sft_step": sft_step_error(train),
              "avx512_bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text(),
              "versions": versions()}
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "versions"}, indent=2))


if __name__ == "__main__":
    main()

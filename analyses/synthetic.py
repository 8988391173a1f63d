"""A synthetic study folder with known effects, written in the exact on-disk formats of DESIGN.md: for the
tests of every recipe, and to try ``dynamics figures`` without training anything.

Three data sources -- ``sft`` (gold answers), ``rft`` (GRPO rollouts with rewards and advantages) and
``sft-rollouts`` (correct rollouts) -- with the study's effects built in by the parameters of
:class:`Effects`: learning curves ``a(s) = final·(1 − exp(−s/τ))``, forgetting ``drop·(1 − exp(−s/τ_f))``,
gradient norms ``‖g(u)‖ ~ LogNormal(log norm, 0.3)``, cosines ``~ Normal(cosine, 0.05)``, and base-model log p
per token decreasing in log ‖g(u)‖.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dynamics.data import write_records
from dynamics.store import append_jsonl, atomic_path, make_folder, write_json

CATEGORIES = ("facts", "arithmetic", "commonsense")


@dataclass(frozen=True)
class Source:
    task_final: float  # novel-task accuracy reached
    task_tau: float  # steps to reach 63% of it
    probe_drop: float  # probe accuracy lost by the end
    logp_drop: float  # nats/token of base-response log p lost by the end
    norm: float  # median training-gradient norm
    cosine: float  # mean cosine with probe gradients
    logp: float  # mean log p per token of the data under the base model


@dataclass(frozen=True)
class Effects:
    sources: dict[str, Source] = field(default_factory=lambda: {
        "sft": Source(0.9, 8.0, 0.5, 1.0, 20.0, -0.03, -1.6),
        "rft": Source(0.5, 40.0, 0.02, 0.05, 8.0, 0.03, -0.4),
        "sft-rollouts": Source(0.85, 10.0, 0.1, 0.2, 9.0, 0.02, -0.5)})
    hurt_category: str = "facts"  # forgotten twice as fast as the others
    positive_norm_factor: float = 0.6  # rollouts with positive advantage have smaller gradients
    forget_tau: float = 15.0


def _records(n: int, prefix: str, rng: np.random.Generator, rollouts: bool) -> list[dict]:
    recs = []
    for i in range(n):
        order = rng.permutation(3) + 1
        rec = {"id": f"{prefix}{i}", "prompt": [{"role": "user", "content": f"Order the pieces of puzzle {i}."}],
               "completion": [{"role": "assistant", "content": " ".join(map(str, order)) * int(rng.integers(1, 4))}],
               "answer": " ".join(map(str, order)), "meta": {"category": "jigsaw"}}
        if rollouts:
            reward = float(rng.choice([0.0, 0.7, 3.0]))
            rec.update(reward=reward, advantage=0.0, step=int(i // 8))
        recs.append(rec)
    if rollouts:  # GRPO advantages: reward minus the mean of its group of 8
        for g in range(0, n, 8):
            grp = recs[g:g + 8]
            mean = np.mean([r["reward"] for r in grp])
            for r in grp:
                r["advantage"] = float(r["reward"] - mean)
    return recs


def write_study(root: str | Path, *, seed: int = 0, n_seeds: int = 1, n_train: int = 40, n_probes: int = 30,
                n_task: int = 50, steps: tuple[int, ...] = (0, 10, 20, 30, 40, 50),
                effects: Effects | None = None, compare: bool = True) -> Path:
    """Write ``probes.jsonl``, ``data/``, ``runs/``, ``influence/`` and ``compare/`` under ``root``."""
    from dynamics.analyses.compare import write_outputs

    eff = effects or Effects()
    rng = np.random.default_rng(seed)
    root = Path(root)
    probes = [{"id": f"p{i}", "prompt": f"Question {i}?", "completion": f"Answer {i}.", "answer": f"{i}",
               "meta": {"category": CATEGORIES[i % len(CATEGORIES)], "base_response": f"It is {i}."}}
              for i in range(n_probes)]
    write_records(root / "probes.jsonl", probes)
    cats = np.array([p["meta"]["category"] for p in probes])
    hurt = np.where(cats == eff.hurt_category, 2.0, 1.0)
    s = np.asarray(steps, float)
    for label, src in eff.sources.items():
        recs = _records(n_train, f"{label}-", rng, rollouts=label == "rft")
        write_records(root / "data" / f"{label}.jsonl", recs)
        for k in range(n_seeds):
            run = root / "runs" / (label if n_seeds == 1 else f"{label}-seed{k}")
            make_folder(run)
            # items are learned (forgotten) once a fixed per-item threshold is crossed, as a real model does
            p_task = src.task_final * (1 - np.exp(-s / src.task_tau))
            task = (rng.random(n_task)[:, None] < p_task[None, :]).astype(float)
            lost = hurt[:, None] * (1 - np.exp(-s / eff.forget_tau))[None, :]
            probe = (rng.random(n_probes)[:, None] >= np.clip(src.probe_drop * lost, 0, 1)).astype(float)
            logp = (-0.5 + 0.1 * rng.standard_normal(n_probes))[:, None] - src.logp_drop * lost
            logp = logp + 0.02 * rng.standard_normal(logp.shape)
            gold = np.full_like(logp, -1.2) + 0.01 * rng.standard_normal(logp.shape)
            items = []
            for j, step in enumerate(steps):
                items += [{"model": label, "step": step, "item_id": f"t{i}", "kind": "task", "category": "jigsaw",
                           "correct": task[i, j], "logp_sum": -3.0, "logp_mean": -1.0} for i in range(n_task)]
                items += [{"model": label, "step": step, "item_id": p["id"], "kind": "probe",
                           "category": cats[i], "correct": probe[i, j], "logp_sum": 5 * logp[i, j],
                           "logp_mean": logp[i, j], "logp_gold_mean": gold[i, j]} for i, p in enumerate(probes)]
                row = {"step": step, "task_accuracy": task[:, j].mean(), "task_reward": 3 * task[:, j].mean(),
                       "probe_accuracy": probe[:, j].mean(), "probe_logp": gold[:, j].mean(),
                       "probe_logp_base": logp[:, j].mean()}
                for c in CATEGORIES:
                    row[f"probe_accuracy/{c}"] = probe[cats == c, j].mean()
                    row[f"probe_logp_base/{c}"] = logp[cats == c, j].mean()
                append_jsonl(run / "eval.jsonl", {k2: float(v) if k2 != "step" else int(v) for k2, v in row.items()})
            with atomic_path(run / "eval.parquet") as tmp:
                pd.DataFrame(items).to_parquet(tmp, index=False)
            for step in range(1, int(s[-1]) + 1):
                row = {"step": step, "loss": float(1.5 * np.exp(-step / 20) + 0.05 * rng.random()), "lr": 1e-5,
                       "grad_norm": float(5 + rng.random())}
                if label == "rft":
                    row.update(reward_mean=float(3 * src.task_final * (1 - np.exp(-step / src.task_tau))),
                               reward_std=0.5, kl=0.001 * step)
                append_jsonl(run / "metrics.jsonl", row)
            write_json(run / "manifest.json", {"command": f"train {label}", "base_model": "tiny-llama"})
            if label == "rft":
                write_records(run / "rollouts.jsonl", recs)
        _write_influence(root, label, src, recs, probes, eff, steps, rng)
    if compare:
        _write_compare(root, eff, rng, write_outputs)
    return root


def _write_influence(root: Path, label: str, src: Source, recs: list[dict], probes: list[dict], eff: Effects,
                     steps: tuple[int, ...], rng: np.random.Generator) -> None:
    out = root / "influence" / label
    probe_norm = np.exp(np.log(15.0) + 0.2 * rng.standard_normal(len(probes)))
    rows = []
    for step in (steps[0], steps[-1]):
        for r in recs:
            factor = eff.positive_norm_factor if r.get("advantage", 0) > 0 else 1.0
            tn = float(np.exp(np.log(src.norm * factor) + 0.3 * rng.standard_normal()))
            cos = src.cosine + 0.05 * rng.standard_normal(len(probes))
            for p, pn, c in zip(probes, probe_norm, cos, strict=True):
                rows.append({"ckpt": f"checkpoint-{step}", "step": step, "train_id": r["id"], "probe_id": p["id"],
                             "kernel": float(c * tn * pn), "cosine": float(c), "train_norm": tn,
                             "probe_norm": float(pn)})
    with atomic_path(out / "influence.parquet") as tmp:
        pd.DataFrame(rows).to_parquet(tmp, index=False)
    write_json(out / "manifest.json", {"format": 1, "command": "influence",
                                       "train": str((root / "data" / f"{label}.jsonl").resolve()),
                                       "probes": str((root / "probes.jsonl").resolve())})


def _write_compare(root: Path, eff: Effects, rng: np.random.Generator, write_outputs) -> None:
    from dynamics.analyses.compare import prompt_key
    from dynamics.analyses.loader import InfluenceSet

    frames = []
    for label, src in eff.sources.items():
        inf = InfluenceSet(label, root / "influence" / label)
        keys = {r["id"]: prompt_key(r) for r in inf.train_records}
        per = inf.per_sample
        per = per[per["step"] == per["step"].min()]
        z = np.log(per["train_norm"].to_numpy() / src.norm)
        logp = np.minimum(src.logp - 0.5 * z + 0.05 * rng.standard_normal(len(per)), -0.01)
        n_tokens = rng.integers(4, 12, len(per))
        frames.append(pd.DataFrame({"label": label, "id": per["train_id"].to_numpy(),
                                    "prompt_key": per["train_id"].map(keys).to_numpy(), "n_chars": 3 * n_tokens,
                                    "n_tokens": n_tokens, "logp_sum": logp * n_tokens, "logp_mean": logp,
                                    "ppl": np.exp(-logp), "influence_step": per["step"].to_numpy(),
                                    **{c: per[c].to_numpy() for c in ("train_norm", "mean_abs_kernel",
                                                                      "mean_kernel", "mean_cosine",
                                                                      "frac_negative")}}))
    write_outputs(root / "compare", pd.concat(frames, ignore_index=True), n_resamples=200, figure=False)

"""Rollouts as records: RFT-simulated sampling, rollouts logged by an RFT run, and the "keep correct" filter.

A rollout is a record (``dynamics.data`` format) whose completion is the model's own sample::

    {"id": "<prompt id>:s<step>:<k>", "prompt": [...], "completion": [{"role": "assistant", "content": text}],
     "images": [...]?, "answer": "...", "reward": r, "advantage": A?, "step": s?,
     "meta": {...prompt meta, "prompt_id": ..., "sample": k, "score": {accuracy, hit, format, total}}}

``reward`` is the task's total reward (hit + accuracy + format). Sampled rollouts get the group-normalised
advantage GRPO would give them, ``A_k = (r_k - mean(r)) / (std(r) + 1e-4)`` over the K samples of a prompt, so
sampled and RFT-logged rollouts can be analysed alike. ``keep="correct"`` keeps the rollouts with
``score.accuracy == 1``: the study's "SFT on RFT-simulated rollouts" data.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dynamics.data import image_digests, naming_records, read_records, record_line, write_records
from dynamics.errors import DynamicsError, check_bounds
from dynamics.store import check_file, read_jsonl_rows, text_hash, write_jsonl

KEEP = ("all", "correct")


@dataclass
class RolloutsConfig:
    """``dynamics rollouts``: sample K completions per prompt and score them, or extract an RFT run's rollouts."""

    out: str | None = field(default=None, metadata={"help": "Output records file (.jsonl or .parquet)."})
    model: str = "default"
    task: str = "jigsaw"
    task_args: str = ""
    data: str | None = field(default=None, metadata={"help": "Prompt records with answers (else built by the task)."})
    n_prompts: int = 64
    prompts_seed: int = 0
    samples: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = field(default=None, metadata={"help": "Default: the task's generation budget."})
    seed: int = 0
    batch_size: int = 16
    bf16: bool = field(default=False, metadata={"help": "Sample under bf16 autocast (as RFT does with --bf16)."})
    keep: str = "all"
    shard_size: int = field(default=64, metadata={"help": "Prompts per resumable shard (shard k samples with "
                                                  "seed + k)."})
    resume: bool = field(default=False, metadata={"help": "Keep the finished shards of an interrupted run."})
    from_run: str | None = field(default=None, metadata={"help": "Extract the rollouts an RFT run logged."})
    steps: str | None = field(default=None, metadata={"help": "Step range A:B (inclusive; either end optional)."})

    def __post_init__(self) -> None:
        if self.keep not in KEEP:
            raise DynamicsError(f"keep must be one of {', '.join(KEEP)}", field="keep")
        check_bounds(self, {"samples": 1, "shard_size": 1, "n_prompts": 1, "batch_size": 1, "max_new_tokens": 1,
                            "temperature": 0}, above={"top_p": 0})  # temperature 0: greedy
        if self.top_p > 1:
            raise DynamicsError(f"top_p must be <= 1, got {self.top_p}", field="top_p")
        if self.steps is not None:
            step_range(self.steps)


def step_range(spec: str | None) -> tuple[int, int]:
    """``"A:B"`` -> (A, B) inclusive; a missing end is open; a single number is one step."""
    if not spec:
        return 0, 2**62
    lo, sep, hi = spec.partition(":")
    try:
        a = int(lo) if lo.strip() else 0
        b = (int(hi) if hi.strip() else 2**62) if sep else a
    except ValueError:
        raise DynamicsError(f"bad step range {spec!r}: use A:B, A:, :B or A", field="steps") from None
    return a, b


def rollout_record(source: dict, text: str, score: dict, reward: float, *, rid: str, sample: int,
                   advantage: float | None = None, step: int | None = None, meta: dict | None = None) -> dict:
    """A rollout of ``source``'s prompt as a record (see the module docstring)."""
    rec: dict[str, Any] = {"id": rid, "prompt": source["prompt"],
                           "completion": [{"role": "assistant", "content": text}]}
    if source.get("images"):
        rec["images"] = source["images"]
    rec["answer"] = source.get("answer")
    rec["reward"] = float(reward)
    if advantage is not None:
        rec["advantage"] = float(advantage)
    if step is not None:
        rec["step"] = int(step)
    rec["meta"] = {**source.get("meta", {}), "prompt_id": source["id"], "sample": sample,
                   "score": {k: float(v) for k, v in score.items()}, **(meta or {})}
    return rec


def group_advantages(rewards: Sequence[float], group: int) -> list[float]:
    """GRPO's advantages: rewards centred and scaled within consecutive groups of ``group`` samples."""
    r = torch.tensor(rewards, dtype=torch.float64).view(-1, group)
    std = r.std(dim=1, keepdim=True) if group > 1 else torch.zeros_like(r[:, :1])
    return ((r - r.mean(dim=1, keepdim=True)) / (std + 1e-4)).flatten().tolist()


def keep_rollouts(rows: Sequence[dict], keep: str = "all") -> list[dict]:
    """All rollouts, or (``correct``) those whose completion is right: ``meta.score.accuracy == 1``."""
    if keep == "all":
        return list(rows)
    return [r for r in rows if r.get("meta", {}).get("score", {}).get("accuracy") == 1.0]


def prompt_records(task: Any, data: str | os.PathLike | None, n: int, seed: int) -> list[dict]:
    """Prompt records with answers: read from ``data`` or built by the task."""
    records = read_records(data, require_completion=False) if data else task.build(n, seed)
    for rec in records:
        if rec.get("answer") is None:
            raise DynamicsError("rollouts are scored against the record's answer", file=data,
                                line=record_line(data, rec["id"]) if data else None, field="answer")
    return records


def sample_rollouts(lm: Any, task: Any, records: Sequence[dict], *, samples: int, temperature: float,
                    top_p: float = 1.0, max_new_tokens: int | None = None, seed: int = 0,
                    batch_size: int = 16, bf16: bool = False, progress: bool = True) -> list[dict]:
    """Sample ``samples`` completions per prompt with :func:`dynamics.generation.generate` (under bf16
    autocast if ``bf16``), score each with ``task.score``, and return them all as rollout records (in prompt
    order, samples consecutive)."""
    from dynamics.generation import generate

    device = next(lm.model.parameters()).device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        texts = generate(lm, records, max_new_tokens=max_new_tokens or task.max_new_tokens,
                         temperature=temperature, top_p=top_p, num_samples=samples, batch_size=batch_size,
                         seed=seed, progress=progress)
    k = len(texts[0]) if texts else samples
    scores = [task.score(t, rec["answer"]) for rec, ts in zip(records, texts, strict=True) for t in ts]
    advantages = group_advantages([s["total"] for s in scores], k)
    rows = []
    for i, (rec, ts) in enumerate(zip(records, texts, strict=True)):
        for j, text in enumerate(ts):
            s = scores[i * k + j]
            rows.append(rollout_record(rec, text, s, s["total"], rid=f"{rec['id']}:{j}", sample=j,
                                       advantage=advantages[i * k + j],
                                       meta={"temperature": temperature, "model": lm.name}))
    return rows


def rollouts_from_run(run: str | os.PathLike, steps: str | None = None) -> list[dict]:
    """The rollouts an RFT run logged to ``RUN/rollouts.jsonl``, optionally within a step range."""
    path = Path(run) / "rollouts.jsonl"
    if not path.is_file():
        raise DynamicsError("no rollouts.jsonl: not an RFT run folder", file=run, field="from_run")
    lo, hi = step_range(steps)
    return [r for r in read_jsonl_rows(path) if lo <= r.get("step", 0) <= hi]


def shards_dir(out: str | os.PathLike) -> Path:
    """Where ``dynamics rollouts`` keeps its finished shards until the output is written: ``.OUT.shards/``."""
    out = Path(out)
    return out.parent / f".{out.name}.shards"


def sample_in_shards(config: RolloutsConfig, task: Any, records: Sequence[dict]) -> list[dict]:
    """:func:`sample_rollouts` over blocks of ``shard_size`` prompts (block k with seed ``seed + k``), each
    block written atomically to :func:`shards_dir`; with ``resume``, blocks already written under the same
    configuration, prompts and model weights are read back instead of sampled again, so the result equals an
    uninterrupted run's."""
    from dynamics.generation import encode_prompts
    from dynamics.models import BF16_EMULATED, fingerprint, load_model, native_bf16

    folder = shards_dir(config.out)
    opts = {k: v for k, v in asdict(config).items() if k not in ("out", "resume", "keep", "batch_size")}
    prompts = [[r["id"], r["prompt"], r.get("answer"), r.get("images")] for r in records]
    key = text_hash(json.dumps([opts, fingerprint(config.model), prompts, image_digests(records)], sort_keys=True,
                               default=str), 12)
    if not config.resume:
        shutil.rmtree(folder, ignore_errors=True)
    lm, rows = None, []
    for k, start in enumerate(range(0, len(records), config.shard_size)):
        path = folder / f"{key}-{k:05d}.jsonl"
        if path.is_file():
            rows += read_jsonl_rows(path)
            continue
        if lm is None:
            lm = load_model(config.model)
            with naming_records(config.data):  # every prompt leaves the tokens to generate free, before any is sampled
                encode_prompts(lm, records, config.max_new_tokens or task.max_new_tokens)
            if config.bf16 and not native_bf16("cpu"):
                print(f"{config.out}: {BF16_EMULATED}: without --bf16 it samples faster", file=sys.stderr)
        block = sample_rollouts(lm, task, records[start:start + config.shard_size], samples=config.samples,
                                temperature=config.temperature, top_p=config.top_p,
                                max_new_tokens=config.max_new_tokens, seed=config.seed + k,
                                batch_size=config.batch_size, bf16=config.bf16)
        write_jsonl(path, block)
        rows += block
    return rows


def make_rollouts(config: RolloutsConfig) -> tuple[Path, dict]:
    """``dynamics rollouts``: sample (or extract), filter by ``keep``, write ``config.out``; return the path
    and a summary (counts, mean reward and accuracy of everything sampled)."""
    if not config.out:
        raise DynamicsError("no output file given", field="out")
    check_file(config.out)  # before the sampling, which can take hours
    if config.from_run:
        rows = rollouts_from_run(config.from_run, config.steps)
    else:
        from dynamics.tasks import get_task, parse_task_args

        task = get_task(config.task, **parse_task_args(config.task_args))
        records = prompt_records(task, config.data, config.n_prompts, config.prompts_seed)
        rows = sample_in_shards(config, task, records)
    kept = keep_rollouts(rows, config.keep)
    if not kept:
        raise DynamicsError(f"no rollouts to write ({len(rows)} sampled, none kept by keep={config.keep})",
                            field="keep")
    out = write_records(config.out, kept)
    if not config.from_run:
        shutil.rmtree(shards_dir(config.out), ignore_errors=True)
    acc = [r["meta"]["score"]["accuracy"] for r in rows if "score" in r.get("meta", {})]
    summary = {"rollouts": len(rows), "kept": len(kept), "prompts": len({r["meta"]["prompt_id"] for r in rows}),
               "reward_mean": sum(r["reward"] for r in rows) / len(rows),
               "accuracy": sum(acc) / len(acc) if acc else None}
    return out, summary

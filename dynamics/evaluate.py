"""Evaluation: novel-task accuracy and prior-knowledge accuracy / log p for a model, a checkpoint or a run.

:func:`evaluate_model` returns one row per item in the ``eval.parquet`` format::

    model, step, item_id, kind ("task" | "probe"), category, correct, logp_sum, logp_mean,
    reward, hit, format, response, logp_base_sum, logp_base_mean

Task items are answered greedily and scored by the task that built them (``meta.task`` / ``meta.task_args``,
see :func:`dynamics.tasks.task_of_record`); ``logp_*`` is the log p of their gold completion. Probe items are
scored by :func:`dynamics.probes.score_probes`. :func:`summarise` reduces such rows to one ``eval.jsonl`` row;
:func:`run_eval` evaluates every checkpoint of a run folder in step order, writing ``OUT/eval.parquet`` after
each (an interrupted evaluation resumes where it stopped) and ``OUT/summary.jsonl``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from dynamics.errors import DynamicsError, check_bounds
from dynamics.models import LoadedModel
from dynamics.store import atomic_path, removed_on_error, text_hash, versions, write_json, write_jsonl

if TYPE_CHECKING:
    from dynamics.data import Encoded

COLUMNS = ["model", "step", "item_id", "kind", "category", "correct", "logp_sum", "logp_mean", "reward", "hit",
           "format", "response", "logp_base_sum", "logp_base_mean"]
FORMAT = 1


@dataclass
class EvalConfig:
    """What to evaluate on and how. ``task`` / ``task_args`` / ``n_task`` / ``task_seed`` build task records
    when none are given (``task_data`` reads them from a file instead, and ``task`` scores those of its records
    that name no ``meta.task``); ``probes`` is ``text``, ``visual`` or a records file (default: the built-in
    suite for the model's kind)."""

    task: str | None = "jigsaw"
    task_args: str = ""
    task_data: str | None = None
    n_task: int = 50
    task_seed: int = 1234  # distinct from the training default (0) so evaluation puzzles are unseen
    probes: str | None = None
    max_new_tokens: int | None = None  # task generation budget (default: the task's)
    probe_max_new_tokens: int = 48
    batch_size: int = 16
    logp_batch_size: int = 8
    dtype: str = "float32"
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        check_bounds(self, {"max_new_tokens": 1, "probe_max_new_tokens": 1, "batch_size": 1, "logp_batch_size": 1})


def _task_groups(records: Sequence[dict], config: EvalConfig) -> list[tuple[Any, list[int], int]]:
    """The records grouped by the task that scores them (``meta.task`` / ``meta.task_args``, else
    ``config.task``): ``(task, indices, generation budget)``."""
    from dynamics.tasks import get_task, task_of_record

    tasks: dict[tuple, Any] = {}
    groups: dict[tuple, list[int]] = {}
    for i, rec in enumerate(records):
        meta = rec.get("meta") or {}
        key = (meta.get("task"), meta.get("task_args"))
        if key not in tasks:
            task = task_of_record(rec)
            if task is None:
                if config.task is None:
                    raise DynamicsError("the record names no task to score it and none is given "
                                        "(eval --task, train --eval-task)", field=f"meta.task (record {rec['id']})")
                task = get_task(config.task, **_args(config))
            tasks[key] = task
        groups.setdefault(key, []).append(i)
    return [(tasks[key], idx, config.max_new_tokens or tasks[key].max_new_tokens) for key, idx in groups.items()]


def _encode_tasks(lm: LoadedModel, records: Sequence[dict], groups: list[tuple[Any, list[int], int]]) -> list[Encoded]:
    """Each record with its completion, its prompt leaving its task's generation budget free."""
    from dynamics.generation import encode_scored

    by_index: dict[int, Encoded] = {}
    for _, idx, budget in groups:
        by_index.update(zip(idx, encode_scored(lm, [records[i] for i in idx], budget), strict=True))
    return [by_index[i] for i in range(len(records))]


def _task_rows(lm: LoadedModel, records: Sequence[dict], groups: list[tuple[Any, list[int], int]],
               encoded: list[Encoded], config: EvalConfig) -> pd.DataFrame:
    from dynamics.generation import generate
    from dynamics.probes import completion_logprobs

    responses: list[str] = [""] * len(records)
    scores: list[dict] = [{}] * len(records)
    for task, idx, budget in groups:
        outs = generate(lm, [records[i] for i in idx], max_new_tokens=budget, batch_size=config.batch_size,
                        progress=config.progress, prompts=[encoded[i].prompt() for i in idx])
        for i, out in zip(idx, outs, strict=True):
            responses[i] = out[0]
            scores[i] = task.score(out[0], records[i].get("answer", ""))
    logp = completion_logprobs(lm, records, batch_size=config.logp_batch_size, encoded=encoded)
    return pd.DataFrame({
        "item_id": [r["id"] for r in records], "kind": "task",
        "category": [str((r.get("meta") or {}).get("category", "task")) for r in records],
        "correct": [s["accuracy"] == 1.0 for s in scores], "logp_sum": logp["logp_sum"],
        "logp_mean": logp["logp_mean"], "reward": [s["total"] for s in scores], "hit": [s["hit"] for s in scores],
        "format": [s["format"] for s in scores], "response": responses,
    })


def _args(config: EvalConfig) -> dict[str, Any]:
    from dynamics.tasks import parse_task_args

    return parse_task_args(config.task_args)


def evaluate_model(
    lm: LoadedModel,
    task_records: Sequence[dict],
    probes: Sequence[dict],
    config: EvalConfig,
    step: int = 0,
    model_name: str = "",
) -> pd.DataFrame:
    """Rows in the ``eval.parquet`` format for one model: greedy task answers and probe scores."""
    from dynamics.data import naming_records
    from dynamics.probes import probe_inputs, score_probes

    # every sequence is encoded, and so checked against the context, before anything is generated
    with naming_records(config.task_data):
        groups = _task_groups(task_records, config)
        task_encoded = _encode_tasks(lm, task_records, groups)
    with naming_records(config.probes):
        probe_encoded = probe_inputs(lm, probes, config.probe_max_new_tokens)
    parts = []
    if task_records:
        with naming_records(config.task_data):
            parts.append(_task_rows(lm, task_records, groups, task_encoded, config))
    if probes:
        with naming_records(config.probes):
            df = score_probes(lm, probes, max_new_tokens=config.probe_max_new_tokens, batch_size=config.batch_size,
                              logp_batch_size=config.logp_batch_size, progress=config.progress, inputs=probe_encoded)
            parts.append(df.drop(columns=["n_tokens"]).rename(columns={"id": "item_id"}).assign(kind="probe"))
    if not parts:
        raise DynamicsError("nothing to evaluate: no task records and no probes", field="task")
    out = pd.concat(parts, ignore_index=True)
    out.insert(0, "model", model_name or lm.name)
    out.insert(1, "step", int(step))
    return out.reindex(columns=COLUMNS)


def _mean(series: pd.Series) -> float | None:
    series = series.dropna()
    return float(series.astype(float).mean()) if len(series) else None


def summarise(df: pd.DataFrame) -> dict[str, Any]:
    """One ``eval.jsonl`` row: ``task_accuracy, task_reward, probe_accuracy``, ``probe_logp`` (the per-token log p
    of the gold completions, averaged over probes), ``probe_logp_base`` (the same for the base model's own
    responses, when stored: the continuous measure of retained knowledge), the summed versions
    ``probe_logp_sum`` / ``probe_logp_base_sum``, and per category ``probe_accuracy/<category>``,
    ``probe_logp/<category>``, ``probe_logp_base/<category>`` (``task_accuracy/<category>`` for tasks)."""
    out: dict[str, Any] = {}
    task, probe = df[df["kind"] == "task"], df[df["kind"] == "probe"]
    if len(task):
        out["task_accuracy"] = _mean(task["correct"])
        out["task_reward"] = _mean(task["reward"])
        out["task_hit"] = _mean(task["hit"])
        out["task_format"] = _mean(task["format"])
        out["task_logp"] = _mean(task["logp_mean"])
    if len(probe):
        out["probe_accuracy"] = _mean(probe["correct"])
        out.update(_logp(probe, ""))
    for kind, rows in (("task", task), ("probe", probe)):
        for cat, group in rows.groupby("category", sort=True):
            out[f"{kind}_accuracy/{cat}"] = _mean(group["correct"])
            if kind == "probe":
                out.update(_logp(group, f"/{cat}", sums=False))
    return out


def _logp(rows: pd.DataFrame, suffix: str, sums: bool = True) -> dict[str, float]:
    """Mean per-token (and, with ``sums``, summed) log p of gold completions and of stored base responses."""
    out = {f"probe_logp{suffix}": _mean(rows["logp_mean"])}
    if sums:
        out[f"probe_logp_sum{suffix}"] = _mean(rows["logp_sum"])
    if rows["logp_base_mean"].notna().any():
        out[f"probe_logp_base{suffix}"] = _mean(rows["logp_base_mean"])
        if sums:
            out[f"probe_logp_base_sum{suffix}"] = _mean(rows["logp_base_sum"])
    return out


def load_inputs(config: EvalConfig, out_dir: str | Path, kind: str = "causal-lm") -> tuple[list[dict], list[dict]]:
    """Task records (from ``task_data`` or built by ``task``) and probes (``probes``, or the built-in suite for
    the model kind); image records draw into ``out_dir``."""
    from dynamics.data import read_records
    from dynamics.probes import load_probes
    from dynamics.tasks import get_task

    out_dir = Path(out_dir)
    if config.task_data:
        task_records = read_records(config.task_data)
    elif config.task:
        args = _args(config)
        task = get_task(config.task, **args)
        if getattr(task.config, "form", None) == "image" and "image_dir" not in args:
            task = get_task(config.task, **args, image_dir=str(out_dir / "task_images"))
        task_records = task.build(config.n_task, config.task_seed)
    else:
        task_records = []
    probes_spec = config.probes or ("visual" if kind == "vlm" else "text")
    probes = load_probes(probes_spec, image_dir=out_dir / "probe_images")
    return task_records, probes


def run_eval(
    spec: str | Path,
    task_records: Sequence[dict] | None,
    probes: Sequence[dict] | None,
    config: EvalConfig,
    out_dir: str | Path,
) -> pd.DataFrame:
    """Evaluate a model spec, checkpoint folder or every checkpoint of a run folder (in step order); write
    ``out_dir/eval.parquet`` (rows of every model so far, rewritten after each), ``out_dir/summary.jsonl`` and
    ``out_dir/manifest.json``. ``task_records`` / ``probes`` of None are made by :func:`load_inputs`.
    Checkpoints already in ``eval.parquet`` under the same configuration and with the same weight files (names,
    sizes, times) are not evaluated again."""
    from dynamics.models import fingerprint, load_model, resolve_checkpoints

    out_dir = Path(out_dir)
    checkpoints = resolve_checkpoints(spec)
    if not checkpoints:
        raise DynamicsError("the run folder has no complete checkpoint yet", file=spec, field="model")
    # bad input met before the first model's rows are written leaves no folder behind
    with removed_on_error(out_dir, lambda d: (d / "eval.parquet").exists()):
        loaded: dict[str, LoadedModel] = {}
        if task_records is None or probes is None:
            kind = "causal-lm"
            # the first model is loaded first, for its kind, on which the default probe suite depends (not when
            # resuming named probes)
            if not (out_dir / "manifest.json").exists() or (probes is None and not config.probes):
                first = loaded[checkpoints[0].spec] = load_model(checkpoints[0].spec, dtype=config.dtype,
                                                                  device=config.device)
                kind = first.kind
            built_tasks, built_probes = load_inputs(config, out_dir, kind)
            task_records = built_tasks if task_records is None else task_records
            probes = built_probes if probes is None else probes
        weights = {c.name: text_hash(fingerprint(c.spec), 16) for c in checkpoints}
        manifest = {"format": FORMAT, "model": str(spec), "config": {k: v for k, v in asdict(config).items()
                                                                     if k != "progress"},
                    "inputs": _inputs_hash(task_records, probes), "checkpoints": [c.name for c in checkpoints],
                    "weights": weights}
        manifest_path, parquet = out_dir / "manifest.json", out_dir / "eval.parquet"
        frames = []
        if parquet.exists() and manifest_path.exists():
            old = json.loads(manifest_path.read_text())
            if all(old.get(k) == manifest[k] for k in ("model", "config", "inputs")):
                # rows of a checkpoint whose weights changed since (retrained in place) are evaluated again
                kept = {m: w for m, w in (old.get("weights") or {}).items() if weights.get(m, w) == w}
                rows = pd.read_parquet(parquet)
                frames.append(rows[rows["model"].isin(set(kept))])
                manifest["weights"] = {**kept, **weights}
        done = {(m, int(s)) for f in frames for m, s in zip(f["model"], f["step"], strict=True)}
        for ckpt in checkpoints:  # a model loaded for its kind alone is not held while the others are evaluated
            if (ckpt.name, ckpt.step) in done:
                loaded.pop(ckpt.spec, None)
        write_json(manifest_path, {**manifest, "versions": versions()})
        for ckpt in checkpoints:
            if (ckpt.name, ckpt.step) in done:
                continue
            lm = loaded.pop(ckpt.spec, None) or load_model(ckpt.spec, dtype=config.dtype, device=config.device)
            frames.append(evaluate_model(lm, task_records, probes, config, step=ckpt.step, model_name=ckpt.name))
            with atomic_path(parquet) as tmp:
                pd.concat(frames, ignore_index=True).to_parquet(tmp, index=False)
            del lm
    df = pd.concat(frames, ignore_index=True)
    write_jsonl(out_dir / "summary.jsonl", summaries(df))
    return df


def _inputs_hash(task_records: Sequence[dict], probes: Sequence[dict]) -> str:
    """A content hash of what is evaluated: every field of every record (ids, prompts, answers, image paths, and
    ``meta``, which holds what scores a record: its category, a probe's aliases and stored response, a task
    record's task), and the bytes of every image they name."""
    from dynamics.data import content_hash

    return content_hash([*task_records, *probes], 16)


def summaries(df: pd.DataFrame) -> list[dict[str, Any]]:
    """:func:`summarise` per ``(model, step)``, in step order, each with its ``model`` and ``step``."""
    rows = [{"model": m, "step": int(s), **summarise(g)} for (m, s), g in df.groupby(["model", "step"], sort=False)]
    return sorted(rows, key=lambda r: r["step"])

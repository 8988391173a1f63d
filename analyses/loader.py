"""Find and read stored results: run folders, influence folders, compare outputs, a study folder.

A study folder (made by ``dynamics demo``) holds ``probes.jsonl``, ``data/*.jsonl``, ``runs/<label>/``,
``influence/<label>/``, ``compare/`` and ``figures/``, but :meth:`Study.discover` accepts any folder: run
folders are the folders holding ``metrics.jsonl`` or ``eval.jsonl``, influence folders those holding
``influence.parquet``, compare outputs those holding ``samples.parquet`` and ``tests.parquet``; a folder's name
is its label (its path under the root when names repeat). A run label ending in ``-seedN`` / ``_seedN`` /
``/seedN`` is seed N of the run group named by the rest.

Every reader validates what it reads and raises :class:`~dynamics.errors.DynamicsError` naming the file (and
line and field where there is one) for a missing or malformed input. Nothing here recomputes results.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dynamics.errors import DynamicsError
from dynamics.store import input_file, read_parquet, unreadable_parquet

METRICS_COLUMNS = ("step", "loss")  # + lr, grad_norm, reward_mean?, reward_std?, kl?
METRICS_NUMERIC = ("step", "loss", "lr", "grad_norm", "reward_mean", "reward_std", "kl")
EVAL_COLUMNS = ("step",)  # + task_accuracy, probe_accuracy, probe_logp, probe_logp_base?, <metric>/<category>
EVAL_ITEM_COLUMNS = ("step", "item_id", "kind", "correct")  # RUN/eval.parquet (optional per-item table)
INFLUENCE_COLUMNS = ("ckpt", "step", "train_id", "probe_id", "kernel", "cosine", "train_norm", "probe_norm")
INFLUENCE_NUMERIC = ("step", "kernel", "cosine", "train_norm", "probe_norm")
SAMPLE_COLUMNS = ("label", "id")
TEST_COLUMNS = ("a", "b", "metric")
BATCH_ROWS = 1 << 18  # rows of an influence table read at a time
SEED_RE = re.compile(r"^(?P<group>.+?)[-_/]seed[-_]?(?P<seed>\d+)$")
SKIP_DIRS = re.compile(r"^(\.|checkpoint-\d+$|__pycache__$)")


# ------------------------------------------------------------------------------------------------- readers
def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from a file, or a DynamicsError naming the file."""
    path = input_file(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DynamicsError(f"invalid JSON: {e.msg}", file=path, line=e.lineno) from None
    except UnicodeDecodeError:
        raise DynamicsError("not UTF-8 text", file=path) from None
    if not isinstance(obj, dict):
        raise DynamicsError(f"expected a JSON object, got {type(obj).__name__}", file=path)
    return obj


def _check_numeric(df: pd.DataFrame, columns: tuple[str, ...], path: Path, lines: list[int] | None = None) -> None:
    for col in columns:
        if col not in df:
            continue
        vals = pd.to_numeric(df[col], errors="coerce")
        bad = vals.isna() & df[col].notna()
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DynamicsError(f"expected a number, got {df[col].iloc[i]!r}", file=path,
                                line=lines[i] if lines else None, field=col)
        df[col] = vals


def read_jsonl_table(path: str | os.PathLike, required: tuple[str, ...] = (),
                     numeric: Callable[[str], bool] = lambda col: False) -> pd.DataFrame:
    """A JSON-lines log as a DataFrame. Every row must be an object holding ``required``; values of the
    columns ``numeric(name)`` selects must be numbers (or null). A torn last line -- what a killed writer
    leaves -- is skipped, as :func:`dynamics.store.read_jsonl_rows` does."""
    path = input_file(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DynamicsError("not UTF-8 text", file=path) from None
    rows, where = [], []
    for i, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            if i == len(lines):
                break
            raise DynamicsError(f"invalid JSON: {e.msg} (column {e.colno})", file=path, line=i) from None
        except (ValueError, RecursionError) as e:  # an integer too long to convert, JSON nested too deep
            raise DynamicsError(f"unreadable JSON: {str(e).splitlines()[0] or type(e).__name__}", file=path,
                                line=i) from None
        if not isinstance(row, dict):
            raise DynamicsError(f"expected a JSON object, got {type(row).__name__}", file=path, line=i)
        for col in required:
            if row.get(col) is None:
                raise DynamicsError("missing required field", file=path, line=i, field=col)
        rows.append(row)
        where.append(i)
    if not rows:
        raise DynamicsError("no rows: the file is empty", file=path)
    df = pd.DataFrame(rows)
    _check_numeric(df, tuple(c for c in df.columns if numeric(c)), path, where)
    return df


def read_parquet_table(path: str | os.PathLike, required: tuple[str, ...] = (),
                       numeric: tuple[str, ...] = ()) -> pd.DataFrame:
    """A parquet table holding ``required`` columns (``numeric`` ones as numbers), or a DynamicsError."""
    path = input_file(path)
    try:
        df = read_parquet(path)  # a live run may replace it while we read
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise unreadable_parquet(path, e) from None
    _check_columns(list(df.columns), required, path)
    if df.empty:
        raise DynamicsError("no rows: the table is empty", file=path)
    _check_numeric(df, numeric, path)
    return df


def iter_parquet_table(path: str | os.PathLike, required: tuple[str, ...], numeric: tuple[str, ...] = (),
                       batch_rows: int = BATCH_ROWS) -> Iterator[pd.DataFrame]:
    """:func:`read_parquet_table`'s checks, but only the ``required`` columns, ``batch_rows`` rows at a time: a
    table larger than memory can be reduced batch by batch. The file is opened once, so a live run that
    replaces it meanwhile is not read half old, half new."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = input_file(path)
    rows = 0
    try:
        with path.open("rb") as f:
            table = pq.ParquetFile(f, pre_buffer=False)  # pre-buffering holds every row group read so far
            _check_columns(table.schema_arrow.names, required, path)
            for batch in table.iter_batches(batch_size=batch_rows, columns=list(required)):
                df = batch.to_pandas()
                _check_numeric(df, numeric, path)
                rows += len(df)
                yield df
    except (pa.ArrowException, OSError) as e:  # a damaged file: a bad footer, or a corrupt page
        raise unreadable_parquet(path, e) from None
    if not rows:
        raise DynamicsError("no rows: the table is empty", file=path)


def _check_columns(found: list[str], required: tuple[str, ...], path: Path) -> None:
    missing = [c for c in required if c not in found]
    if missing:
        raise DynamicsError(f"missing column(s) {', '.join(missing)}; found {', '.join(map(str, found))}",
                            file=path, field=missing[0])


def _path_in(manifest: Path, value: Any, key: str, roots: tuple[Path, ...]) -> Path:
    """Resolve a path named in a manifest (a string or an object with ``path``): as written, else relative to
    the manifest's folder, the study root or the working directory -- trying its last one, two and three parts
    too, so that a study folder still reads after being moved or copied."""
    if isinstance(value, dict):
        value = value.get("path", value.get("file"))
    if not isinstance(value, str) or not value:
        raise DynamicsError("expected a path", file=manifest, field=key)
    p = Path(value).expanduser()
    tails = [p] if not p.is_absolute() else [Path(*p.parts[-k:]) for k in (1, 2, 3) if len(p.parts) > k]
    candidates = [p] + [base / t for t in tails for base in (manifest.parent, *roots, Path.cwd())]
    for c in candidates:
        if c.is_file():
            return c
    raise DynamicsError(f"names a file that does not exist: {value}", file=manifest, field=key)


# ------------------------------------------------------------------------------------------------- folders
@dataclass
class Run:
    """A training run folder: ``metrics.jsonl``, ``eval.jsonl``, ``rollouts.jsonl``, ``manifest.json``."""

    label: str
    path: Path

    @property
    def group(self) -> str:
        """The label without a seed suffix: runs of one group are seeds of the same configuration."""
        m = SEED_RE.match(self.label)
        return m.group("group") if m else self.label

    @property
    def seed(self) -> int | None:
        m = SEED_RE.match(self.label)
        return int(m.group("seed")) if m else None

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    @cached_property
    def metrics(self) -> pd.DataFrame:
        """Per-step training metrics (last row per step kept, as after a resume), sorted by step."""
        df = read_jsonl_table(self.path / "metrics.jsonl", METRICS_COLUMNS, lambda c: c in METRICS_NUMERIC)
        return df.drop_duplicates("step", keep="last").sort_values("step", ignore_index=True)

    @cached_property
    def eval(self) -> pd.DataFrame:
        """In-run evaluations (one row per evaluated step), sorted by step."""
        df = read_jsonl_table(self.path / "eval.jsonl", EVAL_COLUMNS,
                              lambda c: c == "step" or c.startswith(("task_", "probe_")))
        return df.drop_duplicates("step", keep="last").sort_values("step", ignore_index=True)

    @cached_property
    def eval_items(self) -> pd.DataFrame | None:
        """The optional per-item evaluation table ``eval.parquet`` (``step, item_id, kind, correct, ...``)."""
        if not self.has("eval.parquet"):
            return None
        return read_parquet_table(self.path / "eval.parquet", EVAL_ITEM_COLUMNS, ("step", "correct"))

    @cached_property
    def rollouts(self) -> pd.DataFrame:
        """RFT rollouts: ``id, step, reward, advantage, prompt, completion, answer`` (texts as plain strings)."""
        from dynamics.data import read_records, record_line, text_of

        path = self.path / "rollouts.jsonl"
        recs = read_records(path)
        for r in recs:
            if "reward" not in r:
                raise DynamicsError("a rollout needs a reward", file=path, line=record_line(path, r["id"]),
                                    field="reward")
        return pd.DataFrame({
            "id": [r["id"] for r in recs], "step": [r.get("step") for r in recs],
            "reward": [float(r["reward"]) for r in recs],
            "advantage": [float(r["advantage"]) if r.get("advantage") is not None else math.nan for r in recs],
            "prompt": [text_of(r["prompt"]) for r in recs], "completion": [text_of(r["completion"]) for r in recs],
            "answer": [r.get("answer") for r in recs]})

    @cached_property
    def manifest(self) -> dict:
        return read_json(self.path / "manifest.json")


@dataclass
class InfluenceSet:
    """An influence folder: ``influence.parquet`` and ``manifest.json`` naming its ``train`` and ``probes``."""

    label: str
    path: Path
    roots: tuple[Path, ...] = ()

    @cached_property
    def manifest(self) -> dict:
        return read_json(self.path / "manifest.json")

    def input_path(self, key: str) -> Path:
        """The file the manifest names under ``key`` (``train`` or ``probes``)."""
        manifest = self.path / "manifest.json"
        if key not in self.manifest:
            raise DynamicsError("missing required field", file=manifest, field=key)
        return _path_in(manifest, self.manifest[key], key, self.roots)

    def input_records(self, key: str) -> list[dict]:
        """The records the table was computed on (``train`` or ``probes``): the manifest's file, checked to hash
        as the manifest says (``KEY_sha256``: an edited file, or image, would attribute the table's rows to other
        samples)."""
        from dynamics.data import data_hash, read_records

        path = self.input_path(key)
        recorded = self.manifest.get(f"{key}_sha256")
        if recorded is not None and data_hash(path) != recorded:
            raise DynamicsError(f"the table at {self.path} was computed on this file, which (or an image it names) "
                                "has changed since: compute the influence again", file=path)
        return read_records(path)

    @cached_property
    def train_records(self) -> list[dict]:
        return self.input_records("train")

    def check_samples(self, records: Sequence[dict], path: str | os.PathLike) -> None:
        """Raise unless each of ``records`` (read from ``path``) that the table holds is the sample it was
        computed on: ``path`` is the table's training file as it was, or the records equal (prompt, completion,
        images) that file's under their ids."""
        from dynamics.data import data_hash, record_line

        if self.manifest.get("train_sha256") == data_hash(path):
            return
        table = {r["id"]: r for r in self.train_records}
        for rec in records:
            old = table.get(rec["id"])
            if old is not None and any(rec.get(k) != old.get(k) for k in ("prompt", "completion", "images")):
                raise DynamicsError(f"sample {rec['id']!r} is not the one the table at {self.path} was computed on",
                                    file=path, line=record_line(path, rec["id"]), field="id")

    @cached_property
    def probe_categories(self) -> pd.Series:
        """probe_id -> category (``meta.category``, 'uncategorised' when absent)."""
        recs = self.input_records("probes")
        return pd.Series({r["id"]: str(r.get("meta", {}).get("category", "uncategorised")) for r in recs},
                         name="category")

    @cached_property
    def per_sample(self) -> pd.DataFrame:
        """:func:`per_train_sample` of this folder's table, read in batches: memory grows with the training
        samples, not with the N x P table."""
        return per_train_sample_of_file(self.path / "influence.parquet")

    def reduce(self, sums: Callable[[pd.DataFrame], pd.DataFrame], agg: dict[str, str] | None = None,
               columns: tuple[str, ...] = INFLUENCE_COLUMNS) -> pd.DataFrame:
        """:func:`reduce_table` of this folder's ``influence.parquet``: recipes never hold its N x P rows."""
        return reduce_table(self.path / "influence.parquet", sums, agg, columns)

    def per_sample_at(self, step: int | None = None) -> pd.DataFrame:
        """:attr:`per_sample`'s rows at the checkpoint of training step ``step`` (the earliest if None)."""
        per = self.per_sample
        steps = sorted(set(per["step"]))
        rows = per[per["step"] == (steps[0] if step is None else step)]
        if rows.empty:
            raise DynamicsError(f"no checkpoint at step {step} in {self.path}; it holds steps "
                                f"{', '.join(map(str, steps))}", field="step")
        if rows["ckpt"].nunique() > 1:
            raise DynamicsError(f"several checkpoints at step {rows['step'].iloc[0]} "
                                f"({', '.join(map(str, rows['ckpt'].unique()))}): keep one per step",
                                file=self.path / "influence.parquet", field="step")
        return rows


SAMPLE_KEYS = ["ckpt", "step", "train_id"]


def per_train_sample(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (checkpoint, training sample): ``train_norm`` ‖g(u)‖, ``mean_abs_kernel`` mean over probes of
    |K(o,u)|, ``mean_kernel`` mean K (η·mean K ≈ the mean change of probe log p after one SGD step on u),
    ``mean_cosine``, ``frac_negative`` the fraction of probes with cosine < 0 (pushed down by u), and ``n_probes``
    the probe rows (means skip missing values)."""
    return _means(_sums(table))


def per_train_sample_of_file(path: str | os.PathLike, batch_rows: int | None = None) -> pd.DataFrame:
    """:func:`per_train_sample` of an ``influence.parquet`` file, reduced ``batch_rows`` rows at a time."""
    return _means(reduce_table(path, _sums, SUMS, batch_rows=batch_rows))


def reduce_table(path: str | os.PathLike, sums: Callable[[pd.DataFrame], pd.DataFrame],
                 agg: dict[str, str] | None = None, columns: tuple[str, ...] = INFLUENCE_COLUMNS,
                 batch_rows: int | None = None) -> pd.DataFrame:
    """Group totals of an influence table read ``batch_rows`` (default :data:`BATCH_ROWS`) rows of ``columns`` at
    a time: ``sums(batch)`` gives a batch's partial totals indexed by the group keys, which add up over batches
    (or combine by ``agg``, column -> pandas reduction). Partials are folded into the running total whenever
    they outgrow it, so memory stays O(groups + batch) whatever the row order."""
    numeric = tuple(c for c in INFLUENCE_NUMERIC if c in columns)
    batch_rows = batch_rows or BATCH_ROWS
    held: list[pd.DataFrame] = []
    for df in iter_parquet_table(path, columns, numeric, batch_rows):
        held.append(sums(df))
        if len(held) > 1 and sum(map(len, held[1:])) > len(held[0]) + batch_rows:
            held = [_fold(held, agg)]
    return _fold(held, agg)


SUMS = {"train_norm": "first", **dict.fromkeys(("kernel", "abs_kernel", "n_kernel", "cosine", "n_cosine",
                                                 "negative", "n_probes"), "sum")}


def _sums(table: pd.DataFrame) -> pd.DataFrame:
    """Per (checkpoint, step, sample): the sums and counts behind :func:`per_train_sample`'s means, which add
    up over batches of rows (:func:`_fold`)."""
    g = table.assign(abs_kernel=table["kernel"].abs(), negative=(table["cosine"] < 0).astype(float))
    return g.groupby(SAMPLE_KEYS, sort=False).agg(
        train_norm=("train_norm", "first"), kernel=("kernel", "sum"), abs_kernel=("abs_kernel", "sum"),
        n_kernel=("kernel", "count"), cosine=("cosine", "sum"), n_cosine=("cosine", "count"),
        negative=("negative", "sum"), n_probes=("probe_id", "size"))


def _fold(parts: list[pd.DataFrame], agg: dict[str, str] | None) -> pd.DataFrame:
    whole = pd.concat([p for p in parts if len(p)] or parts[:1])
    groups = whole.groupby(level=list(whole.index.names), sort=True)
    return groups.agg(agg) if agg else groups.sum()


def _means(s: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "train_norm": s["train_norm"], "mean_abs_kernel": s["abs_kernel"] / s["n_kernel"],
        "mean_kernel": s["kernel"] / s["n_kernel"], "mean_cosine": s["cosine"] / s["n_cosine"],
        "frac_negative": s["negative"] / s["n_probes"], "n_probes": s["n_probes"]}).reset_index()


@dataclass
class CompareOutput:
    """A ``dynamics compare`` output folder: ``samples.parquet``, ``tests.parquet``, ``summary.parquet``."""

    label: str
    path: Path

    @cached_property
    def samples(self) -> pd.DataFrame:
        return read_parquet_table(self.path / "samples.parquet", SAMPLE_COLUMNS)

    @cached_property
    def tests(self) -> pd.DataFrame:
        return read_parquet_table(self.path / "tests.parquet", TEST_COLUMNS)

    @cached_property
    def manifest(self) -> dict:
        return read_json(self.path / "manifest.json")


@dataclass
class Study:
    """Everything stored under one folder, discovered by what each folder holds (see the module docstring)."""

    root: Path
    runs: dict[str, Run] = field(default_factory=dict)
    influence: dict[str, InfluenceSet] = field(default_factory=dict)
    compares: dict[str, CompareOutput] = field(default_factory=dict)
    probes: Path | None = None

    @classmethod
    def discover(cls, root: str | os.PathLike) -> Study:
        root = Path(root)
        if not root.is_dir():
            raise DynamicsError("not a folder" if root.exists() else "folder not found", file=root)
        found: dict[str, list[Path]] = {"run": [], "influence": [], "compare": []}
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not SKIP_DIRS.match(d))
            names = set(filenames)
            if names & {"metrics.jsonl", "eval.jsonl"}:
                found["run"].append(Path(dirpath))
            if "influence.parquet" in names:
                found["influence"].append(Path(dirpath))
            if {"samples.parquet", "tests.parquet"} <= names:
                found["compare"].append(Path(dirpath))
        probes = root / "probes.jsonl"
        return cls(root=root,
                   runs={k: Run(k, p) for k, p in _labelled(root, found["run"]).items()},
                   influence={k: InfluenceSet(k, p, (root,)) for k, p in _labelled(root, found["influence"]).items()},
                   compares={k: CompareOutput(k, p) for k, p in _labelled(root, found["compare"]).items()},
                   probes=probes if probes.is_file() else None)

    def influence_samples(self) -> pd.DataFrame:
        """:func:`per_train_sample` of every influence folder, with its ``label``."""
        frames = [s.per_sample.assign(label=label) for label, s in self.influence.items()]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def run_groups(self, need: str = "eval.jsonl") -> dict[str, list[Run]]:
        """Runs holding ``need``, grouped by :attr:`Run.group` (seeds of one configuration together)."""
        groups: dict[str, list[Run]] = {}
        for run in self.runs.values():
            if run.has(need):
                groups.setdefault(run.group, []).append(run)
        return groups


def _labelled(root: Path, folders: list[Path]) -> dict[str, Path]:
    """Label each folder by its name, or by its path under ``root`` where names repeat."""
    names = [p.name if p != root else root.resolve().name for p in folders]
    out = {}
    for p, name in zip(folders, names, strict=True):
        out[name if names.count(name) == 1 else p.relative_to(root).as_posix()] = p
    return out


def common_step(df: pd.DataFrame, by: str = "label") -> tuple[pd.DataFrame, str]:
    """Rows of the earliest checkpoint step present for every ``by`` group (the base model when all start
    there), else of each group's own earliest step; and a sentence saying which."""
    steps = [set(g["step"]) for _, g in df.groupby(by)]
    shared = set.intersection(*steps) if steps else set()
    if shared:
        step = min(shared)
        return df[df["step"] == step], f"at checkpoint step {step:g} (shared by every data source)"
    first = df.groupby(by)["step"].transform("min")
    return df[df["step"] == first], "at each data source's earliest checkpoint (no step is shared)"

"""``dynamics compare``: how do training-data distributions differ -- in length, in likelihood under the base
model, and in their influence on prior knowledge?

Per sample (one row per record of each data set, ``samples.parquet``):

* ``n_chars`` the completion's length in characters; with a model, ``n_tokens`` its completion tokens under the
  project's tokenization, ``logp_sum`` = log π₀(y|x), ``logp_mean`` = logp_sum / n_tokens and
  ``ppl`` = exp(−logp_mean), the perplexity of the completion under the base model π₀
  (:func:`dynamics.probes.completion_logprobs`);
* with influence folders (matched to a data set by the training file their manifest names, else by ids), at one
  checkpoint (the earliest unless ``step`` is given): ``train_norm`` ‖g(u)‖, ``mean_abs_kernel`` mean |K| over
  probes, ``mean_cosine`` and ``frac_negative`` (see :func:`dynamics.analyses.loader.per_train_sample`).

For every pair of data sets and every measure (``tests.parquet``): two-sided Kolmogorov–Smirnov and
Mann–Whitney U tests, the difference of means, Cliff's δ and Cohen's d, each with a bootstrap interval, and
Holm-adjusted Mann–Whitney p-values over the whole table. ``differs`` is Mann–Whitney p < alpha for that one
test (so two samples of one distribution are flagged at rate alpha); use ``p_holm`` for the family. Where the
data sets answer the same prompts (``prompt_key``), also the paired comparison on those prompts -- the fair
one for likelihood, which depends on the prompt: ``paired_diff`` with its interval and a Wilcoxon signed-rank
``wilcoxon_p``.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from dynamics.analyses import style
from dynamics.analyses.loader import InfluenceSet
from dynamics.analyses.stats import CONFIDENCE, N_RESAMPLES, holm, mean_ci, two_sample
from dynamics.errors import DynamicsError, check_bounds
from dynamics.store import atomic_path, file_hash, text_hash, versions, write_json

# measure -> (panel title, axis label with units)
MEASURES = {
    "n_chars": ("Completion length", "length (characters)"),
    "n_tokens": ("Completion length", "length (tokens)"),
    "logp_mean": ("Likelihood under the base model", "log p per token (nats)"),
    "logp_sum": ("Likelihood under the base model", "log p of the completion (nats)"),
    "ppl": ("Perplexity under the base model", "perplexity (exp −mean log p)"),
    "train_norm": ("Gradient magnitude", "‖∇θ log p(y|x)‖"),
    "mean_abs_kernel": ("Influence magnitude", "mean |K| over probes (nats per unit lr)"),
    "mean_cosine": ("Influence direction", "mean cosine with probe gradients"),
    "frac_negative": ("Conflicting probes", "fraction of probes with cosine < 0"),
}
TESTED = ("n_chars", "n_tokens", "logp_mean", "logp_sum", "train_norm", "mean_abs_kernel", "mean_cosine",
          "frac_negative")  # ppl is a monotone transform of logp_mean: same tests
PLOTTED = ("n_tokens", "logp_mean", "train_norm", "mean_cosine")
LOG_SCALE = ("train_norm", "mean_abs_kernel")


@dataclass
class CompareConfig:
    """Inputs and options of ``dynamics compare``."""

    data: list[Path]
    out: Path
    labels: list[str] = field(default_factory=list)
    model: str | None = None
    influence: list[Path] = field(default_factory=list)
    step: int | None = None
    batch_size: int = 8
    alpha: float = 0.05
    n_resamples: int = N_RESAMPLES  # 0: no bootstrap intervals
    seed: int = 0

    def __post_init__(self) -> None:
        check_bounds(self, {"batch_size": 1, "n_resamples": 0}, above={"alpha": 0})
        if self.alpha >= 1:
            raise DynamicsError(f"alpha must be < 1, got {self.alpha}", field="alpha")


@dataclass
class CompareResult:
    samples: pd.DataFrame
    summary: pd.DataFrame
    tests: pd.DataFrame
    paths: list[Path]


def _labels(cfg: CompareConfig) -> list[str]:
    if len(cfg.data) < 2:
        raise DynamicsError("give at least two data sets (--data A.jsonl --data B.jsonl)", field="data")
    labels = list(cfg.labels) or [Path(p).stem for p in cfg.data]
    if len(labels) != len(cfg.data):
        raise DynamicsError(f"{len(labels)} labels for {len(cfg.data)} data sets", field="label")
    if len(set(labels)) != len(labels):
        raise DynamicsError(f"labels must be unique (got {', '.join(labels)}); name them with --label",
                            field="label")
    return labels


def _match_influence(inf: InfluenceSet, data: dict[str, tuple[Path, set[str]]]) -> str:
    """The label of the data set an influence folder was computed on: the manifest's training file, else ids."""
    folder = inf.path
    if not (folder / "influence.parquet").is_file():
        raise DynamicsError("not an influence folder: no influence.parquet", file=folder)
    train = inf.manifest.get("train") if (folder / "manifest.json").is_file() else None
    if isinstance(train, str) and Path(train).is_file():
        digest = file_hash(train)
        for label, (path, _) in data.items():
            if Path(path).resolve() == Path(train).resolve() or file_hash(path) == digest:
                return label
    ids = set(inf.per_sample["train_id"].astype(str))
    overlap = {label: len(ids & have) / len(ids) for label, (_, have) in data.items()}
    best = max(overlap, key=overlap.get)
    if overlap[best] < 1.0:
        raise DynamicsError("its training samples are not those of any --data file", file=folder / "influence.parquet")
    return best


def prompt_key(record: dict) -> str:
    """A record's prompt (messages and images) as 16 hex digits of SHA-256: samples of different data sets
    with equal keys answer the same prompt."""
    key = json.dumps([record.get("prompt"), record.get("images")], sort_keys=True, ensure_ascii=False)
    return text_hash(key, 16)


def sample_table(cfg: CompareConfig) -> pd.DataFrame:
    """Per-sample measures of every data set (the model-dependent part of compare). Everything that can fail
    is checked before the model scores any set: the influence folders are read first, then every set is
    encoded against the model's context (and encoded again, set by set, as it is scored: holding every set's
    image tensors at once could take gigabytes)."""
    from dynamics.data import naming_records, read_records, text_of

    labels = _labels(cfg)
    paths = dict(zip(labels, cfg.data, strict=True))
    records = {label: read_records(path) for label, path in paths.items()}
    data = {label: (Path(p), {r["id"] for r in records[label]}) for label, p in paths.items()}
    influence = {}
    for folder in map(Path, cfg.influence):
        inf = InfluenceSet(folder.name, folder)
        label = _match_influence(inf, data)
        if label in influence:
            raise DynamicsError(f"a second influence folder for data set '{label}'", file=folder, field="influence")
        if (folder / "manifest.json").is_file():  # the kernels are of these samples, not of others under their ids
            inf.check_samples(records[label], paths[label])
        per = inf.per_sample_at(cfg.step)
        influence[label] = per.drop(columns=["ckpt", "n_probes"]).rename(
            columns={"train_id": "id", "step": "influence_step"}).assign(label=label)
    lm = None
    if cfg.model is not None:
        from dynamics.generation import encode_scored
        from dynamics.models import load_model
        from dynamics.probes import completion_logprobs

        lm = load_model(cfg.model)
        for label, recs in records.items():
            with naming_records(paths[label]):
                encode_scored(lm, recs)
    frames = []
    for label, recs in records.items():
        df = pd.DataFrame({"label": label, "id": [r["id"] for r in recs], "prompt_key": [prompt_key(r) for r in recs],
                           "n_chars": [len(text_of(r["completion"])) for r in recs]})
        if lm is not None:
            with naming_records(paths[label]):
                lp = completion_logprobs(lm, recs, batch_size=cfg.batch_size)
            lp = lp[["id", "n_tokens", "logp_sum", "logp_mean"]]
            df = df.merge(lp.astype({"id": str}), on="id", how="left", validate="one_to_one")
            df["ppl"] = np.exp(-df["logp_mean"])
        frames.append(df)
    samples = pd.concat(frames, ignore_index=True)
    if influence:
        joined = pd.concat(influence.values(), ignore_index=True).astype({"id": str})
        samples = samples.merge(joined, on=["label", "id"], how="left", validate="one_to_one")
    return samples


def measures_in(samples: pd.DataFrame) -> list[str]:
    """The measures present in a samples table, in display order."""
    return [m for m in MEASURES if m in samples.columns and samples[m].notna().any()]


def summary_table(samples: pd.DataFrame) -> pd.DataFrame:
    """Per data set and measure: n, mean, standard deviation and quartiles."""
    rows = []
    for label in samples["label"].unique():
        part = samples[samples["label"] == label]
        for m in measures_in(samples):
            x = part[m].dropna().to_numpy(float)
            if len(x):
                q1, med, q3 = np.quantile(x, [0.25, 0.5, 0.75])
                rows.append({"label": label, "measure": m, "n": len(x), "mean": x.mean(),
                             "sd": x.std(ddof=1) if len(x) > 1 else math.nan, "q1": q1, "median": med, "q3": q3})
    return pd.DataFrame(rows)


def paired_by_prompt(samples: pd.DataFrame, a: str, b: str, measure: str, *, n_resamples: int = N_RESAMPLES,
                     confidence: float = CONFIDENCE, seed: int = 0) -> dict[str, float] | None:
    """A vs B on the prompts both answer: each prompt's mean of ``measure`` in A minus in B (several rollouts
    of one prompt are averaged), the mean of these differences with its bootstrap interval, and the Wilcoxon
    signed-rank p-value. None without ``prompt_key`` or with fewer than 3 shared prompts."""
    if "prompt_key" not in samples.columns:
        return None
    per = samples.dropna(subset=[measure]).groupby(["label", "prompt_key"])[measure].mean()
    if a not in per.index.get_level_values(0) or b not in per.index.get_level_values(0):
        return None
    xa, xb = per[a], per[b]
    common = xa.index.intersection(xb.index)
    if len(common) < 3:
        return None
    d = (xa[common] - xb[common]).to_numpy(float)
    est, ci = mean_ci(d, n_resamples=n_resamples, confidence=confidence, seed=seed) if n_resamples else (d.mean(), None)
    p = 1.0 if not np.any(d) else float(stats.wilcoxon(d).pvalue)
    lo, hi = ci if ci else (math.nan, math.nan)
    return {"n_paired": len(common), "paired_diff": est, "paired_diff_lo": lo, "paired_diff_hi": hi, "wilcoxon_p": p}


def pairwise_tests(samples: pd.DataFrame, alpha: float = 0.05, n_resamples: int = N_RESAMPLES, seed: int = 0
                   ) -> pd.DataFrame:
    """Every pair of data sets (in input order) and every tested measure: tests and effect sizes of A vs B,
    and the paired comparison on shared prompts where there are any (:func:`paired_by_prompt`)."""
    labels = list(dict.fromkeys(samples["label"]))
    rows = []
    for a, b in itertools.combinations(labels, 2):
        xa, xb = samples[samples["label"] == a], samples[samples["label"] == b]
        for m in (m for m in TESTED if m in samples.columns):
            x, y = xa[m].dropna().to_numpy(float), xb[m].dropna().to_numpy(float)
            if len(x) >= 2 and len(y) >= 2:
                kw = {"n_resamples": n_resamples, "confidence": 1 - alpha, "seed": seed}
                rows.append({"a": a, "b": b, "metric": m, **two_sample(x, y, **kw),
                             **(paired_by_prompt(samples, a, b, m, **kw) or {})})
    if not rows:
        return pd.DataFrame(columns=["a", "b", "metric"])
    tests = pd.DataFrame(rows)
    tests["p_holm"] = holm(tests["mwu_p"].to_numpy())
    tests["differs"] = tests["mwu_p"] < alpha
    return tests


def plot(samples: pd.DataFrame, title: str = "Training-data distributions") -> object:
    """Empirical CDFs of the key measures, one panel each, one line per data set."""
    import seaborn as sns

    present = [m for m in PLOTTED if m in measures_in(samples)] or measures_in(samples)[:1]
    labels = style.order(samples["label"].unique())
    pal = style.palette(labels)
    sty = style.styles(labels)
    fig, axes = style.new_figure(len(present), title=title)
    for ax, m in zip(axes, present, strict=True):
        for label in labels:
            x = samples.loc[samples["label"] == label, m].dropna()
            if len(x):
                sns.ecdfplot(x=x, ax=ax, color=pal[label], linestyle=sty[label].linestyle, linewidth=1.8,
                             label=f"{style.display(label)} (n={len(x)})")
        if m in LOG_SCALE:
            ax.set_xscale("log")
            style.plain_log_ticks(ax, "x")
        ax.set(title=MEASURES[m][0], xlabel=MEASURES[m][1], ylabel="fraction of samples ≤ x")
    return style.finish(fig, axes, "Empirical CDFs: the fraction of samples at or below each value.")


def write_outputs(out: str | Path, samples: pd.DataFrame, *, alpha: float = 0.05, n_resamples: int = N_RESAMPLES,
                  seed: int = 0, manifest: dict | None = None, figure: bool = True) -> CompareResult:
    """Test and plot a samples table; write ``samples``, ``summary``, ``tests`` (parquet), ``compare.png|pdf``
    (unless not ``figure``) and ``manifest.json`` into ``out``, each atomically."""
    summary = summary_table(samples)
    tests = pairwise_tests(samples, alpha, n_resamples, seed)
    out = Path(out)
    paths = []
    for name, df in (("samples", samples), ("summary", summary), ("tests", tests)):
        with atomic_path(out / f"{name}.parquet") as tmp:
            df.to_parquet(tmp, index=False)
        paths.append(out / f"{name}.parquet")
    if figure:
        paths += style.save_figure(plot(samples), out / "compare")
    write_json(out / "manifest.json", {"format": 1, "command": "compare", **(manifest or {}),
                                       "options": {"alpha": alpha, "n_resamples": n_resamples, "seed": seed,
                                                   **(manifest or {}).get("options", {})},
                                       "versions": versions()})
    return CompareResult(samples, summary, tests, paths + [out / "manifest.json"])


def compare(cfg: CompareConfig) -> CompareResult:
    """``dynamics compare``: :func:`sample_table`, then :func:`write_outputs` into ``cfg.out``."""
    samples = sample_table(cfg)
    manifest = {
        "data": [{"label": lab, "path": str(Path(p).resolve()), "sha256": file_hash(p)}
                 for lab, p in zip(_labels(cfg), cfg.data, strict=True)],
        "influence": [str(Path(p).resolve()) for p in cfg.influence],
        "options": {"model": cfg.model, "step": cfg.step, "batch_size": cfg.batch_size}}
    return write_outputs(cfg.out, samples, alpha=cfg.alpha, n_resamples=cfg.n_resamples, seed=cfg.seed,
                         manifest=manifest)

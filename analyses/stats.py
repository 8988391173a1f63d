"""Statistics shared by every recipe, and the containers a recipe returns.

Confidence intervals are bootstrap intervals (:func:`scipy.stats.bootstrap`, BCa, falling back to the
percentile method when BCa is undefined, e.g. for a constant sample, and above :data:`BCA_MAX_N` units, where
BCa's n² jackknife is costly and its corrections negligible) over the independent units of the data:
training samples for influence (a sample's kernel with every probe counts once, as its mean), items for
evaluation tables. Run-level quantities with several seeds per run get a pooled-variance t-interval over seeds.

A :class:`Claim` compares an estimate with a null value (0 for differences, 1 for ratios) in a predicted
direction: it *held* when the whole interval lies on the predicted side, is *inconclusive* when the point
estimate does but the interval covers the null, and *did not hold* when the estimate lies on the other side.
Without an interval (one seed, no per-item table) the verdict rests on the point estimate and says so.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
N_RESAMPLES = 2000
RESAMPLED_VALUES = 1 << 20  # values per vectorised call in a bootstrap: memory O(this), not O(n_resamples · n)
BCA_MAX_N = 10_000  # BCa's jackknife costs n² values; above this, percentile (BCa shifts its ends by O(1/n))


# ----------------------------------------------------------------------------------------- effect sizes
def cliffs_delta(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Cliff's δ = P(X > Y) − P(X < Y) = 2U/(n_x n_y) − 1, from the Mann–Whitney U of ``x`` (ties count ½)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    nx, ny = x.shape[axis], y.shape[axis]
    ranks = stats.rankdata(np.concatenate([x, y], axis=axis), axis=axis)
    u = np.take(ranks, np.arange(nx), axis=axis).sum(axis=axis) - nx * (nx + 1) / 2
    return 2 * u / (nx * ny) - 1


def cohens_d(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Cohen's d = (mean x − mean y) / pooled standard deviation (ddof 1)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    nx, ny = x.shape[axis], y.shape[axis]
    pooled = ((nx - 1) * x.var(axis=axis, ddof=1) + (ny - 1) * y.var(axis=axis, ddof=1)) / (nx + ny - 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (x.mean(axis=axis) - y.mean(axis=axis)) / np.sqrt(pooled)


def spearman(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's ρ: the Pearson correlation of the ranks (average ranks for ties)."""
    rx = stats.rankdata(np.asarray(x, float), axis=axis)
    ry = stats.rankdata(np.asarray(y, float), axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (rx * ry).sum(axis=axis) / np.sqrt((rx**2).sum(axis=axis) * (ry**2).sum(axis=axis))


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def _mean_diff(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def _mean_ratio(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.mean(x, axis=axis) / np.mean(y, axis=axis)


# -------------------------------------------------------------------------------------------- intervals
def bootstrap_ci(
    data: tuple[np.ndarray, ...],
    statistic: Callable[..., np.ndarray],
    *,
    paired: bool = False,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Bootstrap interval of a vectorised ``statistic(*samples, axis=-1)``; None when a sample has < 2 units.
    BCa up to :data:`BCA_MAX_N` units per sample (or when it fails), else percentile. Resamples (and BCa's n
    jackknife samples) go to ``statistic`` ~:data:`RESAMPLED_VALUES` values at a time, so memory does not grow
    with n² (one jackknife call) or n_resamples · n."""
    data = tuple(np.asarray(d, float) for d in data)
    if any(len(d) < 2 for d in data):
        return None
    n = max(map(len, data))
    batch = max(1, RESAMPLED_VALUES // n)
    for method in ("BCa", "percentile") if n <= BCA_MAX_N else ("percentile",):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = stats.bootstrap(data, statistic, paired=paired, vectorized=True, n_resamples=n_resamples,
                                  batch=batch, confidence_level=confidence, method=method,
                                  rng=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(lo) and math.isfinite(hi):
            return lo, hi
    point = float(statistic(*data, axis=-1))  # every resample equal (constant data): a zero-width interval
    return (point, point) if math.isfinite(point) else None


def mean_ci(x: np.ndarray, **kw: Any) -> tuple[float, tuple[float, float] | None]:
    """Mean and its bootstrap interval."""
    x = np.asarray(x, float)
    return float(x.mean()) if len(x) else math.nan, bootstrap_ci((x,), _mean, **kw)


def diff_ci(x: np.ndarray, y: np.ndarray, **kw: Any) -> tuple[float, tuple[float, float] | None]:
    """mean(x) − mean(y) for independent samples, with its bootstrap interval."""
    return float(_mean_diff(np.asarray(x, float), np.asarray(y, float))), bootstrap_ci((x, y), _mean_diff, **kw)


def ratio_ci(x: np.ndarray, y: np.ndarray, **kw: Any) -> tuple[float, tuple[float, float] | None]:
    """mean(x) / mean(y) for independent samples, with its bootstrap interval."""
    return float(_mean_ratio(np.asarray(x, float), np.asarray(y, float))), bootstrap_ci((x, y), _mean_ratio, **kw)


def spearman_ci(x: np.ndarray, y: np.ndarray, **kw: Any) -> tuple[float, tuple[float, float] | None]:
    """Spearman's ρ of paired observations and its bootstrap interval (pairs resampled together)."""
    return float(spearman(x, y)), bootstrap_ci((x, y), spearman, paired=True, **kw)


def t_interval_diff(a: np.ndarray, b: np.ndarray, confidence: float = CONFIDENCE
                    ) -> tuple[float, tuple[float, float] | None]:
    """mean(a) − mean(b) over replicates (seeds) with a pooled-variance t-interval; None without any spread
    to estimate (one replicate on each side)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    est = float(a.mean() - b.mean())
    dof = len(a) + len(b) - 2
    if dof < 1:
        return est, None
    ss = ((a - a.mean()) ** 2).sum() + ((b - b.mean()) ** 2).sum()
    se = math.sqrt(ss / dof * (1 / len(a) + 1 / len(b)))
    half = float(stats.t.ppf(0.5 + confidence / 2, dof)) * se
    return est, (est - half, est + half)


def holm(pvalues: np.ndarray) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (family-wise error control)."""
    p = np.asarray(pvalues, float)
    order = np.argsort(p)
    adj = np.minimum(np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order]), 1.0)
    out = np.empty_like(p)
    out[order] = adj
    return out


def two_sample(x: np.ndarray, y: np.ndarray, *, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
               seed: int = 0) -> dict[str, float]:
    """Two-sample tests and effect sizes of x against y: Kolmogorov–Smirnov and Mann–Whitney U (two-sided),
    difference of means, Cliff's δ and Cohen's d, each effect with its bootstrap interval (none when
    ``n_resamples`` is 0). Non-finite values are dropped."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    out: dict[str, float] = {"n_a": len(x), "n_b": len(y), "mean_a": float(np.mean(x)) if len(x) else math.nan,
                             "mean_b": float(np.mean(y)) if len(y) else math.nan,
                             "median_a": float(np.median(x)) if len(x) else math.nan,
                             "median_b": float(np.median(y)) if len(y) else math.nan}
    if len(x) < 2 or len(y) < 2:
        return out
    ks = stats.ks_2samp(x, y)
    mw = stats.mannwhitneyu(x, y, alternative="two-sided")
    out.update(ks_stat=float(ks.statistic), ks_p=float(ks.pvalue), mwu_u=float(mw.statistic), mwu_p=float(mw.pvalue))
    kw = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    for name, fn in (("mean_diff", _mean_diff), ("cliffs_delta", cliffs_delta), ("cohens_d", cohens_d)):
        out[name] = float(fn(x, y))
        ci = bootstrap_ci((x, y), fn, **kw) if n_resamples else None
        out[f"{name}_lo"], out[f"{name}_hi"] = ci if ci else (math.nan, math.nan)
    return out


# -------------------------------------------------------------------------------------------- containers
Verdict = Literal["held", "inconclusive", "did not hold", "not measured"]


@dataclass
class Claim:
    """One claim of the study as measured here: ``estimate`` (with ``ci``) against ``null`` in direction
    ``expected`` (``'>'`` or ``'<'``); ``measure`` says what the number is, ``detail`` where the interval comes
    from or why nothing was measured."""

    key: str
    statement: str
    measure: str
    expected: Literal[">", "<"]
    estimate: float | None = None
    ci: tuple[float, float] | None = None
    null: float = 0.0
    detail: str = ""

    @property
    def verdict(self) -> Verdict:
        if self.estimate is None or not math.isfinite(self.estimate):
            return "not measured"
        sign = 1 if self.expected == ">" else -1
        if sign * (self.estimate - self.null) <= 0:
            return "did not hold"
        if self.ci is None:
            return "held"
        return "held" if min(sign * (c - self.null) for c in self.ci) > 0 else "inconclusive"

    @property
    def held(self) -> bool | None:
        """True/False once measured; None when it could not be measured."""
        v = self.verdict
        return None if v == "not measured" else v == "held"

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "statement": self.statement, "measure": self.measure, "expected": self.expected,
                "null": self.null, "estimate": self.estimate, "ci": list(self.ci) if self.ci else None,
                "verdict": self.verdict, "held": self.held, "detail": self.detail}


@dataclass
class Finding:
    """What a recipe returns: tidy tables, key statistics, the claims it tests, and its figures."""

    name: str
    title: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    claims: list[Claim] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # figure name -> matplotlib Figure
    notes: list[str] = field(default_factory=list)

    def claim(self, key: str) -> Claim:
        for c in self.claims:
            if c.key == key:
                return c
        raise KeyError(key)

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write every figure as PNG and PDF into ``out_dir`` (atomically); return the paths written."""
        from dynamics.analyses.style import save_figure

        paths = []
        for name, fig in self.figures.items():
            paths += save_figure(fig, Path(out_dir) / name)
        return paths

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "stats": _jsonable(self.stats),
                "claims": [c.to_dict() for c in self.claims], "notes": self.notes}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    return obj


def mean_table(df: pd.DataFrame, by: list[str], values: list[str], *, n_resamples: int = N_RESAMPLES,
               seed: int = 0) -> pd.DataFrame:
    """Long table of ``by`` keys, ``measure``, ``n``, ``mean`` and its bootstrap interval ``lo``, ``hi`` (each
    row of ``df`` one independent unit)."""
    rows = []
    for keys, part in df.groupby(by, sort=True):
        keys = keys if isinstance(keys, tuple) else (keys,)
        for v in values:
            x = part[v].dropna().to_numpy(float)
            m, ci = mean_ci(x, n_resamples=n_resamples, seed=seed)
            rows.append({**dict(zip(by, keys, strict=True)), "measure": v, "n": len(x), "mean": m,
                         "lo": ci[0] if ci else math.nan, "hi": ci[1] if ci else math.nan})
    return pd.DataFrame(rows)

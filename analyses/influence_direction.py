"""Finding 3 -- influence direction: RFT rollouts' gradients are better aligned with prior knowledge than SFT's.

The cosine between a training sample's gradient and a probe's, cos(o,u) = K(o,u) / (‖g(o)‖‖g(u)‖), says in
which direction one step on u moves the probe's log p: up when positive, down (interference, forgetting)
when negative. Per training sample: the mean cosine over probes and the fraction of probes it pushes down.
Claims compare the mean of the per-sample mean cosine between sources (difference, bootstrap interval over
training samples) at the earliest checkpoint every source shares.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dynamics.analyses import style
from dynamics.analyses.influence_magnitude import against_sft
from dynamics.analyses.loader import Study, common_step
from dynamics.analyses.stats import Claim, Finding, diff_ci, mean_table

NAME = "influence_direction"
TITLE = "Influence direction: alignment of training gradients with prior knowledge"


def needs(study: Study) -> str | None:
    return None if study.influence else "no influence folder (influence.parquet)"


def claims_of(at: pd.DataFrame, where: str) -> list[Claim]:
    claims = []
    for src, short in style.COMPARED_WITH_SFT:
        for col, noun, expected in (("mean_cosine", "mean cosine with probe gradients", ">"),
                                    ("frac_negative", "fraction of probes pushed down (cosine < 0)", "<")):
            word = "better aligned with prior knowledge" if col == "mean_cosine" else "in conflict with fewer probes"
            claims.append(against_sft(Claim(
                f"{short}_{'aligned' if col == 'mean_cosine' else 'fewer_conflicts'}",
                f"{src} training samples are {word} than SFT's",
                f"difference of the means of the per-sample {noun} {where}, {src} − SFT",
                expected), at, col, src, diff_ci))  # type: ignore[arg-type]
    return claims


def analyse(study: Study) -> Finding:
    """Tables ``samples`` (per training sample and checkpoint), ``histogram`` (:func:`cosine_histogram`) and
    ``means`` (per source and checkpoint, with intervals); the direction claims; the figure."""
    per = study.influence_samples()
    at, where = common_step(per)
    hist = cosine_histogram(study)
    means = mean_table(per, ["label", "step"], ["mean_cosine", "frac_negative"])
    finding = Finding(NAME, TITLE, tables={"samples": per, "histogram": hist, "means": means},
                      claims=claims_of(at, where))
    first = mean_table(at, ["label"], ["mean_cosine", "frac_negative"])
    finding.stats = {"where": where, "means": {f"{r.label}/{r.measure}": {"mean": r.mean, "ci": [r.lo, r.hi],
                                                                           "n": r.n} for r in first.itertuples()}}
    finding.figures[NAME] = plot(at, hist.merge(at[["label", "step"]].drop_duplicates()), means, where)
    return finding


def cosine_histogram(study: Study, bins: int = 40) -> pd.DataFrame:
    """Histogram of every (training sample, probe) pair's cosine, per source and checkpoint step, on ``bins``
    bins per step, shared by the sources at that step (``np.histogram``'s over their cosines' range): columns
    ``label, step, lo, hi, count, density``. Two passes over each table, one for the ranges, one for the counts,
    so no table is held whole."""
    cols = ("step", "cosine")
    ranges = [inf.reduce(lambda t: t.groupby("step")["cosine"].agg(["min", "max"]), {"min": "min", "max": "max"},
                         cols) for inf in study.influence.values()]
    span = pd.concat(ranges).groupby(level=0).agg({"min": "min", "max": "max"})
    # a step with no finite cosine (every gradient zero) gets the cosine's whole range, and no count
    edges = {step: np.histogram_bin_edges([lo, hi] if np.isfinite([lo, hi]).all() else [-1.0, 1.0], bins)
             for step, lo, hi in span.itertuples()}

    def counts(t: pd.DataFrame) -> pd.DataFrame:
        return pd.concat({step: pd.DataFrame({"count": np.histogram(g.dropna(), edges[step])[0]})
                          for step, g in t.groupby("step")["cosine"]}, names=["step", "bin"])

    frames = []
    for label, inf in study.influence.items():
        h = inf.reduce(counts, columns=cols).reset_index()
        lo = np.array([edges[s][b] for s, b in zip(h["step"], h["bin"], strict=True)])
        hi = np.array([edges[s][b + 1] for s, b in zip(h["step"], h["bin"], strict=True)])
        frames.append(h.assign(label=label, lo=lo, hi=hi,
                               density=h["count"] / (h.groupby("step")["count"].transform("sum") * (hi - lo))))
    return pd.concat(frames, ignore_index=True)[["label", "step", "lo", "hi", "count", "density"]]


def plot(at: pd.DataFrame, hist: pd.DataFrame, means: pd.DataFrame, where: str) -> object:
    labels = style.order(at["label"].unique())
    pal, sty = style.palette(labels), style.styles(labels)
    fig, axes = style.new_figure(3, title=TITLE)
    ax = axes[0]
    for lab in labels:
        h = hist[hist["label"] == lab].sort_values("lo")
        filled = np.flatnonzero(h["count"].to_numpy())
        h = h.iloc[filled.min():filled.max() + 1] if len(filled) else h.iloc[:0]  # bins shared with other sources
        if len(h):
            ax.stairs(h["density"], np.append(h["lo"], h["hi"].iloc[-1]), color=pal[lab],
                      linestyle=sty[lab].linestyle, linewidth=1.6, label=style.display(lab))
    ax.axvline(0, color="#555555", linewidth=0.9)
    ax.set(title="Cosine of every (sample, probe) pair", xlabel="cosine(g(probe), g(training sample))",
           ylabel="density")
    style.box_strip(axes[1], at, "mean_cosine", labels)
    axes[1].axhline(0, color="#555555", linewidth=0.9)
    axes[1].set(title="Mean cosine per training sample", ylabel="mean cosine over probes")
    f = means[means["measure"] == "frac_negative"].assign(
        mean=lambda d: 100 * d["mean"], lo=lambda d: 100 * d["lo"], hi=lambda d: 100 * d["hi"])
    if f["step"].nunique() > 1:
        style.ci_lines(axes[2], f, labels)
        axes[2].set(title="Conflicts over training", xlabel="checkpoint step",
                    ylabel="probes pushed down per sample (%)")
    else:
        style.note(axes[2], "one checkpoint only:\nno trend over training")
        axes[2].set_title("Conflicts over training")
    return style.finish(fig, axes, f"Histogram and boxes {where}; a negative cosine means a step on the sample "
                                   "lowers the probe's log p. Error bars: 95% bootstrap CI over training samples.")

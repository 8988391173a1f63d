"""Finding 3 -- influence direction: RFT rollouts' gradients are better aligned with prior knowledge than SFT's.

The cosine between a training sample's gradient and a probe's, cos(o,u) = K(o,u) / (‖g(o)‖‖g(u)‖), says in
which direction one step on u moves the probe's log p: up when positive, down (interference, forgetting)
when negative. Per training sample: the mean cosine over probes and the fraction of probes it pushes down.
Claims compare the mean of the per-sample mean cosine between sources (difference, bootstrap interval over
training samples) at the earliest checkpoint every source shares.
"""

from __future__ import annotations

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
    """Tables ``samples`` (per training sample and checkpoint), ``pairs`` (every pair's cosine, with its
    source) and ``means`` (per source and checkpoint, with intervals); the direction claims; the figure."""
    per = study.influence_samples()
    at, where = common_step(per)
    pairs = pd.concat([s.table[["step", "train_id", "probe_id", "cosine"]].assign(label=label)
                       for label, s in study.influence.items()], ignore_index=True)
    means = mean_table(per, ["label", "step"], ["mean_cosine", "frac_negative"])
    finding = Finding(NAME, TITLE, tables={"samples": per, "pairs": pairs, "means": means},
                      claims=claims_of(at, where))
    first = mean_table(at, ["label"], ["mean_cosine", "frac_negative"])
    finding.stats = {"where": where, "means": {f"{r.label}/{r.measure}": {"mean": r.mean, "ci": [r.lo, r.hi],
                                                                           "n": r.n} for r in first.itertuples()}}
    finding.figures[NAME] = plot(at, pairs.merge(at[["label", "step"]].drop_duplicates()), means, where)
    return finding


def plot(at: pd.DataFrame, pairs: pd.DataFrame, means: pd.DataFrame, where: str) -> object:
    import seaborn as sns

    labels = style.order(at["label"].unique())
    pal, sty = style.palette(labels), style.styles(labels)
    fig, axes = style.new_figure(3, title=TITLE)
    ax = axes[0]
    for lab in labels:
        x = pairs.loc[pairs["label"] == lab, "cosine"]
        sns.histplot(x=x, ax=ax, stat="density", element="step", fill=False, color=pal[lab],
                     linestyle=sty[lab].linestyle, linewidth=1.6, bins=40, label=style.display(lab))
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

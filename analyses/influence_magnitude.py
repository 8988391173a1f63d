"""Finding 2 -- influence magnitude: RFT rollouts (and correct rollouts used for SFT) move prior knowledge less
than SFT's gold answers.

From each influence folder: per training sample u, its gradient norm ‖g(u)‖ (``train_norm``) and its mean
absolute kernel with the probes, mean_o |K(o,u)| (η·|K| is the first-order change of a probe's log p after one
SGD step of size η on u). A training sample is the unit: means get bootstrap intervals over samples, and the
claims compare sources by the ratio of means, mean(source) / mean(SFT), at the earliest checkpoint every
source shares (normally the base model). The figure also follows the means over checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from dynamics.analyses import style
from dynamics.analyses.loader import Study, common_step
from dynamics.analyses.stats import Claim, Finding, mean_table, ratio_ci

NAME = "influence_magnitude"
TITLE = "Influence magnitude on prior knowledge, per data source"
MEASURES = {"train_norm": ("gradient norm", "‖∇θ log p(y|x)‖"),
            "mean_abs_kernel": ("influence on prior knowledge", "|K| averaged over probes, nats per unit lr")}


def needs(study: Study) -> str | None:
    return None if study.influence else "no influence folder (influence.parquet)"


def ratio_claims(at: pd.DataFrame, where: str, measures: dict[str, tuple[str, str]], key: str, adjective: str,
                 expected: str = "<") -> list[Claim]:
    """RFT and SFT on rollouts against SFT: the ratio of the means of each measure, with its interval."""
    claims = []
    for src, short in style.COMPARED_WITH_SFT:
        for col, (noun, detail) in measures.items():
            claims.append(against_sft(Claim(
                f"{short}_{key}_{col}", f"{src} training samples have a {adjective} {noun} than SFT's",
                f"ratio of the means of the {noun} ({detail}) {where}, {src} / SFT", expected,  # type: ignore[arg-type]
                null=1.0), at, col, src, ratio_ci))
    return claims


def against_sft(claim: Claim, at: pd.DataFrame, col: str, src: str, interval: Callable) -> Claim:
    """Set ``claim``'s estimate and interval to ``interval(x, y)`` of column ``col`` over the training samples of
    source ``src`` (x) and of SFT (y), each source's representative label in ``at``; say so in its detail."""
    rep = style.representatives(at["label"].unique())
    a, b = rep.get(src), rep.get("SFT")
    if a and b:
        claim.estimate, claim.ci = interval(at.loc[at["label"] == a, col], at.loc[at["label"] == b, col])
        claim.detail = f"bootstrap over training samples ({style.display(a)} vs {style.display(b)})"
    else:
        claim.detail = f"needs influence of both {src} and SFT data"
    return claim


def analyse(study: Study) -> Finding:
    """Tables ``samples`` (per training sample and checkpoint) and ``means`` (per source and checkpoint, with
    intervals); the magnitude claims; the figure."""
    per = study.influence_samples()
    at, where = common_step(per)
    means = mean_table(per, ["label", "step"], list(MEASURES))
    finding = Finding(NAME, TITLE, tables={"samples": per, "means": means},
                      claims=ratio_claims(at, where, MEASURES, "smaller", "smaller"))
    first = mean_table(at, ["label"], list(MEASURES))
    finding.stats = {"where": where, "means": {f"{r.label}/{r.measure}": {"mean": r.mean, "ci": [r.lo, r.hi],
                                                                           "n": r.n} for r in first.itertuples()}}
    finding.figures[NAME] = plot(per, at, means, where)
    return finding


def plot(per: pd.DataFrame, at: pd.DataFrame, means: pd.DataFrame, where: str) -> object:
    labels = style.order(per["label"].unique())
    fig, axes = style.new_figure(3, title=TITLE)
    style.box_strip(axes[0], at, "train_norm", labels, log=True)
    axes[0].set(title="Gradient norm per sample", ylabel="‖∇θ log p(y|x)‖")
    style.box_strip(axes[1], at, "mean_abs_kernel", labels, log=True)
    axes[1].set(title="Influence on probes per sample", ylabel="mean |K| over probes (nats per unit lr)")
    k = means[means["measure"] == "mean_abs_kernel"]
    if k["step"].nunique() > 1:
        style.ci_lines(axes[2], k, labels)
        axes[2].set(title="Over training", xlabel="checkpoint step", ylabel="mean |K| (nats per unit lr)")
        axes[2].set_yscale("log")
        style.plain_log_ticks(axes[2])
    else:
        style.note(axes[2], "one checkpoint only:\nno trend over training")
        axes[2].set_title("Over training")
    return style.finish(fig, axes, f"Boxes and points: one per training sample, {where}. Error bars: 95% "
                                   "bootstrap CI over training samples.")

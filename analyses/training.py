"""Training curves: loss, mean reward (RFT) and gradient norm over steps, from each run's ``metrics.jsonl`` --
the diagnostics behind the learning curves (did each run train, and how smoothly?)."""

from __future__ import annotations

import pandas as pd

from dynamics.analyses import style
from dynamics.analyses.loader import Study
from dynamics.analyses.stats import Finding

NAME = "training_curves"
TITLE = "Training curves"
PANELS = (("loss", "Training loss", "loss (SFT: nats/token)"),
          ("reward_mean", "Mean reward (RFT)", "reward (hit + accuracy + format)"),
          ("grad_norm", "Gradient norm", "‖gradient‖ (L2, before clipping)"))


def needs(study: Study) -> str | None:
    return None if study.run_groups("metrics.jsonl") else "no run folder with metrics.jsonl"


def analyse(study: Study) -> Finding:
    """Table ``metrics`` (every run's rows with its ``label`` and ``group``); the first and last loss (and
    reward) of each run; the figure (mean over seeds, min–max band)."""
    groups = study.run_groups("metrics.jsonl")
    df = pd.concat([r.metrics.assign(label=r.label, group=g) for g, rs in groups.items() for r in rs],
                   ignore_index=True)
    stats = {}
    for label, part in df.groupby("label"):
        stats[label] = {"steps": int(part["step"].max()), "loss_first": float(part["loss"].iloc[0]),
                        "loss_last": float(part["loss"].iloc[-1])}
        if "reward_mean" in part and part["reward_mean"].notna().any():
            r = part["reward_mean"].dropna()
            stats[label].update(reward_first=float(r.iloc[0]), reward_last=float(r.iloc[-1]))
    finding = Finding(NAME, TITLE, tables={"metrics": df}, stats=stats)
    finding.figures[NAME] = plot(df)
    return finding


def plot(df: pd.DataFrame) -> object:
    panels = [p for p in PANELS if p[0] in df and df[p[0]].notna().any()]
    order = style.order(df["group"].unique())
    sty = style.styles(order)
    fig, axes = style.new_figure(len(panels), title=TITLE)
    for ax, (col, title, ylabel) in zip(axes, panels, strict=True):
        for g in order:
            part = df[df["group"] == g].dropna(subset=[col])
            if not part.empty:
                s = sty[g]
                style.mean_band(ax, part, "step", col, 1.0, style.LineStyle(s.color, s.linestyle, ""),
                                style.display(g))
        ax.set(title=title, ylabel=ylabel)
        style.step_axis(ax)
    seeds = df.groupby("group")["label"].nunique().max() > 1
    return style.finish(fig, axes, "Lines: mean over seeds; bands: min–max over seeds." if seeds else None)

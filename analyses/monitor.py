"""Beyond the study -- the live interference monitor: its forecast of probe log p during training against the
log p measured at its refreshes.

From each run's ``monitor.jsonl`` (:mod:`dynamics.train.monitor`). Between two refreshes r₀ < r₁ the monitor
predicts, for each probe o, the change Σ_{r₀ < s ≤ r₁} ⟨g_{r₀}(o), Δθ_s⟩ of log π(y_o|x_o) (first order, probe
gradients held at r₀, Δθ_s the update the optimiser made at step s) and measures log π(y_o|x_o) at r₁. The figure
draws the measured mean probe log p at the refreshes and the forecast path (each refresh's measurement plus the
cumulative predictions after it). Claim: forecast and measured changes correlate (Pearson r over probes ×
intervals, bootstrap interval over those pairs).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dynamics.analyses import style
from dynamics.analyses.loader import Study
from dynamics.analyses.stats import Claim, Finding, bootstrap_ci
from dynamics.store import read_jsonl_rows

NAME = "monitor"
TITLE = "Live interference monitor: forecast vs measured probe log p"


def _runs(study: Study) -> dict:
    return {label: r for label, r in study.runs.items() if r.has("monitor.jsonl")}


def needs(study: Study) -> str | None:
    return None if _runs(study) else "no run folder with monitor.jsonl (dynamics train ... --monitor PROBES)"


def tables(rows: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``path`` (per step and forecast ``segment`` -- the refresh it starts from: the forecast mean log p, and the
    measured one at refreshes) and ``intervals`` (per refresh interval and probe: predicted and measured change)."""
    rows = sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])  # a resumed run repeats steps
    path, pairs = [], []
    start, base, cum = 0, None, None  # the last refresh: its step, measured log p per probe, predictions since
    for r in rows:
        if base is not None and "predicted_dlogp_per_probe" in r:
            cum = cum + np.asarray(r["predicted_dlogp_per_probe"])
            path.append({"step": r["step"], "segment": start, "forecast": float(np.mean(base + cum)),
                         "measured": np.nan})
        measured = r.get("measured_logp_per_probe")
        if measured is not None:
            if base is not None:
                change = np.asarray(measured) - base
                pairs += [{"start": start, "end": r["step"], "probe": i, "predicted": float(p), "measured": float(m)}
                          for i, (p, m) in enumerate(zip(cum, change, strict=True))]
            start, base, cum = r["step"], np.asarray(measured), np.zeros(len(measured))
            path.append({"step": r["step"], "segment": start, "forecast": float(np.mean(base)),
                         "measured": float(np.mean(base))})
    return pd.DataFrame(path), pd.DataFrame(pairs, columns=["start", "end", "probe", "predicted", "measured"])


def _pearson(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x - x.mean(axis, keepdims=True)
    y = y - y.mean(axis, keepdims=True)
    return (x * y).sum(axis) / np.sqrt((x * x).sum(axis) * (y * y).sum(axis))


def analyse(study: Study) -> Finding:
    """Tables ``path`` and ``intervals`` (with the run ``label``), one claim per run, the figure."""
    paths, intervals, claims = [], [], []
    for label, run in _runs(study).items():
        path, pairs = tables(read_jsonl_rows(run.path / "monitor.jsonl"))
        paths.append(path.assign(label=label))
        intervals.append(pairs.assign(label=label))
        c = Claim(f"forecast_{label}", f"The monitor's forecast of probe log p follows the measured change "
                  f"({style.display(label)})", "Pearson r between predicted and measured change of each probe's "
                  "log p over each refresh interval", ">")
        if len(pairs) >= 3:
            x, y = pairs["predicted"].to_numpy(), pairs["measured"].to_numpy()
            c.estimate = float(_pearson(x, y))
            c.ci = bootstrap_ci((x, y), _pearson, paired=True)
            c.detail = f"{len(pairs)} probe × interval pairs, paired bootstrap"
        else:
            c.detail = "needs at least 3 probe × interval pairs (more refreshes or probes)"
        claims.append(c)
    path, pairs = pd.concat(paths, ignore_index=True), pd.concat(intervals, ignore_index=True)
    finding = Finding(NAME, TITLE, tables={"path": path, "intervals": pairs}, claims=claims)
    finding.stats = {c.key: {"r": c.estimate, "ci": c.ci} for c in claims}
    finding.figures[NAME] = plot(path, pairs)
    return finding


def plot(path: pd.DataFrame, pairs: pd.DataFrame) -> object:
    labels = style.order(path["label"].unique())
    sty = style.styles(labels)
    fig, axes = style.new_figure(2, title=TITLE)
    ax = axes[0]
    for label in labels:
        p = path[path["label"] == label]
        s = sty[label]
        m = p.dropna(subset=["measured"])
        ax.plot(m["step"], m["measured"], color=s.color, marker="o", linestyle="none",
                label=f"{style.display(label)}: measured")
        for i, (_, seg) in enumerate(p.groupby("segment")):  # one forecast path from each refresh
            ax.plot(seg["step"], seg["forecast"], color=s.color, linestyle="--",
                    label=f"{style.display(label)}: forecast" if i == 0 else None)
    ax.set(title="Mean probe log p over training", ylabel="log p (nats, summed over tokens)")
    style.step_axis(ax)
    ax = axes[1]
    for label in labels:
        q = pairs[pairs["label"] == label]
        ax.scatter(q["predicted"], q["measured"], s=14, color=sty[label].color, alpha=0.7)
    if len(pairs):
        lim = float(np.nanmax(np.abs(pairs[["predicted", "measured"]].to_numpy()))) * 1.1 or 1.0
        ax.plot([-lim, lim], [-lim, lim], color="#999999", linewidth=0.8)
    ax.axhline(0, color="#cccccc", linewidth=0.6)
    ax.axvline(0, color="#cccccc", linewidth=0.6)
    ax.set(title="Per probe, per refresh interval", xlabel="forecast change of log p", ylabel="measured change")
    return style.finish(fig, axes[:1], "Forecast: each refresh's measurement plus the cumulative first-order "
                        "predictions ⟨g(o), Δθ⟩ of the steps after it. Right: diagonal = perfect forecast.")

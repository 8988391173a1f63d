"""Finding 6 -- which knowledge is hurt: forgetting and influence per probe category.

Forgetting per category: the change of each ``<metric>/<category>`` key of ``eval.jsonl`` from the first
evaluation to the last step every run group reached (mean over seeds); with a per-item ``eval.parquet`` the
interval is a bootstrap over that category's probes (per-probe change at the last evaluation at or before that
step). Influence per category: for each training sample, the mean cosine and mean kernel over the category's
probes; means over samples with bootstrap intervals, at the earliest checkpoint every data source shares.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pandas as pd

from dynamics.analyses import style
from dynamics.analyses.learning_forgetting import logp_metric, tidy_curves, value_at
from dynamics.analyses.loader import Study, common_step
from dynamics.analyses.stats import Finding, mean_ci, mean_table, spearman

NAME = "knowledge_categories"
TITLE = "Which prior knowledge is hurt: forgetting and influence per probe category"
UNITS = {"probe_accuracy": "change of probe accuracy (points)", "probe_logp": "change of log p (nats/token)",
         "probe_logp_base": "change of log p of base responses (nats/token)"}


def _has_categories(study: Study) -> bool:
    return any(any("/" in c and c.startswith("probe_") for c in r.eval.columns)
               for rs in study.run_groups("eval.jsonl").values() for r in rs)


def needs(study: Study) -> str | None:
    if study.influence or _has_categories(study):
        return None
    return "no per-category probe metrics in eval.jsonl and no influence folder"


def forgetting_table(study: Study) -> pd.DataFrame:
    """Per run group, category and metric: start, end, change (mean over seeds), its interval when a per-item
    table allows one, and the step compared."""
    curves = tidy_curves(study)
    curves = curves[curves["category"] != ""]
    if curves.empty:
        return pd.DataFrame(columns=["group", "category", "metric", "start", "end", "change", "lo", "hi", "step"])
    runs = study.run_groups("eval.jsonl")
    logp = logp_metric([r for rs in runs.values() for r in rs])
    curves = curves[curves["metric"].isin(["probe_accuracy", logp])]
    horizon = curves.groupby("label")["step"].max().min()
    rows = []
    for (group, category, metric), part in curves.groupby(["group", "category", "metric"]):
        per_run = []
        for _, run_part in part.groupby("label"):
            run_part = run_part.sort_values("step")
            start = run_part["value"].iloc[0]
            end = float(value_at((run_part["step"].to_numpy(float), run_part["value"].to_numpy(float)), horizon))
            per_run.append((start, end))
        start, end = np.mean(per_run, axis=0)
        lo = hi = math.nan
        if len(runs[group]) == 1:
            ci = _item_ci(runs[group][0], category, metric, horizon)
            if ci is not None:
                lo, hi = ci
        rows.append({"group": group, "source": style.source_of(group), "category": category, "metric": metric,
                     "start": start, "end": end, "change": end - start, "lo": lo, "hi": hi, "step": horizon})
    return pd.DataFrame(rows)


def _item_ci(run, category: str, metric: str, horizon: float) -> tuple[float, float] | None:
    """Bootstrap interval of a category's change from the run's per-item table, when its per-item values
    reproduce the stored category summary at the compared step."""
    items = run.eval_items
    if items is None or "category" not in items:
        return None
    sub = items[(items["kind"] == "probe") & (items["category"].astype(str) == category)]
    col = "correct" if metric.endswith("accuracy") else None
    steps = sorted(s for s in sub["step"].unique() if s <= horizon)
    if not steps:
        return None
    first, last = steps[0], steps[-1]
    summary = run.eval.set_index("step").get(f"{metric}/{category}")
    if summary is None or last not in summary.index:
        return None
    for c in ([col] if col else [c for c in sub.columns if str(c).startswith("logp")]):
        wide = sub.pivot_table(index="item_id", columns="step", values=c, aggfunc="first").astype(float)
        if last not in wide or first not in wide:
            continue
        if not np.isclose(wide[last].mean(), summary.loc[last], rtol=1e-5, atol=1e-6):
            continue
        _, ci = mean_ci((wide[last] - wide[first]).dropna().to_numpy())
        return ci
    return None


def _category_sums(categories: pd.Series, t: pd.DataFrame) -> pd.DataFrame:
    """Per (step, probe category, training sample) of a batch of influence rows: sums and counts of cosine and K."""
    t = t.assign(category=t["probe_id"].map(categories).fillna("uncategorised"))
    return t.groupby(["step", "category", "train_id"]).agg(cosine=("cosine", "sum"), n_cosine=("cosine", "count"),
                                                           kernel=("kernel", "sum"), n_kernel=("kernel", "count"))


def influence_table(study: Study) -> tuple[pd.DataFrame, str]:
    """Per influence source and probe category: mean over training samples of the per-sample mean cosine and
    mean kernel over the category's probes, with bootstrap intervals over samples."""
    frames = []
    for label, inf in study.influence.items():
        s = inf.reduce(partial(_category_sums, inf.probe_categories),
                       columns=("step", "train_id", "probe_id", "kernel", "cosine"))
        frames.append(pd.DataFrame({"mean_cosine": s["cosine"] / s["n_cosine"],
                                    "mean_kernel": s["kernel"] / s["n_kernel"]}).reset_index().assign(label=label))
    if not frames:
        return pd.DataFrame(), ""
    per, where = common_step(pd.concat(frames, ignore_index=True))
    return mean_table(per, ["label", "category"], ["mean_cosine", "mean_kernel"], n_resamples=1000), where


def analyse(study: Study) -> Finding:
    """Tables ``forgetting`` (per run group and category) and ``influence`` (per source and category); the most
    hurt category per run and the least aligned per source; the figure."""
    forgetting = forgetting_table(study) if _has_categories(study) else pd.DataFrame()
    influence, where = influence_table(study)
    finding = Finding(NAME, TITLE, tables={"forgetting": forgetting, "influence": influence})
    stats: dict = {"where": where}
    if not forgetting.empty:
        key = forgetting[forgetting["metric"] != "probe_accuracy"]
        key = key if not key.empty else forgetting
        stats["most_hurt"] = {g: p.loc[p["change"].idxmin(), "category"] for g, p in key.groupby("group")}
        stats["forgetting"] = {f"{r.group}/{r.category}/{r.metric}": {"change": r.change, "ci": [r.lo, r.hi]}
                               for r in forgetting.itertuples()}
    if not influence.empty:
        cos = influence[influence["measure"] == "mean_cosine"]
        stats["least_aligned"] = {lab: p.loc[p["mean"].idxmin(), "category"] for lab, p in cos.groupby("label")}
        if not forgetting.empty:
            stats["rank_agreement"] = _agreement(forgetting, influence)
    finding.stats = stats
    finding.figures[NAME] = plot(forgetting, influence, where)
    return finding


def _agreement(forgetting: pd.DataFrame, influence: pd.DataFrame) -> dict:
    """Spearman ρ over categories between a source's mean kernel and the forgetting (log p change) of the run
    group of the same source: do the categories its data push down most get forgotten most? (No interval: few
    categories.)"""
    out = {}
    f = forgetting[forgetting["metric"] != "probe_accuracy"]
    k = influence[influence["measure"] == "mean_kernel"]
    runs, infs = style.representatives(f["group"].unique()), style.representatives(k["label"].unique())
    for src in sorted(set(runs) & set(infs)):
        a = f[f["group"] == runs[src]].set_index("category")["change"]
        b = k[k["label"] == infs[src]].set_index("category")["mean"]
        common = a.index.intersection(b.index)
        if len(common) >= 3:
            out[src] = {"rho": float(spearman(a[common].to_numpy(), b[common].to_numpy())), "n_categories": len(common)}
    return out


def _bars(ax, table: pd.DataFrame, key: str, value: str, labels: list[str], categories: list[str],
          scale: float = 1.0) -> None:
    sty = style.styles(labels)
    height = 0.8 / max(len(labels), 1)
    for i, lab in enumerate(labels):
        part = table[table[key] == lab].set_index("category").reindex(categories)
        y = np.arange(len(categories)) + (i - (len(labels) - 1) / 2) * height
        m = scale * part[value].to_numpy(float)
        lo, hi = scale * part["lo"].to_numpy(float), scale * part["hi"].to_numpy(float)
        err = np.vstack([np.nan_to_num(m - lo), np.nan_to_num(hi - m)]).clip(min=0)
        ax.barh(y, m, height=height * 0.9, xerr=err if np.isfinite(lo).any() else None, capsize=2,
                color=sty[lab].color, alpha=0.85, label=style.display(lab), error_kw={"linewidth": 0.9})
    ax.set_yticks(range(len(categories)), categories)
    ax.axvline(0, color="#555555", linewidth=0.9)
    ax.invert_yaxis()


def plot(forgetting: pd.DataFrame, influence: pd.DataFrame, where: str) -> object:
    panels = []
    if not forgetting.empty:
        panels += [("forgetting", m) for m in forgetting["metric"].unique()]
    if not influence.empty:
        panels.append(("influence", "mean_cosine"))
    cats = sorted(set(forgetting.get("category", [])) | set(influence.get("category", [])))
    fig, axes = style.new_figure(len(panels), title=TITLE, width=4.6, height=max(3.0, 0.55 * len(cats) + 1.6))
    for ax, (kind, metric) in zip(axes, panels, strict=True):
        if kind == "forgetting":
            part = forgetting[forgetting["metric"] == metric]
            scale = 100.0 if metric == "probe_accuracy" else 1.0
            _bars(ax, part, "group", "change", style.order(part["group"].unique()), cats, scale)
            step = part["step"].iloc[0]
            what = "accuracy" if metric == "probe_accuracy" else "log p"
            ax.set(title=f"Probe {what}: change by step {step:g}", xlabel=UNITS.get(metric, metric))
        else:
            part = influence[influence["measure"] == metric]
            _bars(ax, part, "label", "mean", style.order(part["label"].unique()), cats)
            ax.set(title="Alignment of training data", xlabel="mean cosine with the category's probes")
    parts = (["change from the first evaluation (negative = forgotten)"] if not forgetting.empty else []) + \
        ([f"mean cosine {where}"] if not influence.empty else [])
    return style.finish(fig, axes, f"Bars: {'; '.join(parts)}. Error bars: 95% bootstrap CI where per-item data "
                                   "allow.")

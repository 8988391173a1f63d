"""Finding 1 -- learning vs forgetting: SFT learns the novel task fast but forgets prior knowledge; RFT learns
slowly and preserves it; SFT on RFT-style rollouts learns fast and forgets less.

Read from each run's ``eval.jsonl``. For run groups A, B
(seeds of one configuration form a group) and a horizon H = the last step both reached:

* learning speed = area under the task-accuracy curve over [s₀, H] divided by H − s₀ (trapezoids; the mean
  accuracy over training so far);
* forgetting at equal steps = probe metric at H minus at s₀ (probe accuracy, and the per-token log p of the
  base model's own probe responses, ``probe_logp_base``, when stored; else ``probe_logp``);
* forgetting at matched novel-task accuracy = the same change at the first step each group's mean task
  accuracy reaches a = min(best accuracy of A, of B) (linear interpolation between evaluations).

Intervals: with several seeds, a pooled-variance t-interval over seeds; with one seed per group and a per-item
``eval.parquet`` in both runs, a paired bootstrap over evaluation items (the matched steps held fixed); else none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dynamics.analyses import style
from dynamics.analyses.loader import Run, Study
from dynamics.analyses.stats import Claim, Finding, bootstrap_ci, t_interval_diff

NAME = "learning_forgetting"
TITLE = "Learning the novel task vs forgetting prior knowledge"
TASK, PACC = "task_accuracy", "probe_accuracy"
LABELS = {TASK: "novel-task accuracy (%)", PACC: "probe accuracy (%)",
          "probe_logp": "probe log p, gold answers (nats/token)",
          "probe_logp_base": "probe log p, base responses (nats/token)"}
PERCENT = (TASK, PACC)
Curve = tuple[np.ndarray, np.ndarray]  # (steps, values)


def needs(study: Study) -> str | None:
    """Why this recipe cannot run on ``study`` (None when it can)."""
    return None if study.run_groups("eval.jsonl") else "no run folder with eval.jsonl"


def logp_metric(runs: list[Run]) -> str:
    """The log p measure of forgetting: base responses' log p when every run stores it, else gold answers'."""
    return "probe_logp_base" if all("probe_logp_base" in r.eval and r.eval["probe_logp_base"].notna().any()
                                    for r in runs) else "probe_logp"


def tidy_curves(study: Study) -> pd.DataFrame:
    """Long table of every stored evaluation: ``label, group, seed, source, step, metric, category, value``
    (``category`` is empty for the overall metrics, else the ``<metric>/<category>`` key's category)."""
    rows = []
    for group, runs in study.run_groups("eval.jsonl").items():
        for run in runs:
            ev = run.eval
            for col in ev.columns:
                if col == "step" or not col.startswith(("task_", "probe_")):
                    continue
                metric, _, category = col.partition("/")
                part = ev[["step", col]].dropna().rename(columns={col: "value"})
                rows.append(part.assign(label=run.label, group=group, seed=run.seed, source=style.source_of(group),
                                        metric=metric, category=category))
    cols = ["label", "group", "seed", "source", "step", "metric", "category", "value"]
    return pd.concat(rows, ignore_index=True)[cols] if rows else pd.DataFrame(columns=cols)


# --------------------------------------------------------------------------------- run-level statistics
def curve_of(run: Run, metric: str) -> Curve | None:
    """(steps, values) of one stored metric of a run (the evaluations that hold it); None when none does."""
    ev = run.eval
    if metric not in ev:
        return None
    ev = ev.dropna(subset=[metric])
    return (ev["step"].to_numpy(float), ev[metric].to_numpy(float)) if len(ev) else None


def value_at(curve: Curve, at: float) -> np.ndarray:
    """The curve at step ``at``, linearly interpolated (held constant beyond the ends, as np.interp);
    ``values`` may carry leading batch axes (bootstrap replicates)."""
    steps, values = curve
    values = np.asarray(values, float)
    if at <= steps[0] or len(steps) == 1:
        return values[..., 0]
    i = min(int(np.searchsorted(steps, at, side="right")) - 1, len(steps) - 1)
    if i == len(steps) - 1:
        return values[..., -1]
    w = (at - steps[i]) / (steps[i + 1] - steps[i])
    return (1 - w) * values[..., i] + w * values[..., i + 1]


def auc(curve: Curve, horizon: float) -> np.ndarray:
    """Mean of the curve over [first step, horizon]: trapezoidal area / length (the value itself at length 0)."""
    steps, values = curve
    values = np.asarray(values, float)
    inside = steps < horizon
    xs = np.append(steps[inside], horizon)
    ys = np.concatenate([values[..., inside], value_at(curve, horizon)[..., None]], axis=-1)
    return ys[..., 0] if xs[-1] == xs[0] else np.trapezoid(ys, xs, axis=-1) / (xs[-1] - xs[0])


def change(curve: Curve, at: float) -> np.ndarray:
    """Value at step ``at`` (interpolated) minus the first value."""
    return value_at(curve, at) - np.asarray(curve[1], float)[..., 0]


def first_reach(curve: Curve, level: float) -> float | None:
    """The first step at which the curve reaches ``level`` (linear interpolation), None if it never does."""
    steps, values = curve
    above = np.flatnonzero(values >= level - 1e-12)
    if not len(above):
        return None
    i = int(above[0])
    if i == 0:
        return float(steps[0])
    s0, s1, v0, v1 = steps[i - 1], steps[i], values[i - 1], values[i]
    return float(s0 + (level - v0) / (v1 - v0) * (s1 - s0))


def mean_curve(runs: list[Run], metric: str) -> Curve | None:
    """The group's curve averaged over seeds at each step; None when a run does not store ``metric``."""
    curves = [curve_of(r, metric) for r in runs]
    if any(c is None for c in curves):
        return None
    df = pd.concat([pd.Series(v, index=s) for s, v in curves]).groupby(level=0).mean()
    return df.index.to_numpy(float), df.to_numpy(float)


def _item_matrix(run: Run, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(item ids, steps, items × steps values) from the run's ``eval.parquet`` for ``metric``: ``correct`` of the
    task or probe items for accuracies; for log p, the probe column whose per-step mean reproduces the stored
    summary (so the interval is about the very number reported). None when not available."""
    items = run.eval_items
    if items is None:
        return None
    kind = "task" if metric.startswith("task_") else "probe"
    sub = items[items["kind"] == kind]
    if sub.empty:
        return None
    summary = run.eval.set_index("step")[metric]
    if metric.endswith("accuracy"):
        candidates = ["correct"]
    else:
        candidates = [c for c in sub.columns if c.startswith("logp") and pd.api.types.is_numeric_dtype(sub[c])]
    for col in candidates:
        wide = sub.pivot_table(index="item_id", columns="step", values=col, aggfunc="first").dropna(axis=0)
        steps = wide.columns.to_numpy(float)
        if wide.empty or not set(steps) <= set(summary.index):
            continue
        if np.allclose(wide.mean(axis=0).to_numpy(), summary.loc[wide.columns].to_numpy(), rtol=1e-5, atol=1e-6):
            return wide.index.to_numpy(), steps, wide.to_numpy(float)
    return None


def compare_groups(a: list[Run], b: list[Run], metric: str, stat_a: Callable[[Curve], float],
                   stat_b: Callable[[Curve], float], seed: int = 0
                   ) -> tuple[float | None, tuple[float, float] | None, str]:
    """stat_a(A's curve of ``metric``) − stat_b(B's), averaged over seeds; its interval; where that comes from."""
    ca, cb = [curve_of(r, metric) for r in a], [curve_of(r, metric) for r in b]
    if any(c is None for c in ca + cb):
        return None, None, f"{metric} is not stored in every run's eval.jsonl"
    va = np.array([float(stat_a(c)) for c in ca])
    vb = np.array([float(stat_b(c)) for c in cb])
    if not (np.isfinite(va).all() and np.isfinite(vb).all()):
        return None, None, "not measurable"
    if len(a) + len(b) > 2:
        est, ci = t_interval_diff(va, vb)
        return est, ci, f"t-interval over seeds ({len(a)} vs {len(b)})"
    est = float(va[0] - vb[0])
    ma, mb = _item_matrix(a[0], metric), _item_matrix(b[0], metric)
    if ma is None or mb is None:
        return est, None, "one seed and no per-item eval.parquet: no interval"
    ids = np.array(sorted(set(ma[0]) & set(mb[0])))
    if len(ids) < 2:
        return est, None, "no common evaluation items: no interval"
    (sa, xa), (sb, xb) = (ma[1], ma[2][_rows(ma[0], ids)]), (mb[1], mb[2][_rows(mb[0], ids)])

    def replicate(idx: np.ndarray, axis: int = -1) -> np.ndarray:  # idx: (..., items) resampled item rows
        idx = np.asarray(idx, int)
        return stat_a((sa, xa[idx].mean(-2))) - stat_b((sb, xb[idx].mean(-2)))

    ci = bootstrap_ci((np.arange(len(ids)),), replicate, n_resamples=1000, seed=seed)
    return est, ci, f"paired bootstrap over {len(ids)} evaluation items"


def _rows(have: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Row indices of ``want`` ids within ``have``."""
    pos = {v: i for i, v in enumerate(have)}
    return np.array([pos[v] for v in want])


# ------------------------------------------------------------------------------------------------ claims
@dataclass
class Groups:
    """Run groups (seeds of one configuration) and the log p measure of forgetting they all store."""

    runs: dict[str, list[Run]]
    logp: str

    def horizon(self, *groups: str) -> float:
        return min(float(r.eval["step"].max()) for g in groups for r in self.runs[g])

    def start(self, *groups: str) -> float:
        return max(float(r.eval["step"].min()) for g in groups for r in self.runs[g])


def learn_claim(g: Groups, key: str, statement: str, x: str | None, y: str | None) -> Claim:
    claim = Claim(key, statement, "area under the novel-task accuracy curve / steps (the mean accuracy so far)", ">")
    if not (x and y):
        claim.detail = "needs both runs"
        return claim
    h = g.horizon(x, y)
    claim.measure = (f"mean novel-task accuracy over steps {g.start(x, y):g}-{h:g} (area under the learning curve "
                     f"/ steps), {style.display(x)} − {style.display(y)}")
    claim.estimate, claim.ci, claim.detail = compare_groups(g.runs[x], g.runs[y], TASK, lambda c: auc(c, h),
                                                            lambda c: auc(c, h))
    return claim


def forget_claim(g: Groups, key: str, statement: str, x: str | None, y: str | None, metric: str,
                  expected: str, matched: bool = False) -> Claim:
    what = LABELS[metric].replace(" (%)", "")
    claim = Claim(key, statement, f"change of {what}", expected)  # type: ignore[arg-type]
    if not (x and y):
        claim.detail = "needs both runs"
        return claim
    if matched:
        cx, cy = mean_curve(g.runs[x], TASK), mean_curve(g.runs[y], TASK)
        if cx is None or cy is None:
            claim.detail = "not measurable: task_accuracy is not stored in every run's eval.jsonl"
            return claim
        level = min(cx[1].max(), cy[1].max())
        if level <= max(cx[1][0], cy[1][0]) + 1e-9:
            claim.detail = "not measurable: one run's task accuracy never rose above its starting value"
            return claim
        sx, sy = first_reach(cx, level), first_reach(cy, level)
        claim.measure = (f"change of {what} from the start to the step where novel-task accuracy first reaches "
                         f"{100 * level:.0f}% ({style.display(x)}: step {sx:.0f}, {style.display(y)}: step "
                         f"{sy:.0f}), {style.display(x)} − {style.display(y)}")
    else:
        sx = sy = g.horizon(x, y)
        claim.measure = (f"change of {what} from the first evaluation to step {sx:g} (equal steps), "
                         f"{style.display(x)} − {style.display(y)}")
    claim.estimate, claim.ci, claim.detail = compare_groups(
        g.runs[x], g.runs[y], metric, lambda c: change(c, sx), lambda c: change(c, sy))
    if metric in PERCENT and claim.estimate is not None:
        claim.measure += " (fraction, 1 = 100 points)"
    return claim


def claims_of(runs: dict[str, list[Run]]) -> list[Claim]:
    """The study's claims about learning and forgetting, measured on these run groups."""
    g = Groups(runs, logp_metric([r for rs in runs.values() for r in rs]))
    rep = style.representatives(runs)
    sft, rft, ro = rep.get("SFT"), rep.get("RFT"), rep.get("SFT on rollouts")
    return [
        learn_claim(g, "sft_learns_faster", "SFT learns the novel task faster than RFT", sft, rft),
        forget_claim(g, "sft_forgets_more", "SFT forgets more prior knowledge than RFT (log p, equal steps)",
                      sft, rft, g.logp, "<"),
        forget_claim(g, "sft_forgets_more_accuracy", "SFT forgets more prior knowledge than RFT (probe accuracy, "
                      "equal steps)", sft, rft, PACC, "<"),
        forget_claim(g, "sft_forgets_more_matched", "SFT forgets more prior knowledge than RFT at matched "
                      "novel-task accuracy (log p)", sft, rft, g.logp, "<", matched=True),
        learn_claim(g, "rollouts_learn_fast", "SFT on RFT-style rollouts learns the novel task faster than RFT",
                     ro, rft),
        forget_claim(g, "rollouts_forget_less", "SFT on rollouts forgets less than SFT on gold answers (log p, "
                      "equal steps)", ro, sft, g.logp, ">"),
        forget_claim(g, "rollouts_forget_less_matched", "SFT on rollouts forgets less than SFT on gold answers at "
                      "matched novel-task accuracy (log p)", ro, sft, g.logp, ">", matched=True),
    ]


def run_table(runs: dict[str, list[Run]], logp: str) -> pd.DataFrame:
    """One row per run: first and last evaluated step, the metrics there, and mean task accuracy (AUC)."""
    rows = []
    for group, rs in runs.items():
        for r in rs:
            c = {m: cv for m in (TASK, PACC, logp) if (cv := curve_of(r, m)) is not None}
            first, last = float(r.eval["step"].min()), float(r.eval["step"].max())
            rows.append({"label": r.label, "group": group, "seed": r.seed, "source": style.source_of(group),
                         "first_step": first, "last_step": last,
                         **{f"{m}_first": float(c[m][1][0]) for m in c}, **{f"{m}_last": float(c[m][1][-1]) for m in c},
                         **{f"{m}_change": float(change(c[m], last)) for m in c},
                         **({"task_auc": float(auc(c[TASK], last))} if TASK in c else {})})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ figures
def plot_curves(curves: pd.DataFrame, logp: str) -> object:
    """Novel-task accuracy, probe accuracy and probe log p over steps, and forgetting against learning."""
    overall = curves[curves["category"] == ""]
    groups = style.order(overall["group"].unique())
    sty = style.styles(groups)
    fig, axes = style.new_figure(4, title=TITLE, width=4.0)
    target = "base model's responses" if logp == "probe_logp_base" else "gold answers"
    panels = ((TASK, "Novel task (learning)", LABELS[TASK]), (PACC, "Prior knowledge: accuracy", LABELS[PACC]),
              (logp, f"Prior knowledge: log p\n(of the {target})", "probe log p per token (nats)"))
    for ax, (metric, title, ylabel) in zip(axes, panels, strict=False):
        scale = 100.0 if metric in PERCENT else 1.0
        for g in groups:
            part = overall[(overall["group"] == g) & (overall["metric"] == metric)]
            if not part.empty:
                style.mean_band(ax, part, "step", "value", scale, sty[g], style.display(g))
        ax.set(title=title, ylabel=ylabel)
        style.step_axis(ax)
        if scale == 100.0:
            ax.set_ylim(-3, 103)
    ax = axes[3]
    for g in groups:
        wide = overall[overall["group"] == g].pivot_table(index="step", columns="metric", values="value")
        if {TASK, logp} <= set(wide.columns):
            ax.plot(100 * wide[TASK], wide[logp] - wide[logp].iloc[0], markersize=4, **sty[g].kw(),
                    label=style.display(g))
    ax.axhline(0, color="#999999", linewidth=0.8)
    ax.set(title="Forgetting vs learning", xlabel=LABELS[TASK], ylabel="change of probe log p (nats/token)")
    seeds = len(overall["seed"].dropna().unique()) > 1
    return style.finish(fig, axes, "Lines: mean over seeds; bands: min–max over seeds." if seeds else None)


def analyse(study: Study) -> Finding:
    """Tables ``curves`` (tidy, every stored evaluation) and ``runs`` (one row per run), the learning and
    forgetting claims, and the figure."""
    runs = study.run_groups("eval.jsonl")
    logp = logp_metric([r for rs in runs.values() for r in rs])
    curves = tidy_curves(study)
    table = run_table(runs, logp)
    finding = Finding(NAME, TITLE, tables={"curves": curves, "runs": table}, claims=claims_of(runs))
    finding.stats = {"logp_metric": logp, "runs": table.set_index("label").to_dict(orient="index")}
    finding.figures[NAME] = plot_curves(curves, logp)
    return finding

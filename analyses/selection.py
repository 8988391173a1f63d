"""Beyond the study -- choosing the data: SFT on the whole gold set vs on the gold set pruned by ``dynamics
select`` vs on simulated rollouts, at equal steps: what the choice of data buys in retained prior knowledge, and
what it costs in learning speed.

Runs are the SFT groups of the study folder whose label names the data they trained on: ``sft`` (gold),
``sft-select`` (the gold set after ``dynamics select``), ``sft-rollouts`` (RFT-simulated rollouts) and
``sft-rollouts-base`` (rollouts of the base model) when present. Measures and intervals are those of
:mod:`dynamics.analyses.learning_forgetting`: learning speed = mean novel-task accuracy over the steps both runs
reached, forgetting = change of the probes' per-token log p of the base model's own responses at equal steps.
Claims: the selected set forgets less than the gold set; and it learns as fast (difference of learning speed
> 0), so that a cost in learning speed shows as "did not hold", with its interval.
"""

from __future__ import annotations

import numpy as np

from dynamics.analyses import style
from dynamics.analyses.learning_forgetting import (
    Groups,
    forget_claim,
    learn_claim,
    logp_metric,
    run_table,
)
from dynamics.analyses.loader import Study
from dynamics.analyses.stats import Finding

NAME = "selection"
TITLE = "Choosing the data: full gold set vs selected set vs simulated rollouts (SFT, equal steps)"
DATA = {"sft": "gold (all)", "sft-select": "gold, selected", "sft-rollouts": "rollouts (RFT model)",
        "sft-rollouts-base": "rollouts (base model)"}


def _groups(study: Study) -> dict:
    return {g: rs for g, rs in study.run_groups("eval.jsonl").items() if g in DATA}


def needs(study: Study) -> str | None:
    groups = _groups(study)
    return None if {"sft", "sft-select"} <= set(groups) else "needs the runs sft and sft-select (eval.jsonl)"


def analyse(study: Study) -> Finding:
    """Table ``runs`` (per run: task accuracy AUC, probe changes at equal steps), two claims, the figure."""
    runs = _groups(study)
    logp = logp_metric([r for rs in runs.values() for r in rs])
    g = Groups(runs, logp)
    claims = [
        forget_claim(g, "select_forgets_less", "SFT on the select-ed gold set forgets less than on the whole gold "
                     "set (log p, equal steps)", "sft-select", "sft", logp, ">"),
        learn_claim(g, "select_learns_as_fast", "SFT on the select-ed gold set learns the novel task as fast as on "
                    "the whole gold set", "sft-select", "sft"),
    ]
    horizon = g.horizon(*runs)
    table = run_table(runs, logp)
    table["data"] = table["group"].map(DATA)
    finding = Finding(NAME, TITLE, tables={"runs": table}, claims=claims)
    finding.stats = {"horizon": horizon, "logp_metric": logp,
                     "runs": table.set_index("label")[["data", "task_auc", f"{logp}_change", "probe_accuracy_change"]]
                     .to_dict(orient="index")}
    finding.figures[NAME] = plot(table, logp)
    return finding


def plot(table, logp: str) -> object:
    order = [g for g in DATA if g in set(table["group"])]
    sty = style.styles(order)
    fig, axes = style.new_figure(2, title=TITLE)
    panels = (("task_auc", "Learning: mean novel-task accuracy", "accuracy (%)", 100.0),
              (f"{logp}_change", "Forgetting: change of probe log p", "Δ log p per token (nats)", 1.0))
    for ax, (col, title, ylabel, scale) in zip(axes, panels, strict=True):
        for i, grp in enumerate(order):
            vals = scale * table.loc[table["group"] == grp, col].to_numpy(float)
            ax.bar(i, np.mean(vals), width=0.6, color=sty[grp].color, alpha=0.8, label=style.display(grp))
            ax.scatter(np.full(len(vals), i), vals, color="black", s=12, zorder=3)
        ax.set_xticks(range(len(order)), [style.wrap(DATA[grp]) for grp in order])
        ax.axhline(0, color="#555555", linewidth=0.9)
        ax.set(title=title, ylabel=ylabel)
    return style.finish(fig, axes[:1], "Bars: mean over seeds (points: runs), from the first evaluation to the last "
                        "step all runs reached. Learning = area under the task-accuracy curve / steps.")

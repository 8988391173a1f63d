"""Finding 5 -- correct vs incorrect rollouts: how positively and negatively rewarded samples push on prior
knowledge.

For rollout training sets (records with a ``reward``; ``advantage`` as stored, else the GRPO advantage
reward − mean reward of the rollouts of the same prompt), split by the sign of the advantage. GRPO's update is
θ ← θ + η·mean_u A_u g(u), so to first order it changes a probe's log p by η·mean_u A_u K(o,u): the *push* on
probe o, per unit learning rate, summed from its positive-advantage part (correct samples reinforced) and its
negative-advantage part (incorrect samples suppressed). Claims (on the RFT rollouts): positively rewarded
samples have smaller gradients (ratio of means) and are better aligned with the probes (difference of mean
cosines) than negatively rewarded ones; intervals bootstrap over samples; the push's over probes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dynamics.analyses import style
from dynamics.analyses.loader import InfluenceSet, Study, common_step
from dynamics.analyses.stats import Claim, Finding, diff_ci, mean_ci, mean_table, ratio_ci

NAME = "rollout_sign"
TITLE = "Correct vs incorrect rollouts: how rewarded samples push on prior knowledge"
GROUPS = ("positive", "negative", "zero")
GROUP_COLORS = {"positive": style.OKABE_ITO["sky blue"], "negative": style.OKABE_ITO["reddish purple"],
                "zero": "#8C8C8C", "total": style.OKABE_ITO["black"]}
GROUP_NAMES = {"positive": "advantage > 0\n(reinforced)", "negative": "advantage < 0\n(suppressed)",
               "zero": "advantage = 0\n(no gradient)"}


def rewards_of(study: Study, inf: InfluenceSet) -> pd.DataFrame | None:
    """``train_id, reward, advantage`` of an influence folder's training records (or, failing that, of the
    run rollouts with the same ids); None when they carry no rewards."""
    from dynamics.data import text_of

    recs = inf.train_records
    if all("reward" in r for r in recs):
        df = pd.DataFrame({"train_id": [r["id"] for r in recs], "reward": [float(r["reward"]) for r in recs],
                           "advantage": [r.get("advantage") for r in recs],
                           "prompt": [text_of(r["prompt"]) for r in recs]})
    else:
        runs = [r.rollouts for r in study.runs.values() if r.has("rollouts.jsonl")]
        ids = {r["id"] for r in recs}
        pool = pd.concat(runs, ignore_index=True).drop_duplicates("id") if runs else pd.DataFrame(columns=["id"])
        if not ids or not ids <= set(pool["id"]):
            return None
        df = pool[pool["id"].isin(ids)].rename(columns={"id": "train_id"})[["train_id", "reward", "advantage",
                                                                            "prompt"]]
    adv = pd.to_numeric(df["advantage"], errors="coerce")
    if adv.isna().any():  # GRPO's (unscaled) group advantage
        adv = adv.fillna(df["reward"] - df.groupby("prompt")["reward"].transform("mean"))
    df = df.assign(advantage=adv, group=np.select([adv > 1e-12, adv < -1e-12], ["positive", "negative"], "zero"))
    return df.drop(columns="prompt")


def _rewarded(study: Study) -> dict[str, pd.DataFrame]:
    return {label: df for label, inf in study.influence.items() if (df := rewards_of(study, inf)) is not None}


def needs(study: Study) -> str | None:
    if not study.influence:
        return "no influence folder (influence.parquet)"
    return None if _rewarded(study) else "no influence folder computed on rollouts with rewards"


def push_table(inf: InfluenceSet, rewards: pd.DataFrame, step: float) -> pd.DataFrame:
    """Per probe: predicted change of its log p per unit learning rate under GRPO's update, mean_u A_u K(o,u),
    and its parts from positive- and negative-advantage samples."""
    advantage = rewards.set_index("train_id")["advantage"]

    def sums(t: pd.DataFrame) -> pd.DataFrame:
        t = t[(t["step"] == step) & t["train_id"].isin(advantage.index)]
        a = t["train_id"].map(advantage).astype(float)  # float even when no row is at this step
        push = t["kernel"] * a
        return pd.DataFrame({"total": push, "positive": push.where(a > 0, 0.0),
                             "negative": push.where(a < 0, 0.0)}).groupby(t["probe_id"]).sum()

    per = inf.per_sample
    n = per.loc[(per["step"] == step) & per["train_id"].isin(advantage.index), "train_id"].nunique()
    return (inf.reduce(sums, columns=("step", "train_id", "probe_id", "kernel")) / n).reset_index()


def analyse(study: Study) -> Finding:
    """Tables ``samples`` (per rollout: reward, advantage, sign group, influence) and ``push`` (per probe); the
    claims on the RFT rollouts (else the first rewarded set); the figure."""
    rewarded = _rewarded(study)
    frames, pushes = [], []
    for label, rw in rewarded.items():
        per, where = common_step(study.influence[label].per_sample.assign(label=label))
        frames.append(per.merge(rw, on="train_id"))
        step = float(per["step"].iloc[0])
        pushes.append(push_table(study.influence[label], rw, step).assign(label=label, step=step))
    samples, push = pd.concat(frames, ignore_index=True), pd.concat(pushes, ignore_index=True)
    main = style.representatives(rewarded).get("RFT") or sorted(rewarded)[0]
    s = samples[samples["label"] == main]
    pos, neg = s[s["group"] == "positive"], s[s["group"] == "negative"]
    step = float(s["step"].iloc[0])
    claims = [
        Claim("positive_smaller_norm", "Positively rewarded rollouts have smaller gradients than negatively "
              "rewarded ones", f"ratio of mean ‖∇θ log p(y|x)‖, advantage > 0 / advantage < 0, "
              f"{style.display(main)} at checkpoint step {step:g}", "<", null=1.0),
        Claim("positive_better_aligned", "Positively rewarded rollouts are better aligned with prior knowledge "
              "than negatively rewarded ones", f"difference of the mean per-sample cosine with probe gradients, "
              f"advantage > 0 − advantage < 0, {style.display(main)} at checkpoint step {step:g}", ">")]
    if len(pos) >= 2 and len(neg) >= 2:
        claims[0].estimate, claims[0].ci = ratio_ci(pos["train_norm"], neg["train_norm"])
        claims[1].estimate, claims[1].ci = diff_ci(pos["mean_cosine"], neg["mean_cosine"])
        for c in claims:
            c.detail = f"bootstrap over samples ({len(pos)} positive, {len(neg)} negative)"
    else:
        for c in claims:
            c.detail = f"needs ≥ 2 rollouts of each sign ({len(pos)} positive, {len(neg)} negative)"
    means = mean_table(samples, ["label", "group"], ["train_norm", "mean_abs_kernel", "mean_cosine"])
    p = push[push["label"] == main]
    net = {part: dict(zip(("mean", "ci"), mean_ci(p[part]), strict=True)) for part in ("total", "positive", "negative")}
    finding = Finding(NAME, TITLE, tables={"samples": samples, "push": push, "means": means}, claims=claims)
    finding.stats = {"set": main, "step": step, "counts": s["group"].value_counts().to_dict(), "push": net,
                     "means": {f"{r.label}/{r.group}/{r.measure}": {"mean": r.mean, "ci": [r.lo, r.hi], "n": r.n}
                               for r in means.itertuples()}}
    finding.figures[NAME] = plot(s, p, main, step)
    return finding


def plot(s: pd.DataFrame, push: pd.DataFrame, label: str, step: float) -> object:
    groups = [g for g in GROUPS if (s["group"] == g).any()]
    names = {g: GROUP_NAMES[g] for g in groups}
    fig, axes = style.new_figure(3, title=f"{TITLE} ({style.display(label)}, step {step:g})")
    data = s.assign(group=s["group"].map(names))
    colors = {names[g]: GROUP_COLORS[g] for g in groups}
    style.box_strip(axes[0], data, "train_norm", list(names.values()), x="group", log=True, colors=colors)
    axes[0].set(title="Gradient norm per rollout", ylabel="‖∇θ log p(y|x)‖")
    style.box_strip(axes[1], data, "mean_cosine", list(names.values()), x="group", colors=colors)
    axes[1].axhline(0, color="#555555", linewidth=0.9)
    axes[1].set(title="Alignment with the probes", ylabel="mean cosine over probes")
    ax = axes[2]
    parts = [("positive", "from\nadvantage > 0"), ("negative", "from\nadvantage < 0"), ("total", "total")]
    for i, (part, _) in enumerate(parts):
        m, ci = mean_ci(push[part])
        err = [[m - ci[0]], [ci[1] - m]] if ci else None
        ax.bar(i, m, yerr=err, capsize=4, width=0.6, alpha=0.6 if part != "total" else 0.8, color=GROUP_COLORS[part],
               edgecolor=GROUP_COLORS[part])
    ax.axhline(0, color="#555555", linewidth=0.9)
    ax.set_xticks(range(len(parts)), [name for _, name in parts])
    ax.set(title="Predicted push on probe log p", ylabel="Δ log p per unit lr (nats)")
    return style.finish(fig, axes[:2], "Boxes and points: one per rollout. Bars: GRPO's first-order change of "
                        "probe log p per unit learning rate, mean over probes with 95% bootstrap CI.")

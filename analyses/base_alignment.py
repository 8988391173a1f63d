"""Finding 4 -- alignment with the base model: RFT data sit closer to the base model's distribution, and the
samples the base model already finds likely are the ones that disturb its prior knowledge least.

Read from a ``dynamics compare --model BASE`` output (``samples.parquet``): each training sample's per-token
log p under the base model, log π₀(y|x)/|y| (perplexity = exp of minus it). Influence magnitude per sample
comes from the same table when compare was given ``--influence``, else from the study's influence folders
joined by ``train_id`` (at the earliest checkpoint each shares). Claims: the difference of mean per-token
log p between sources -- paired by prompt where the sets answer the same prompts (``prompt_key``; the fair
comparison, since likelihood depends on the prompt), else unpaired -- and Spearman's ρ between per-token
log p and ‖g(u)‖ over all samples, expected negative; intervals bootstrap over prompts or samples.
"""

from __future__ import annotations

import pandas as pd

from dynamics.analyses import style
from dynamics.analyses.compare import paired_by_prompt
from dynamics.analyses.loader import CompareOutput, Study, common_step
from dynamics.analyses.stats import Claim, Finding, diff_ci, mean_table, spearman_ci

NAME = "base_alignment"
TITLE = "Alignment with the base model: likelihood of each training set and its influence"
INFLUENCE = ("train_norm", "mean_abs_kernel", "mean_cosine")


def _compare_output(study: Study) -> CompareOutput | None:
    """The compare output with base-model log p (``compare`` first, else the first by name)."""
    for label in sorted(study.compares, key=lambda k: (k != "compare", k)):
        out = study.compares[label]
        if "logp_mean" in out.samples.columns and out.samples["logp_mean"].notna().any():
            return out
    return None


def needs(study: Study) -> str | None:
    if not study.compares:
        return "no compare output (dynamics compare --model BASE ...)"
    return None if _compare_output(study) else "no compare output with base-model log p (run compare with --model)"


def samples_of(study: Study) -> tuple[pd.DataFrame, str]:
    """Per-sample log p under the base model joined with influence magnitude; which compare output was used."""
    out = _compare_output(study)
    assert out is not None
    samples = out.samples.dropna(subset=["logp_mean"]).copy()
    if "train_norm" not in samples.columns and study.influence:
        per, _ = common_step(study.influence_samples())
        per = per.rename(columns={"train_id": "id"}).astype({"id": str})[["id", *INFLUENCE]].drop_duplicates("id")
        samples = samples.astype({"id": str}).merge(per, on="id", how="left")
    return samples, str(out.path)


def claims_of(samples: pd.DataFrame) -> list[Claim]:
    rep = style.representatives(samples["label"].unique())
    claims = []
    for src, short in style.COMPARED_WITH_SFT:
        claim = Claim(f"{short}_closer_to_base", f"{src} data are more likely under the base model than SFT data",
                      f"difference of mean per-token log p under the base model (nats/token), {src} − SFT", ">")
        a, b = rep.get(src), rep.get("SFT")
        if not (a and b):
            claim.detail = f"needs compare output for both {src} and SFT data"
        elif paired := paired_by_prompt(samples, a, b, "logp_mean"):
            claim.estimate, claim.ci = paired["paired_diff"], (paired["paired_diff_lo"], paired["paired_diff_hi"])
            claim.measure = (f"mean over the {paired['n_paired']} prompts both answer of the difference in per-token "
                             f"log p under the base model (nats/token), {src} − SFT")
            claim.detail = f"paired by prompt, bootstrap over prompts; Wilcoxon p = {paired['wilcoxon_p']:.2g}"
        else:
            claim.estimate, claim.ci = diff_ci(samples.loc[samples["label"] == a, "logp_mean"],
                                               samples.loc[samples["label"] == b, "logp_mean"])
            claim.detail = f"no shared prompts: unpaired, bootstrap over samples ({style.display(a)} vs " \
                           f"{style.display(b)})"
        claims.append(claim)
    claim = Claim("likelihood_predicts_magnitude", "Samples more likely under the base model have smaller gradients",
                  "Spearman ρ between per-token log p under the base model and ‖∇θ log p(y|x)‖, all samples", "<")
    if "train_norm" in samples.columns:
        both = samples.dropna(subset=["logp_mean", "train_norm"])
        if len(both) >= 3:
            claim.estimate, claim.ci = spearman_ci(both["logp_mean"], both["train_norm"])
            claim.detail = f"bootstrap over {len(both)} samples"
    if claim.estimate is None:
        claim.detail = "needs influence of the compared data sets"
    claims.append(claim)
    return claims


def analyse(study: Study) -> Finding:
    """Tables ``samples`` and ``means`` (per source); the alignment claims; the figure."""
    samples, source = samples_of(study)
    means = mean_table(samples, ["label"], [c for c in ("logp_mean", "ppl", "n_tokens") if c in samples])
    finding = Finding(NAME, TITLE, tables={"samples": samples, "means": means}, claims=claims_of(samples))
    rho = {}
    if "train_norm" in samples.columns:
        for label, part in samples.dropna(subset=["logp_mean", "train_norm"]).groupby("label"):
            if len(part) >= 3:
                r, ci = spearman_ci(part["logp_mean"], part["train_norm"])
                rho[label] = {"rho": r, "ci": list(ci) if ci else None, "n": len(part)}
    finding.stats = {"compare": source, "spearman_by_source": rho,
                     "means": {f"{r.label}/{r.measure}": {"mean": r.mean, "ci": [r.lo, r.hi], "n": r.n}
                               for r in means.itertuples()}}
    finding.figures[NAME] = plot(samples, finding.claim("likelihood_predicts_magnitude"))
    return finding


def plot(samples: pd.DataFrame, rho: Claim) -> object:
    import seaborn as sns

    labels = style.order(samples["label"].unique())
    pal, sty = style.palette(labels), style.styles(labels)
    has_norm = "train_norm" in samples.columns and samples["train_norm"].notna().any()
    fig, axes = style.new_figure(2 if has_norm else 1, title=TITLE, width=5.2)
    ax = axes[0]
    for lab in labels:
        x = samples.loc[samples["label"] == lab, "logp_mean"]
        sns.ecdfplot(x=x, ax=ax, color=pal[lab], linestyle=sty[lab].linestyle, linewidth=1.8,
                     label=f"{style.display(lab)} (n={len(x)})")
    ax.set(title="Likelihood under the base model", xlabel="log p per token under the base model (nats)",
           ylabel="fraction of samples ≤ x")
    if has_norm:
        ax = axes[1]
        for lab in labels:
            part = samples[samples["label"] == lab]
            ax.scatter(part["logp_mean"], part["train_norm"], s=14, alpha=0.7, color=pal[lab],
                       marker=sty[lab].marker, edgecolors="none")
        ax.set_yscale("log")
        style.plain_log_ticks(ax)
        if rho.estimate is not None:
            ci = f"\n95% CI [{rho.ci[0]:.2f}, {rho.ci[1]:.2f}]" if rho.ci else ""
            ax.text(0.97, 0.96, f"Spearman ρ = {rho.estimate:.2f}{ci}", transform=ax.transAxes, ha="right",
                    va="top", fontsize=9.5, bbox={"facecolor": "white", "edgecolor": "#bbbbbb", "alpha": 0.9})
        ax.set(title="Likelihood vs gradient norm", xlabel="log p per token under the base model (nats)",
               ylabel="‖∇θ log p(y|x)‖")
    return style.finish(fig, axes, "Each point is one training sample; ρ with its 95% bootstrap CI over samples."
                        if has_norm else None)

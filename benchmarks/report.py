"""RESULTS.md and the scaling figure from the rows of :mod:`benchmarks.influence`."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from dynamics.store import atomic_path

SWEEPS = {"n_train": "N_train", "tokens": "sequence length (tokens)"}


def memory(row: dict) -> float | None:
    if row.get("status") != "ok":
        return None
    return row.get("cuda_peak_mb", row.get("extra_mb"))


def exponent(xs: list[float], ys: list[float]) -> float | None:
    """Slope of log y against log x (the fitted power), from at least three points."""
    if len(xs) < 3:
        return None
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def _groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        out[(r["model"], r["sweep"])].append(r)
    return out


def _series(rows: list[dict], sweep: str) -> dict[str, tuple[list, list]]:
    key = "n_train" if sweep == "n_train" else "tokens"
    series: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for r in rows:
        if r.get("status") == "ok":
            series[r["method"]][0].append(r[key])
            series[r["method"]][1].append(r["seconds"])
    return series


def write_figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    if not groups:
        return
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    panels = list(groups)  # one per (model, sweep) that has rows, two to a row
    ncols = min(2, len(panels))
    fig, axes = plt.subplots(-(-len(panels) // ncols), ncols, figsize=(8.5 * ncols, 4.8 * -(-len(panels) // ncols)),
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    cmap = plt.get_cmap("tab20")
    names = list(dict.fromkeys(r["method"] for r in rows))
    for ax, (model, sweep) in zip(axes.flat, panels, strict=False):
        series = _series(groups[(model, sweep)], sweep)
        for name, (xs, ys) in series.items():
            k = exponent(xs, ys)
            style = "-" if name.startswith("dynamics") else ("--" if "floor" in name else ":")
            ax.loglog(xs, ys, style, marker="o", ms=3, color=cmap(names.index(name) % 20),
                      label=f"{name} (slope {k:.2f})" if k is not None else name)
        ax.set_xlabel(SWEEPS[sweep])
        ax.set_ylabel("seconds")
        fixed = groups[(model, sweep)][0]
        other = f"tokens ≈ {fixed['tokens']}" if sweep == "n_train" else f"N_train = {fixed['n_train']}"
        ax.set_title(f"{model}, {fixed['device']} {fixed['dtype']}: time against {SWEEPS[sweep]} ({other}, "
                     f"{fixed['n_probes']} probes)", fontsize=10)
        sizes = sorted({x for xs, _ in series.values() for x in xs})
        if sizes:
            ax.set_xticks(sizes)
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("Train x probe gradient kernel: time against size (log-log; slope = fitted exponent)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _fmt_s(x: float) -> str:
    return f"{x:.3g} s" if x < 100 else f"{x:.0f} s"


def _cell(row: dict, baseline: bool) -> str:
    if row.get("status") != "ok":
        return _short(row.get("status", ""))
    mem = memory(row)
    if baseline or "time_ratio" not in row:
        return f"**{_fmt_s(row['seconds'])}**, {mem:.0f} MB"
    return f"{row['time_ratio']:.2f}× / {row['mem_ratio']:.2f}×"


def _short(status: str) -> str:
    if status.startswith("over"):
        return "over cap"
    if status.startswith("skipped"):
        return "skipped"
    if status.startswith("not installed"):
        return "not installed"
    return "failed"


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, checked on every size measured."""
    from benchmarks.influence import BASELINE, BY_NAME

    lines = []
    exact_miss, exact_n, floor_ratios, proj = [], 0, [], []
    by_case: dict[tuple, dict] = defaultdict(dict)
    for r in rows:
        by_case[(r["model"], r["n_train"], r["tokens"])][r["method"]] = r
    for case, methods in by_case.items():
        label = f"{case[0]} N={case[1]} T={case[2]}"
        for name, r in methods.items():
            m = BY_NAME.get(name)
            if m is None or name.startswith("dynamics") or m.kind not in ("exact", "projected"):
                continue
            if "time_ratio" not in r:
                continue
            if m.kind == "exact":
                exact_n += 1
                if r["time_ratio"] < 1:
                    exact_miss.append(f"{label}: {name} takes {r['time_ratio']:.2f}× {BASELINE[name]}")
            else:
                base = methods.get(BASELINE[name], {})
                proj.append(f"{label}: {name} {r['time_ratio']:.2f}× the time of {BASELINE[name]}; error "
                            f"{r.get('rel_fro', math.nan):.3f} against {base.get('rel_fro', math.nan):.3f}")
        fl, dyn = methods.get("forward+backward (floor)"), methods.get("dynamics exact linear")
        if fl and dyn and fl.get("status") == "ok" and dyn.get("status") == "ok":
            floor_ratios.append((label, dyn["seconds"] / fl["seconds"]))
    verdict = "met" if not exact_miss else f"missed on {len(exact_miss)} of {exact_n} comparisons"
    lines.append(f"- **dynamics exact ahead of every exact peer on every size** (same scope, {exact_n} comparisons): "
                 f"{verdict}.")
    lines += [f"  - {x}" for x in exact_miss]
    if floor_ratios:
        slow = [f"{lb}: {x:.2f}×" for lb, x in floor_ratios if x > 1]
        lines.append(f"- **no slower than one standard batched forward+backward** (dynamics exact linear over the "
                     f"floor; ≤ 1 needed): {'met on every size' if not slow else f'missed on {len(slow)} of {len(floor_ratios)} sizes'}; "
                     f"ratios {min(x for _, x in floor_ratios):.2f}× to {max(x for _, x in floor_ratios):.2f}×.")
        lines += [f"  - {x}" for x in slow]
    if proj:
        lines.append("- **projected mode against projected peers at equal feature dimension** (ratio > 1: the peer "
                     "is slower; errors: relative Frobenius error of the peer, then of dynamics):")
        lines += [f"  - {x}" for x in proj]
    return lines


HAND_MARK = "<!-- written by hand below: kept when the tables above are regenerated -->"


def _where(machine: dict) -> str:
    return f"{machine.get('gpu', machine['cpu'])}, transformers {machine['transformers']}"


def write_results(reports: list[dict], path: Path, figure: Path) -> None:
    """RESULTS.md from one or more runs (their rows merged; each run's command listed); whatever follows
    :data:`HAND_MARK` in the existing file is kept after the new tables."""
    from benchmarks.influence import BASELINE, BY_NAME, K_DIM

    rows = [r for rep in reports for r in rep["rows"]]
    report = reports[-1]
    mach = report["machine"]
    where = {_where(rep["machine"]) for rep in reports}
    runs = [f"    {rep['command']}    # {rep['minutes']:.0f} min" + (f", {_where(rep['machine'])}" if len(where) > 1 else "")
            for rep in reports]
    out = ["# Influence benchmark: dynamics against the tools people would use instead", "",
           "Produced by" + (" these runs (rows merged; each case's methods ran in one run on the same inputs)"
                            if len(reports) > 1 else ""), "", *runs, "",
           ("last run " if len(where) > 1 else "")
           + f"on {mach.get('gpu', mach['cpu'])} ({mach['cores']} cores, {mach['torch_threads']} torch threads, "
           f"{mach['ram_gb']} GiB RAM{', shared with other jobs: load average ' + str(mach.get('load_avg', '?')) + ' when the run ended' if 'gpu' not in mach else ''}), Python "
           f"{mach['python']}, torch {mach['torch']}, transformers {mach['transformers']}, opacus {mach['opacus']}, "
           f"bergson {mach['bergson']}, kronfluence {mach['kronfluence']}; first run started "
           f"{reports[0]['started']}" + ("; each run's machine is named beside its command" if len(where) > 1
                                         else "") + ".", "",
           "Every method computes the train × probe kernel K[u, o] = ⟨g(u), g(o)⟩ (g: gradient of the summed "
           "completion log-likelihood) from the same encoded samples, in its own fresh subprocess after one "
           "untimed forward+backward on one sample and a garbage collection whose survivors are then frozen (so that a "
           "full collection, 0.2 s with transformers loaded, does not land in one method's call at random). Time is that call's wall clock"
           " (in sections marked warm: the method's second call, after one untimed call of its own); memory is the subprocess's peak RSS above its RSS "
           "before the call (on CUDA: peak allocated GPU memory). Scopes: `linear` = every nn.Linear weight as "
           "used by its module (the tied output head as a head), `all` = every parameter, `body` = the linear "
           "layers of `model.base_model` (what bergson hooks). Each peer is compared with dynamics on its own "
           "scope; projected peers with the dynamics projection of the same feature dimension "
           f"(kron: 32 × 32 per layer against bergson per-module p = 32; jl: {K_DIM} against bergson global "
           f"{K_DIM}). Cells: time ratio / memory ratio against the baseline row named in the last column "
           "(> 1: slower / more memory than dynamics); baseline rows show absolute numbers in bold. Err: "
           "largest relative Frobenius error against dynamics exact on the same scope over the sizes (for "
           "dynamics exact rows: against the naive loop).", "",
           "## Targets", "", *targets(rows), "", f"![scaling]({Path('..') / figure.parent.name / figure.name})", ""]
    for (model, sweep), group in _groups(rows).items():
        key = "n_train" if sweep == "n_train" else "tokens"
        sizes = sorted({r[key] for r in group})
        fixed = group[0]
        other = f"tokens ≈ {fixed['tokens']}" if sweep == "n_train" else f"N_train = {fixed['n_train']}"
        series = _series(group, sweep)
        out += [f"## {model}: {SWEEPS[sweep]} sweep ({other}, {fixed['n_probes']} probes, batch "
                f"{fixed['batch_size']}, {fixed['device']} {fixed['dtype']}"
                f"{', warm: second call in each process' if fixed.get('warm') else ''})", "",
                "| method | scope | " + " | ".join(f"{key}={s}" for s in sizes) + " | exponent | err | against |",
                "|---|---|" + "---|" * len(sizes) + "---|---|---|"]
        names = list(dict.fromkeys(r["method"] for r in group))
        for name in names:
            cells = {r[key]: r for r in group if r["method"] == name}
            baseline = name in set(BASELINE.values()) or name not in BASELINE
            errs = [r["rel_fro"] for r in cells.values() if "rel_fro" in r]
            k = exponent(*series[name]) if name in series else None
            out.append(f"| {name} | {BY_NAME[name].scope} | " + " | ".join(
                _cell(cells[s], baseline) if s in cells else "" for s in sizes)
                + f" | {'' if k is None else f'{k:.2f}'} | {f'{max(errs):.1e}' if errs else ''} | "
                  f"{'' if baseline else BASELINE[name]} |")
        out.append("")
    failures = sorted({f"{r['method']}: {r['status']}" for r in rows if r.get("status", "ok") not in ("ok",)
                       and not r["status"].startswith("skipped")})
    if failures:
        out += ["## Not measured", "", *[f"- {f}" for f in failures], ""]
    old = path.read_text() if path.exists() else ""
    kept = old[old.index(HAND_MARK):] if HAND_MARK in old else ""  # hand-written sections survive a rewrite
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(out) + ("\n" + kept if kept else ""))

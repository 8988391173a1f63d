"""One look for every figure: the Okabe–Ito colour-blind-safe palette with a fixed colour per data source,
readable fonts, and atomic, byte-reproducible PNG + PDF saving.

Labels (run, influence or data-set names) are mapped to the study's data sources by their words:
``sft`` with ``rollout``/``sim`` is *SFT on rollouts*, ``rft``/``grpo`` is *RFT*, ``sft``/``gold`` is *SFT*,
``base`` is the base model. Labels of one source share its colour and differ by line style and marker.
"""

from __future__ import annotations

import re
import textwrap
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

from dynamics.store import atomic_path  # noqa: E402

# Okabe & Ito (2008), "Color Universal Design"
OKABE_ITO = {"orange": "#E69F00", "sky blue": "#56B4E9", "bluish green": "#009E73", "yellow": "#F0E442",
             "blue": "#0072B2", "vermillion": "#D55E00", "reddish purple": "#CC79A7", "black": "#000000"}
SOURCE_COLORS = {"SFT": OKABE_ITO["vermillion"], "RFT": OKABE_ITO["blue"],
                 "SFT on rollouts": OKABE_ITO["bluish green"], "base": "#6E6E6E"}
SOURCE_ORDER = ("SFT", "RFT", "SFT on rollouts", "base")
COMPARED_WITH_SFT = (("RFT", "rft"), ("SFT on rollouts", "rollouts"))  # the claims' sources and their keys
OTHER_COLORS = (OKABE_ITO["orange"], OKABE_ITO["reddish purple"], OKABE_ITO["sky blue"], OKABE_ITO["black"],
                OKABE_ITO["yellow"])
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v")
# the canonical short labels shown under their source's name
CANONICAL = {"sft": "SFT", "rft": "RFT", "grpo": "RFT", "sft-rollouts": "SFT on rollouts",
             "sft_rollouts": "SFT on rollouts", "sft-on-rollouts": "SFT on rollouts", "base": "base"}
DPI = 150


def source_of(label: str) -> str | None:
    """The study's data source a label belongs to (see the module docstring), or None."""
    words = set(re.split(r"[^a-z0-9]+", label.lower()))
    text = label.lower()
    if "sft" in words and ("rollout" in text or "sim" in text):
        return "SFT on rollouts"
    if words & {"rft", "grpo"}:
        return "RFT"
    if "rollout" in text or "sim" in words or "simulated" in words:
        return "SFT on rollouts"
    if words & {"sft", "gold"}:
        return "SFT"
    if "base" in words:
        return "base"
    return None


def display(label: str) -> str:
    """How a label is written in legends: its source's name for canonical labels, else the label."""
    return CANONICAL.get(label.lower(), label)


def wrap(text: str, width: int = 14) -> str:
    """Break a tick label into lines of at most ``width`` characters, keeping its own line breaks."""
    return "\n".join(textwrap.fill(line, width) for line in text.split("\n"))


def order(labels: Iterable[str]) -> list[str]:
    """Labels sorted by source (SFT, RFT, SFT on rollouts, base, others), then by name."""
    def key(label: str) -> tuple[int, str]:
        src = source_of(label)
        return (SOURCE_ORDER.index(src) if src else len(SOURCE_ORDER), label)

    return sorted(set(labels), key=key)


@dataclass(frozen=True)
class LineStyle:
    color: str
    linestyle: str
    marker: str

    def kw(self) -> dict[str, str]:
        return {"color": self.color, "linestyle": self.linestyle, "marker": self.marker}


def styles(labels: Iterable[str]) -> dict[str, LineStyle]:
    """A fixed colour per source; labels sharing a source get successive line styles and markers."""
    out: dict[str, LineStyle] = {}
    per_source: dict[str, int] = {}
    others = 0
    for label in order(labels):
        src = source_of(label)
        if src is None:
            color = OTHER_COLORS[others % len(OTHER_COLORS)]
            k = others // len(OTHER_COLORS)
            others += 1
        else:
            color = SOURCE_COLORS[src]
            k = per_source.get(src, 0)
            per_source[src] = k + 1
        out[label] = LineStyle(color, LINESTYLES[k % len(LINESTYLES)], MARKERS[k % len(MARKERS)])
    return out


def palette(labels: Iterable[str]) -> dict[str, str]:
    """Label -> colour, for seaborn's ``palette=``."""
    return {k: v.color for k, v in styles(labels).items()}


def new_figure(ncols: int, nrows: int = 1, *, title: str | None = None, width: float = 4.3,
               height: float = 3.5, **kw) -> tuple[plt.Figure, list]:
    """A figure of ``nrows × ncols`` panels in the project style; returns (figure, flat list of axes)."""
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.15,
                  rc={"axes.titleweight": "bold", "legend.frameon": False, "axes.spines.top": False,
                      "axes.spines.right": False})
    total = max(width * ncols, 0.12 * len(title or "") + 1.0)  # wide enough for the title
    fig, axes = plt.subplots(nrows, ncols, figsize=(total, height * nrows + (0.4 if title else 0)),
                             squeeze=False, layout="constrained", **kw)
    if title:
        fig.suptitle(title, fontsize=13, fontweight="bold")
    return fig, list(axes.ravel())


def note(ax, text: str) -> None:
    """Write a short message in an empty panel (e.g. 'needs ≥ 2 checkpoints')."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="#555555",
            wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def save_figure(fig: plt.Figure, stem: str | Path) -> list[Path]:
    """Save ``fig`` as ``stem.png`` and ``stem.pdf``, each atomically, with fixed metadata (no timestamps),
    so that regenerating from the same tables gives the same bytes; the figure is closed."""
    stem = Path(stem)
    paths = []
    for ext, meta in (("png", {"Software": None}), ("pdf", {"CreationDate": None, "Producer": None,
                                                            "Creator": None})):
        path = stem.with_suffix(f".{ext}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=DPI, metadata=meta)
        fig.set_layout_engine("none")  # the PNG laid the figure out; the PDF keeps that layout
        paths.append(path)
    plt.close(fig)
    return paths


def representatives(labels: Iterable[str]) -> dict[str, str]:
    """Source -> the label that stands for it in claims: a canonical label (``sft``, ``rft``, ...) if there is
    one, else the shortest (variants such as ``sft-rollouts-base`` are shown but not used for claims)."""
    out: dict[str, str] = {}
    for label in sorted(set(labels), key=lambda x: (x.lower() not in CANONICAL, len(x), x)):
        src = source_of(label)
        if src is not None and src not in out:
            out[src] = label
    return out


def finish(fig: plt.Figure, axes: list, caption: str | None = None, ncols: int | None = None) -> plt.Figure:
    """One legend for the whole figure under the panels (from the labelled artists of ``axes``), with
    ``caption`` -- how to read the figure -- above its entries (or alone when nothing is labelled)."""
    if caption:  # wrap to the figure's width (8.5 pt characters are about 0.075 inch wide)
        caption = textwrap.fill(caption, int(fig.get_figwidth() / 0.075))
    seen: dict[str, object] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if not lab.startswith("_"):
                seen.setdefault(lab, h)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncols=ncols or min(len(seen), 5),
                   title=caption, title_fontproperties={"size": 8.5})
    elif caption:
        fig.supxlabel(caption, fontsize=8.5, color="#444444")
    return fig


def box_strip(ax, df, column: str, labels: list[str], *, x: str = "label", log: bool = False,
              colors: dict[str, str] | None = None) -> None:
    """One box (quartiles, whiskers to 1.5 IQR) and the individual points per value of ``x`` (in ``labels``
    order), coloured by ``colors`` (default: each label's source colour)."""
    pal = colors or palette(labels)
    values = df[column][df[column] > 0]
    log = bool(log and len(values) and values.max() / values.min() > 3)  # a log axis only for a wide range
    with warnings.catch_warnings():  # seaborn 0.13 still passes matplotlib's deprecated ``vert``
        warnings.filterwarnings("ignore", message=".*vert: bool", category=DeprecationWarning)
        sns.boxplot(data=df, x=x, y=column, order=labels, hue=x, hue_order=labels, palette=pal, showfliers=False,
                    width=0.55, ax=ax, legend=False, boxprops={"alpha": 0.35}, log_scale=log)
    state = np.random.get_state()  # seaborn jitters with the global generator: fix it for identical files
    np.random.seed(0)
    try:
        sns.stripplot(data=df, x=x, y=column, order=labels, hue=x, hue_order=labels, palette=pal, size=2.5,
                      alpha=0.6, jitter=0.25, ax=ax, legend=False)
    finally:
        np.random.set_state(state)
    ax.set_xticks(range(len(labels)), [wrap(display(lab)) for lab in labels])
    ax.set_xlabel("")
    if log:
        plain_log_ticks(ax)


def ci_lines(ax, table, labels: list[str], *, x: str = "step") -> None:
    """Mean (line and markers) with its confidence interval (error bars) per label over ``x``; ``table`` has
    ``label``, ``x``, ``mean``, ``lo``, ``hi``."""
    sty = styles(labels)
    for lab in labels:
        part = table[table["label"] == lab].sort_values(x)
        if part.empty:
            continue
        err = [(part["mean"] - part["lo"]).clip(lower=0), (part["hi"] - part["mean"]).clip(lower=0)]
        ax.errorbar(part[x], part["mean"], yerr=err, capsize=3, markersize=5, linewidth=1.6, label=display(lab),
                    **sty[lab].kw())
    step_axis(ax, "checkpoint step")


def plain_log_ticks(ax, axis: str = "y") -> None:
    """Write a log axis' tick labels as plain numbers (3, 10, 30) rather than powers (3×10⁰)."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(fmt)
    target.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def mean_band(ax, df, x: str, y: str, scale: float, st: LineStyle, label: str) -> None:
    """The mean of ``y`` over runs at each ``x`` as a line, and its min–max over runs as a band."""
    agg = df.groupby(x)[y].agg(["mean", "min", "max", "count"])
    ax.plot(agg.index, scale * agg["mean"], label=label, markersize=4, linewidth=1.8, **st.kw())
    if agg["count"].max() > 1:
        ax.fill_between(agg.index, scale * agg["min"], scale * agg["max"], color=st.color, alpha=0.18, linewidth=0)


def step_axis(ax, label: str = "training step") -> None:
    """Label the x axis with training steps, ticks on whole steps only."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))

"""``dynamics figures``: regenerate every figure from stored results, and say how each was made.

Each recipe of :data:`RECIPES` runs when its inputs are present under the study folder (see
:class:`dynamics.analyses.loader.Study`) and is skipped, with the reason, when they are absent; a present but
malformed input is an error naming the file. Compare outputs are re-plotted from their stored
``samples.parquet``. Nothing stored is recomputed, so the same inputs give the same files, byte for byte.
Writes ``OUT/<figure>.png|pdf``, ``OUT/findings.json`` (every recipe's key statistics and claims),
``OUT/index.json`` (the figures made, each with its title and recipe, and the recipes skipped) and
``OUT/README.md`` (each figure, what it shows, its claims, and the command that made it).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from dynamics.analyses import (
    base_alignment,
    compare,
    influence_direction,
    influence_magnitude,
    knowledge_categories,
    learning_forgetting,
    monitor,
    rollout_sign,
    selection,
    style,
    training,
)
from dynamics.analyses.loader import Study
from dynamics.analyses.stats import Finding
from dynamics.store import write_text

RECIPES: tuple[ModuleType, ...] = (learning_forgetting, training, influence_magnitude, influence_direction,
                                   base_alignment, rollout_sign, knowledge_categories, selection, monitor)


@dataclass
class FiguresConfig:
    """Inputs of ``dynamics figures``: the folder of stored results and where the figures go."""

    runs: Path
    out: Path = Path("figures")


@dataclass
class Made:
    name: str  # figure file stem
    python: str  # the Python call that made it
    title: str
    paths: list[Path]


@dataclass
class FiguresReport:
    made: list[Made] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    findings: dict[str, Finding] = field(default_factory=dict)
    readme: Path | None = None


def _summary(module: ModuleType) -> str:
    """The first paragraph of a recipe's docstring, on one line."""
    return " ".join((module.__doc__ or "").strip().split("\n\n")[0].split())


def make_figures(cfg: FiguresConfig, progress: bool = False) -> FiguresReport:
    """Run every recipe whose inputs are present; save figures, ``findings.json`` and ``README.md``."""
    from rich.progress import track

    study = Study.discover(cfg.runs)
    out = Path(cfg.out)
    report = FiguresReport()
    steps = [*RECIPES, *study.compares]
    for item in track(steps, description="figures", disable=not progress, transient=True):
        if isinstance(item, str):  # a compare output: re-plot its stored samples
            comp = study.compares[item]
            name = "compare" if item == "compare" else f"compare-{item}"
            paths = style.save_figure(compare.plot(comp.samples, f"Training-data distributions ({item})"), out / name)
            python = f"dynamics.analyses.compare.plot(Study.discover({str(cfg.runs)!r}).compares[{item!r}].samples)"
            report.made.append(Made(name, python, f"Training-data distributions ({item})", paths))
            continue
        reason = item.needs(study)
        if reason:
            report.skipped.append((item.NAME, reason))
            continue
        finding = item.analyse(study)
        report.findings[item.NAME] = finding
        for name, fig in finding.figures.items():
            python = f"{item.__name__}.analyse(Study.discover({str(cfg.runs)!r}))"
            report.made.append(Made(name, python, fig.get_suptitle() or finding.title,
                                    style.save_figure(fig, out / name)))
    write_text(out / "findings.json", json.dumps({k: f.to_dict() for k, f in report.findings.items()}, indent=2,
                                                 ensure_ascii=False) + "\n")
    index = {"figures": [{"name": m.name, "title": m.title,
                          "finding": next((n for n, f in report.findings.items() if m.name in f.figures), None)}
                         for m in report.made],
             "skipped": [{"recipe": n, "reason": r} for n, r in report.skipped]}
    write_text(out / "index.json", json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    report.readme = out / "README.md"
    write_text(report.readme, readme(cfg, study, report))
    return report


def readme(cfg: FiguresConfig, study: Study, report: FiguresReport) -> str:
    """``README.md``: the command, the inputs found, and for each figure what it shows and its claims."""
    cmd = f"dynamics figures --runs {shlex.quote(str(cfg.runs))} --out {shlex.quote(str(cfg.out))}"
    lines = ["# Figures", "",
             f"Made by `{cmd}` from the results stored under `{cfg.runs}`; nothing was recomputed. Run the same "
             "command again to regenerate them (same inputs, same files). Key numbers and claims of every figure "
             "are in `findings.json`.", "", "Inputs found:", ""]
    for kind, items in (("runs", study.runs), ("influence", study.influence), ("compare", study.compares)):
        listed = ", ".join(f"`{k}` ({v.path.relative_to(study.root).as_posix() or '.'})" for k, v in items.items())
        lines.append(f"- {kind}: {listed or 'none'}")
    lines.append(f"- probes: `{study.probes.relative_to(study.root)}`" if study.probes else "- probes: none")
    modules = {m.NAME: m for m in RECIPES}
    for made in report.made:
        owner = next((n for n, f in report.findings.items() if made.name in f.figures), None)
        lines += ["", f"## {made.name}: {made.title}", "", f"![{made.title}]({made.name}.png) "
                  f"([PDF]({made.name}.pdf))", ""]
        if owner:
            lines += [_summary(modules[owner]), ""]
        lines.append(f"Made by `{cmd}` (Python: `{made.python}`).")
        if owner and made.name == owner and report.findings[owner].claims:
            lines += ["", "| claim | measured | estimate [95% CI] | verdict |", "|---|---|---|---|"]
            for c in report.findings[owner].claims:
                est = "–" if c.estimate is None else f"{c.estimate:.3g}"
                ci = f" [{c.ci[0]:.3g}, {c.ci[1]:.3g}]" if c.ci else ""
                lines.append(f"| {c.statement} | {c.measure} | {est}{ci} | {c.verdict}"
                             f"{' (' + c.detail + ')' if c.detail else ''} |")
    if report.skipped:
        lines += ["", "## Skipped", ""] + [f"- {name}: {reason}" for name, reason in report.skipped]
    return "\n".join(lines) + "\n"

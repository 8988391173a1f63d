"""The study report: ``report.md`` and a self-contained ``report.html`` (figures inlined) from stored results.

Everything is read from what the stages stored -- ``figures/findings.json`` and ``figures/index.json`` (from
``dynamics figures``), each run's ``eval.jsonl``, ``probes.summary.json``, ``data/*.summary.json`` and the
demo's own ``demo.json`` (plan and stage timings) -- so the numbers in the report are those of the tables, and
the report can be rebuilt at any time without recomputing anything. Markdown and HTML are rendered from one list
of blocks.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

from dynamics.analyses import style
from dynamics.analyses.loader import Study, read_json
from dynamics.store import write_text

EVAL_COLUMNS = (("task_accuracy", "task acc", "{:.0%}"), ("probe_accuracy", "probe acc", "{:.0%}"),
                ("probe_logp_base", "probe log p (own resp., nats/token)", "{:.3f}"))

Block = tuple  # ("h", level, text) | ("p", text) | ("ul", [items]) | ("table", header, rows) | ("img", path, alt)


def fmt_claim(c: dict) -> tuple[str, str]:
    """``estimate [lo, hi]`` and the verdict of a stored claim."""
    est = "–" if c.get("estimate") is None else f"{c['estimate']:.3g}"
    if c.get("ci"):
        est += f" [{c['ci'][0]:.3g}, {c['ci'][1]:.3g}]"
    return est, c["verdict"]


def claim_rows(findings: dict) -> list[list[str]]:
    rows = []
    for f in findings.values():
        for c in f["claims"]:
            est, verdict = fmt_claim(c)
            rows.append([c["statement"], c["measure"], est, f"**{verdict}**" + (f" ({c['detail']})" if c.get("detail")
                                                                                  else "")])
    return rows


def eval_rows(study: Study) -> list[list[str]]:
    """Per run: first and last evaluation of the novel task and the probes, as stored in ``eval.jsonl``."""
    rows = []
    for label in style.order(study.runs):
        run = study.runs[label]
        if not run.has("eval.jsonl"):
            continue
        ev = run.eval
        first, last = ev.iloc[0], ev.iloc[-1]
        cells = [style.display(label), f"{int(first['step'])}→{int(last['step'])}"]
        for col, _, f in EVAL_COLUMNS:
            cells.append(f"{f.format(first[col])} → {f.format(last[col])}" if col in ev else "–")
        rows.append(cells)
    return rows


def _plan_rows(plan: dict) -> list[list[str]]:
    return [[k, f"`{v}`"] for k, v in plan.items()]


def blocks(root: Path, state: dict, why: list[str]) -> list[Block]:
    """The report as blocks (see :data:`Block`)."""
    study = Study.discover(root)
    fig_dir = root / "figures"
    findings = read_json(fig_dir / "findings.json")
    index = read_json(fig_dir / "index.json")
    plan = state.get("plan", {})
    out: list[Block] = [("h", 1, f"dynamics demo ({state.get('plan_name', '?')}): the study on `{plan.get('model')}`")]
    intro = ("SFT and RFT (GRPO) from one base model on a novel task (the text jigsaw), SFT on RFT-simulated "
             "rollouts, and the influence of each training set on prior-knowledge probes, after arXiv 2506.23508. "
             "Every number below is read from the tables stored in this folder.")
    if state.get("plan_name") == "vlm":
        intro = ("**Mechanics only**: the tiny randomly initialised Qwen2.5-VL runs the whole pipeline (image "
                 "jigsaw, visual probes kept whether right or wrong, rollouts unfiltered); its numbers say nothing "
                 "about the study's claims. " + intro)
    out.append(("p", intro))
    out += [("h", 2, "Claims of the study, as measured here"),
            ("p", "Verdicts: *held* (the estimate is on the claimed side and so is its whole 95% interval), "
                  "*inconclusive* (on the claimed side, the interval crosses the null), *did not hold*, "
                  "*not measured* (the reason is given)."),
            ("table", ["claim", "measured as", "estimate [95% CI]", "verdict"], claim_rows(findings))]
    out += [("h", 2, "Learning and forgetting per run (first → last evaluation)"),
            ("table", ["run", "steps", *[name for _, name, _ in EVAL_COLUMNS]], eval_rows(study))]
    probes = root / "probes.summary.json"
    if probes.is_file():
        s = read_json(probes)
        out.append(("p", f"Probes: the base model answered {s['accuracy']:.0%} of {s['n_items']} scored built-in "
                         f"items correctly; {len(study.probes.read_text().splitlines()) if study.probes else 0} of "
                         "those it got right are the probes (an even sample per category)."))
    for name in ("rollouts", "rollouts-base"):
        p = root / "data" / f"{name}.summary.json"
        if p.is_file():
            s = read_json(p)
            acc = "" if s.get("accuracy") is None else f", accuracy {s['accuracy']:.0%}"
            out.append(("p", f"Simulated rollouts (`data/{name}.jsonl`): {s['rollouts']} samples of "
                             f"`{s['model']}` on {s['prompts']} training prompts{acc}; {s['kept']} kept."))
    out.append(("h", 2, "Figures"))
    for fig in index["figures"]:
        out += [("h", 3, fig["title"]), ("img", f"figures/{fig['name']}.png", fig["title"])]
        f = findings.get(fig["finding"] or "")
        if f and f.get("notes"):
            out.append(("ul", f["notes"]))
    if index.get("skipped"):
        out += [("h", 3, "Not drawn"), ("ul", [f"{s['recipe']}: {s['reason']}" for s in index["skipped"]])]
    out += [("h", 2, "What was chosen, and why"), ("ul", why), ("table", ["setting", "value"], _plan_rows(plan))]
    stages = state.get("stages", {})
    if stages:
        rows = [[k, f"{v['seconds']:.0f}", "cached" if v.get("cached") else "ran"] for k, v in stages.items()]
        total = sum(v["seconds"] for v in stages.values() if not v.get("cached"))
        out += [("h", 2, "Where the time went"),
                ("p", f"Stages run this time: {total:.0f} s (seconds of cached stages are from when they ran)."),
                ("table", ["stage", "seconds", "this time"], rows)]
    out += [("h", 2, "Reproduce"),
            ("p", "`dynamics demo --out DIR` (add `--quick`, `--vlm`, `--seeds N`, `--force`); "
                  f"`dynamics figures --runs {root} --out {root}/figures` redraws every figure from the stored "
                  "tables; see `figures/README.md` for the command behind each figure.")]
    return out


# --------------------------------------------------------------------------------------------------- rendering
def to_markdown(items: list[Block]) -> str:
    lines: list[str] = []
    for b in items:
        kind = b[0]
        if kind == "h":
            lines += [f"{'#' * b[1]} {b[2]}", ""]
        elif kind == "p":
            lines += [b[1], ""]
        elif kind == "ul":
            lines += [f"- {x}" for x in b[1]] + [""]
        elif kind == "table":
            lines += ["| " + " | ".join(b[1]) + " |", "|" + "---|" * len(b[1])]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in b[2]] + [""]
        elif kind == "img":
            lines += [f"![{b[2]}]({b[1]})", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    """Escape, then ``code``, **bold** and *italic* as in the markdown."""
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", t)
    return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", t)


def to_html(items: list[Block], root: Path) -> str:
    body: list[str] = []
    for b in items:
        kind = b[0]
        if kind == "h":
            body.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
        elif kind == "p":
            body.append(f"<p>{_inline(b[1])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{_inline(h)}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((root / b[1]).read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}"></figure>')
    css = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
           "table{border-collapse:collapse;margin:1em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.3em .5em;"
           "vertical-align:top}th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;padding:0 .2em}")
    title = _inline(items[0][2]) if items and items[0][0] == "h" else "report"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{css}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")


def write_report(root: str | Path, state: dict[str, Any], why: list[str]) -> Path:
    """Write ``root/report.md`` and ``root/report.html``; return the markdown's path."""
    root = Path(root)
    items = blocks(root, state, why)
    write_text(root / "report.html", to_html(items, root))
    md = root / "report.md"
    write_text(md, to_markdown(items))
    return md


"""`dynamics demo --quick` end to end on the default model: every stage, every figure, a report whose numbers are
those of the stored tables, and a second run that reuses everything."""

from __future__ import annotations

import json
import re

import pytest

from dynamics.analyses.report import fmt_claim

FIGURES = ("learning_forgetting", "training_curves", "influence_magnitude", "influence_direction", "base_alignment",
           "rollout_sign", "knowledge_categories", "compare")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    from conftest import run_cli

    out = tmp_path_factory.mktemp("demo") / "out"
    r = run_cli("demo", "--quick", "--out", str(out), timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_quick_demo_makes_every_figure_and_the_report(quick):
    out, r = quick
    for name in FIGURES:
        assert (out / "figures" / f"{name}.png").stat().st_size > 10_000, name
        assert (out / "figures" / f"{name}.pdf").is_file(), name
    for run in ("sft", "rft", "sft-rollouts"):
        rows = [json.loads(x) for x in (out / "runs" / run / "eval.jsonl").read_text().splitlines()]
        # the probes are those the base model got right: at step 0 (batched differently) nearly all still are
        assert rows[0]["step"] == 0 and rows[-1]["step"] == 4 and rows[0]["probe_accuracy"] >= 0.9
    for label in ("sft", "rft", "sft-rollouts"):
        assert (out / "influence" / label / "influence.parquet").is_file()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= len(FIGURES) and "<table>" in html
    assert "where the time went" in r.stdout and "report:" in r.stdout


def test_report_numbers_are_those_of_the_stored_tables(quick):
    out, _ = quick
    md = (out / "report.md").read_text()
    findings = json.loads((out / "figures" / "findings.json").read_text())
    claims = [c for f in findings.values() for c in f["claims"]]
    assert len(claims) >= 10
    for c in claims:  # each claim's row: statement, measure, estimate [CI], verdict as stored
        est, verdict = fmt_claim(c)
        row = next(line for line in md.splitlines() if line.startswith(f"| {c['statement']} |"))
        assert f"| {est} | **{verdict}**" in row
    # the per-run table: first and last evaluation as stored in eval.jsonl
    for run, name in (("sft", "SFT"), ("rft", "RFT"), ("sft-rollouts", "SFT on rollouts")):
        rows = [json.loads(x) for x in (out / "runs" / run / "eval.jsonl").read_text().splitlines()]
        line = next(x for x in md.splitlines() if x.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[2] == f"{rows[0]['task_accuracy']:.0%} → {rows[-1]['task_accuracy']:.0%}"
        assert cells[4] == f"{rows[0]['probe_logp_base']:.3f} → {rows[-1]['probe_logp_base']:.3f}"
    # every verdict in the report is one of the four, and the stage timings add up to the recorded total
    assert set(re.findall(r"\*\*(held|inconclusive|did not hold|not measured)\*\*", md)) <= {
        "held", "inconclusive", "did not hold", "not measured"}
    state = json.loads((out / "demo.json").read_text())
    assert sum(s["seconds"] for s in state["stages"].values()) <= state["total_seconds"] + 1


def test_second_run_reuses_every_stage(quick, cli):
    out, _ = quick
    ckpt = next((out / "runs" / "sft").glob("checkpoint-*"))
    before = (ckpt / "manifest.json").stat().st_mtime_ns
    r = cli("demo", "--quick", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads((out / "demo.json").read_text())
    assert all(s["cached"] for s in state["stages"].values())
    assert (ckpt / "manifest.json").stat().st_mtime_ns == before
    assert (out / "report.md").is_file()



def test_plans_train_in_bf16_only_where_the_machine_computes_it_natively():
    """The default model's plans resolve bf16 to :func:`native_bf16` (emulated bf16 is slower than fp32); the
    tiny VLM's plan and a plan that sets bf16 keep theirs; the choice is recorded in the plan."""
    from dynamics.demo import DemoConfig, DemoPlan
    from dynamics.models import native_bf16

    assert DemoConfig(quick=True).resolved()[1].bf16 is native_bf16()
    assert DemoConfig().resolved()[1].bf16 is native_bf16()
    assert DemoConfig(vlm=True).resolved()[1].bf16 is False
    assert DemoConfig(plan=DemoPlan(bf16=not native_bf16())).resolved()[1].bf16 is not native_bf16()

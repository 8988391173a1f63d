"""`dynamics demo --quick` end to end on the default model: every stage, every figure, a report whose numbers are
those of the stored tables, and a second run that reuses everything."""

from __future__ import annotations

import json
import re
import shutil

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


def test_a_stage_whose_result_was_deleted_runs_again_and_its_readers_follow(tmp_path):
    """A stage recorded as done with the same key is skipped only while its outputs are all there: a run deleted
    since is trained again, and a stage that reads it (by its last manifest, rewritten) runs again; a stage that
    does not read it stays cached."""
    from dynamics.demo import Demo, DemoPlan

    calls = []

    def train(run):
        def fn():
            calls.append(run.name)
            demo.final(run).parent.mkdir(parents=True, exist_ok=True)
            demo.final(run).write_text(json.dumps({"time": len(calls)}))  # as a real manifest: when it was written
        return fn

    def pipeline():
        nonlocal demo
        demo = Demo(tmp_path, "quick", DemoPlan(steps=2), force=False, progress=False, log=lambda _: None)
        if demo.state_path.is_file():
            demo.state = json.loads(demo.state_path.read_text())
        a, b, report = tmp_path / "runs" / "a", tmp_path / "runs" / "b", tmp_path / "report.txt"
        demo.stage("a", train(a), outputs=[demo.final(a)])
        demo.stage("b", train(b), outputs=[demo.final(b)])
        demo.stage("report", lambda: (calls.append("report"), report.write_text("r")), demo.final(a),
                   outputs=[report])

    demo = None
    pipeline()
    assert calls == ["a", "b", "report"] and (tmp_path / "runs" / "a" / "checkpoint-2" / "manifest.json").is_file()
    pipeline()
    assert calls == ["a", "b", "report"]
    shutil.rmtree(tmp_path / "runs" / "a")
    pipeline()
    assert calls == ["a", "b", "report", "a", "report"]
    (tmp_path / "report.txt").unlink()
    pipeline()
    assert calls[5:] == ["report"]

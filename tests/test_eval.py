"""`dynamics eval` and the library under it: rows in the eval.parquet format, summaries, runs, the CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pandas as pd
import pytest
import torch

from dynamics import models
from dynamics.data import write_records
from dynamics.evaluate import COLUMNS, EvalConfig, evaluate_model, run_eval, summarise
from dynamics.probes import text_suite, visual_suite
from dynamics.tasks import get_task

QUIET = EvalConfig(progress=False, probe_max_new_tokens=8, batch_size=8)


def test_tiny_vlm_on_image_jigsaw_and_visual_probes(tiny_vl, tmp_path):
    tasks = get_task("jigsaw", preset="image", image_dir=str(tmp_path / "img")).build(3, seed=0)
    tasks += get_task("jigsaw", preset="image-pair", patches="separate", image_dir=str(tmp_path / "img2")).build(2, 0)
    probes = visual_suite(tmp_path / "vis", n_per_category=2)
    df = evaluate_model(tiny_vl, tasks, probes, EvalConfig(progress=False, max_new_tokens=12, probe_max_new_tokens=4),
                        step=7, model_name="tiny")
    assert list(df.columns) == COLUMNS and len(df) == 5 + 8
    assert set(df["model"]) == {"tiny"} and set(df["step"]) == {7}
    assert list(df["kind"]) == ["task"] * 5 + ["probe"] * 8
    assert list(df["category"][:5]) == ["jigsaw-full"] * 3 + ["jigsaw-pair"] * 2
    assert (df["logp_sum"] < 0).all() and (df["logp_mean"] < 0).all()
    task = df[df["kind"] == "task"]
    assert task["reward"].between(0, 3).all() and task["format"].isin([0.0, 1.0]).all()
    s = summarise(df)
    assert s["task_accuracy"] == pytest.approx(task["correct"].mean()) and s["task_accuracy"] <= 0.2  # random model
    assert set(s) >= {"task_accuracy", "task_reward", "probe_accuracy", "probe_logp", "probe_accuracy/colour",
                      "probe_logp/count", "task_accuracy/jigsaw-pair"}
    assert "probe_logp_base" not in s


def test_summarise_means_and_base_logp():
    df = pd.DataFrame({
        "model": "m", "step": 0, "item_id": list("abcde"), "kind": ["task", "task", "probe", "probe", "probe"],
        "category": ["j", "j", "x", "x", "y"], "correct": [True, False, True, False, True],
        "logp_sum": [-1.0, -3.0, -2.0, -4.0, -6.0], "logp_mean": [-1.0, -1.5, -1.0, -2.0, -3.0],
        "reward": [3.0, 1.0, None, None, None], "hit": [1.0, 0.5, None, None, None], "format": [1.0, 1.0, None, None, None],
        "response": "", "logp_base_sum": [None, None, -1.0, -3.0, None],
        "logp_base_mean": [None, None, -0.5, -1.0, None]})
    s = summarise(df)
    assert s["task_accuracy"] == 0.5 and s["task_reward"] == 2.0 and s["probe_accuracy"] == pytest.approx(2 / 3)
    # log p per token (the mean over probes of each probe's mean over its tokens), and summed over tokens
    assert s["probe_logp"] == -2.0 and s["probe_logp_sum"] == -4.0 and s["task_logp"] == -1.25
    assert s["probe_logp_base"] == -0.75 and s["probe_logp_base_sum"] == -2.0 and s["probe_logp/x"] == -1.5
    assert s["probe_accuracy/y"] == 1.0 and "probe_logp_base/y" not in s and s["probe_logp_base/x"] == -0.75


def make_run(tiny_lm, root):
    """A run folder with two tiny checkpoints saved out of step order, plus an incomplete one."""
    run = root / "run"
    for step in (20, 5):
        ckpt = run / f"checkpoint-{step}"
        tiny_lm.save(ckpt)
        (ckpt / "manifest.json").write_text(json.dumps({"step": step, "base_model": "tiny-llama"}))
    (run / "checkpoint-30").mkdir()  # still being written: no weights yet
    return run


def test_run_folder_in_step_order_and_resume(tiny_lm, tmp_path, monkeypatch):
    run = make_run(tiny_lm, tmp_path)
    tasks = get_task("jigsaw").build(4, seed=1)
    probes = text_suite()[:6]
    df = run_eval(run, tasks, probes, QUIET, tmp_path / "out")
    assert list(dict.fromkeys(df["step"])) == [5, 20]
    assert list(dict.fromkeys(df["model"])) == ["run/checkpoint-5", "run/checkpoint-20"]
    stored = pd.read_parquet(tmp_path / "out" / "eval.parquet")
    pd.testing.assert_frame_equal(stored, df)
    rows = [json.loads(x) for x in (tmp_path / "out" / "summary.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 20] and all(0 <= r["probe_accuracy"] <= 1 for r in rows)
    # the same weights at both steps: the same scores
    a, b = (df[df["step"] == s].reset_index(drop=True) for s in (5, 20))
    assert (a["logp_sum"] - b["logp_sum"]).abs().max() < 1e-6
    # the same with the probes named by the configuration (as `dynamics eval --probes FILE` gives them)
    write_records(tmp_path / "probes.jsonl", probes)
    named_cfg = replace(QUIET, probes=str(tmp_path / "probes.jsonl"))
    named = run_eval(run, tasks, None, named_cfg, tmp_path / "named")
    pd.testing.assert_frame_equal(named, df)
    # resuming: finished checkpoints are not loaded again, not even for the model's kind when the probes are named
    loads = []
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda spec, **k: loads.append(spec) or real_load(spec, **k))
    pd.testing.assert_frame_equal(run_eval(run, tasks, probes, QUIET, tmp_path / "out"), df)
    pd.testing.assert_frame_equal(run_eval(run, tasks, None, named_cfg, tmp_path / "named"), df)
    assert loads == []
    # a checkpoint retrained in place (other weights in the same folder) is evaluated again, and only it
    ckpt = run / "checkpoint-5"
    with torch.no_grad():
        moved = real_load(str(ckpt))
        for p in moved.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0), dtype=p.dtype))
    moved.save(ckpt)
    again = run_eval(run, tasks, probes, QUIET, tmp_path / "out")
    assert loads == [str(ckpt)]
    key = ["step", "kind", "item_id"]
    fresh = run_eval(run, tasks, probes, QUIET, tmp_path / "fresh").sort_values(key, ignore_index=True)
    pd.testing.assert_frame_equal(again.sort_values(key, ignore_index=True), fresh)
    assert not fresh[fresh.step == 5]["logp_sum"].reset_index(drop=True).equals(
        df[df.step == 5]["logp_sum"].reset_index(drop=True))
    # inputs edited in their meta alone (a probe's category; aliases and a record's task score alike) are new
    # inputs: every checkpoint is evaluated again
    loads.clear()
    recat = [{**p, "meta": {**p["meta"], "category": "edited"}} if i == 0 else p for i, p in enumerate(probes)]
    edited = run_eval(run, tasks, recat, QUIET, tmp_path / "out")
    assert loads == [str(run / "checkpoint-5"), str(run / "checkpoint-20")]
    assert set(edited[(edited.kind == "probe") & (edited.item_id == probes[0]["id"])]["category"]) == {"edited"}


def test_a_rerun_evaluates_again_after_an_image_is_rewritten_in_place(tmp_path, monkeypatch):
    """Probes name images by path: rewritten under the same path, an image makes new inputs, so a rerun into
    the same OUT evaluates the model again and gives a fresh run's rows."""
    from PIL import Image

    probes = visual_suite(tmp_path / "vis", n_per_category=1)
    first = run_eval("tiny-qwen2.5-vl", [], probes, QUIET, tmp_path / "out")
    loads = []
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda spec, **k: loads.append(spec) or real_load(spec, **k))
    Image.open(probes[1]["images"][0]).save(probes[0]["images"][0])
    again = run_eval("tiny-qwen2.5-vl", [], probes, QUIET, tmp_path / "out")
    assert loads == ["tiny-qwen2.5-vl"]
    pd.testing.assert_frame_equal(again, run_eval("tiny-qwen2.5-vl", [], probes, QUIET, tmp_path / "fresh"))
    assert again["logp_sum"].iloc[0] != first["logp_sum"].iloc[0]


def test_eval_command_on_the_tiny_vlm(cli, tmp_path):
    out = tmp_path / "ev"
    r = cli("eval", "--model", "tiny-qwen2.5-vl", "--task", "jigsaw", "--task-args", "preset=image,patch_size=28",
            "--n-task", "3", "--probes", "visual", "--max-new-tokens", "8", "--probe-max-new-tokens", "4",
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    df = pd.read_parquet(out / "eval.parquet")
    assert list(df.columns) == COLUMNS
    assert (df["kind"] == "task").sum() == 3 and (df["kind"] == "probe").sum() == 48
    assert set(df[df["kind"] == "probe"]["category"]) == {"colour", "shape", "count", "position"}
    assert "tiny-qwen2.5-vl" in r.stdout and "task acc" in r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["task_args"] == "preset=image,patch_size=28"


def test_eval_command_on_the_default_model(cli, tmp_path):
    """End to end on SmolLM2: the base model is near chance on the jigsaw and knows its kept probes."""
    probes = tmp_path / "probes.jsonl"
    r = cli("probes", "build", "--model", "default", "--keep-correct", "--limit", "12", "--out", str(probes))
    assert r.returncode == 0, r.stderr
    assert 0 < len(probes.read_text().splitlines()) < 12  # SmolLM2 gets some of the first 12 wrong
    out = tmp_path / "ev"
    r = cli("eval", "--model", "default", "--task", "jigsaw", "--n-task", "16", "--probes", str(probes),
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (out / "summary.jsonl").read_text().splitlines()]
    (s,) = rows
    print(f"\ndefault model, jigsaw (preset text), greedy: accuracy {s['task_accuracy']:.2f}, "
          f"format {s['task_format']:.2f}, reward {s['task_reward']:.2f}")
    assert s["task_accuracy"] <= 0.5  # chance is 1/5 for three pieces
    assert s["task_format"] >= 0.5 and not math.isnan(s["task_reward"])
    assert s["probe_accuracy"] == 1.0


@pytest.mark.parametrize(
    ("content", "message"),
    [('{"prompt": "2+2?", "completion": "4", "answer": "4"}\n{"prompt": "x", "completion": \n', "invalid JSON"),
     ('{"prompt": "2+2?", "completion": "4"}\n', "answer"),
     # the file's own line, blank lines counted
     ('\n{"prompt": "2+2?", "completion": "4", "answer": "4"}\n\n{"prompt": "x", "completion": "y"}\n',
      "bad.jsonl:4: field 'answer'"),
     ('{"prompt": "2+2?", "completion": "4", "answer": "4"}\n\n'
      '{"prompt": "x", "completion": "y", "answer": "y", "meta": {"aliases": [1]}}\n', "bad.jsonl:3: field 'meta.aliases'")],
)
def test_bad_probes_file_is_one_line_error(cli, tmp_path, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    r = cli("eval", "--model", "tiny-llama", "--probes", str(bad), "--n-task", "2", "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0] and message in lines[0]
    assert "Traceback" not in r.stderr


def test_generation_sampling_shares_the_prompt_and_is_seeded(tiny_lm, default_lm):
    from dynamics.generation import generate

    records = get_task("jigsaw").build(5, seed=2)
    for lm in (tiny_lm, default_lm):
        greedy = generate(lm, records, max_new_tokens=8, batch_size=4, progress=False)
        # a near-zero temperature samples the argmax: the shared-prefill path continues exactly like greedy
        cold = generate(lm, records, max_new_tokens=8, temperature=1e-4, num_samples=3, batch_size=6, progress=False)
        assert cold == [[g[0]] * 3 for g in greedy]
    hot = dict(max_new_tokens=8, temperature=1.0, num_samples=4, batch_size=8, progress=False)
    a, b, c = (generate(tiny_lm, records, seed=s, **hot) for s in (3, 3, 4))
    assert a == b and a != c and all(len(x) == 4 and len(set(x)) > 1 for x in a)

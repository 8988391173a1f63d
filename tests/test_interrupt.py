"""Long commands survive being killed: a real ``dynamics`` subprocess is stopped (SIGINT, SIGTERM or SIGKILL)
once its first shard / checkpoint is on disk, the command is run again (with ``--resume`` where it takes one)
and the result must equal an uninterrupted run's, without recomputing what was finished."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from dynamics.data import write_records
from dynamics.store import read_jsonl_rows, read_parquet

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def records(n: int, prefix: str = "r") -> list[dict]:
    return [{"id": f"{prefix}{i}", "prompt": f"{i % 7} plus {i % 5} makes what? " * (1 + i % 3),
             "completion": f"{i % 7 + i % 5}", "answer": str(i % 7 + i % 5)} for i in range(n)]


def files(folder: Path, pattern: str) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.glob(pattern) if not p.name.startswith(".")}


def start_and_kill(args: list[str], folder: Path, pattern: str, sig: int, seed: int, timeout: float = 90,
                   ready=lambda found: True) -> dict[Path, int]:
    """Start ``dynamics ARGS``, wait until ``folder`` holds a file matching ``pattern`` (and ``ready(files)``),
    plus a random delay of up to 50 ms (seeded), send ``sig``; return the finished files (with mtimes) left
    after it died."""
    fd, name = tempfile.mkstemp(suffix=".stderr")
    log = Path(name)
    with os.fdopen(fd, "w") as err:  # a file, not a pipe: a full pipe would stall the child
        # SIGINT as a terminal's Ctrl-C delivers it: a shell without job control starts background jobs (as CI may
        # run this suite) with SIGINT ignored, which the child would inherit and so run to completion
        proc = subprocess.Popen([sys.executable, "-m", "dynamics.cli", *args], env=ENV, stdout=subprocess.DEVNULL,
                                stderr=err, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t_end = time.monotonic() + timeout
    try:
        while not (files(folder, pattern) and ready(files(folder, pattern))):
            assert proc.poll() is None, f"finished before it could be interrupted: {log.read_text()[-2000:]}"
            assert time.monotonic() < t_end, "no shard appeared"
            time.sleep(0.01)
        time.sleep(random.Random(seed).uniform(0, 0.05))
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.unlink()
    assert proc.returncode != 0, "the command completed before the signal: nothing was interrupted"
    return files(folder, pattern)


def run_ok(*args: str) -> None:
    res = subprocess.run([sys.executable, "-m", "dynamics.cli", *args], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def influence_ref(tmp_path_factory):
    """Training and probe files and the uninterrupted influence table (in this process)."""
    from dynamics.influence import InfluenceRun, run

    tmp = tmp_path_factory.mktemp("influence")
    # 24 shards: the run outlasts the signal's delay on a loaded machine (first to last shard about 0.9 s; with 6
    # shards, 0.2 s, a fresh-clone run under `-n 2` once finished before its SIGINT arrived)
    train = write_records(tmp / "train.jsonl", records(96))
    probes = write_records(tmp / "probes.jsonl", records(3, "p"))
    ref = run(InfluenceRun(ckpts=["tiny-llama"], train=str(train), probes=str(probes), out=str(tmp / "ref"),
                           shard_size=4))
    return train, probes, pd.read_parquet(ref)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_influence_resumes_after_a_signal(tmp_path, influence_ref, sig):
    train, probes, ref = influence_ref
    out = tmp_path / "cut"
    args = ["influence", "--ckpt", "tiny-llama", "--train", str(train), "--probes", str(probes), "--out", str(out),
            "--shard-size", "4", "--batch-size", "2"]
    done = start_and_kill(args, out / "shards", "*.parquet", sig, seed=int(sig))
    assert done and not (out / "influence.parquet").exists()
    run_ok(*args, "--resume")
    after = files(out / "shards", "*.parquet")
    assert len(after) == 24 and all(after[p] == t for p, t in done.items())  # finished shards kept as they were
    got = pd.read_parquet(out / "influence.parquet")
    pd.testing.assert_frame_equal(got, ref, check_exact=False, rtol=1e-6)


def test_rollouts_resume_after_sigterm(tmp_path):
    data = write_records(tmp_path / "prompts.jsonl", records(12))
    common = ["rollouts", "--model", "tiny-llama", "--data", str(data), "--samples", "3", "--max-new-tokens", "24",
              "--shard-size", "2", "--batch-size", "6", "--temperature", "1.0", "--seed", "3"]
    run_ok(*common, "--out", str(tmp_path / "ref.jsonl"))
    out = tmp_path / "cut.jsonl"
    shards = tmp_path / f".{out.name}.shards"
    done = start_and_kill([*common, "--out", str(out)], shards, "*.jsonl", signal.SIGTERM, seed=1)
    assert done and not out.exists()
    before = {p: p.read_bytes() for p in done}
    run_ok(*common, "--out", str(out), "--resume")
    assert out.read_text() == (tmp_path / "ref.jsonl").read_text()
    assert not shards.exists()  # cleaned up once the output is whole
    # the finished shards' rollouts are in the output as they were sampled before the signal
    text = out.read_text()
    assert all(line in text for b in before.values() for line in b.decode().splitlines())


def test_eval_of_a_run_resumes_after_sigkill_without_reevaluating(tmp_path):
    from dynamics.train.run import load_config
    from dynamics.train.sft import SFTRunConfig, train_sft

    run = tmp_path / "run"
    train_sft(load_config(SFTRunConfig, None, model="tiny-llama", output_dir=str(run), max_steps=6,
                          learning_rate=3e-3, per_device_train_batch_size=4, disable_tqdm=True, seed=0,
                          checkpoint_every=1), records(12))  # six checkpoints: the kill lands between two
    probes = write_records(tmp_path / "probes.jsonl", records(24, "p"))
    args = ["eval", "--model", str(run), "--no-task", "--probes", str(probes), "--probe-max-new-tokens", "24",
            "--batch-size", "4"]
    run_ok(*args, "--out", str(tmp_path / "ref"))
    out = tmp_path / "cut"
    start_and_kill([*args, "--out", str(out)], out, "eval.parquet", signal.SIGKILL, seed=2,
                   ready=lambda found: read_parquet(out / "eval.parquet")["step"].nunique() >= 2)
    finished = sorted(set(pd.read_parquet(out / "eval.parquet")["step"]))
    assert 2 <= len(finished) < 6
    # a finished checkpoint past the first (which eval loads anyway, to pick the default probe suite) cannot
    # be loaded any more: evaluating it again would fail. (Same size and time: to eval, the same weight files.)
    for step in finished[1:]:
        weights = run / f"checkpoint-{step}" / "model.safetensors"
        stat = weights.stat()
        weights.write_bytes(bytes(stat.st_size))
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    run_ok(*args, "--out", str(out))
    got = pd.read_parquet(out / "eval.parquet").sort_values(["step", "item_id"], ignore_index=True)
    ref = pd.read_parquet(tmp_path / "ref" / "eval.parquet").sort_values(["step", "item_id"], ignore_index=True)
    pd.testing.assert_frame_equal(got, ref)


def test_train_resumes_after_sigkill_to_the_uninterrupted_weights(tmp_path):
    from dynamics.train.run import load_config
    from dynamics.train.sft import SFTRunConfig, train_sft

    data = write_records(tmp_path / "train.jsonl", records(32))
    opts = dict(max_steps=40, learning_rate=3e-3, per_device_train_batch_size=4, seed=0, checkpoint_every=4)
    full = train_sft(load_config(SFTRunConfig, None, model="tiny-llama", output_dir=str(tmp_path / "full"),
                                 disable_tqdm=True, data=str(data), **opts))
    run = tmp_path / "cut"
    args = ["train", "sft", "--model", "tiny-llama", "--data", str(data), "--out", str(run), "--max-steps", "40",
            "--lr", "3e-3", "--batch-size", "4", "--seed", "0", "--checkpoint-every", "4"]
    start_and_kill(args, run, "checkpoint-*/manifest.json", signal.SIGKILL, seed=3)
    ckpts = sorted((int(p.name.split("-")[1]), p) for p in run.glob("checkpoint-*") if (p / "manifest.json").exists())
    last_step, last = ckpts[-1]
    assert last_step < 40
    kept_rows = [r for r in read_jsonl_rows(run / "metrics.jsonl") if r["step"] <= last_step]
    kept_mtime = (last / "model.safetensors").stat().st_mtime_ns
    run_ok(*args, "--resume")
    assert (last / "model.safetensors").stat().st_mtime_ns == kept_mtime  # not written again
    rows = read_jsonl_rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert rows[:len(kept_rows)] == kept_rows  # the steps before the checkpoint were not run again
    a = load_file(full.run / "checkpoint-40" / "model.safetensors")
    b = load_file(run / "checkpoint-40" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_vlm_demo_resumes_after_sigkill_without_redoing_finished_stages(tmp_path):
    """`dynamics demo --vlm` (image jigsaw and visual probes on the tiny Qwen2.5-VL) killed during its RFT run:
    rerun, the stages done before are reused as they are (same files), the rest completes, and the report is
    written, as mechanics only."""
    import json

    out = tmp_path / "demo"
    start_and_kill(["demo", "--vlm", "--out", str(out)], out / "runs" / "rft", "metrics.jsonl", signal.SIGKILL,
                   seed=3, timeout=240)
    state = json.loads((out / "demo.json").read_text())
    done = list(state["stages"])
    assert done[:3] == ["probes", "data", "sft"] and "rft" not in done
    sft_ckpt = next((out / "runs" / "sft").glob("checkpoint-*/model.safetensors"))
    before = sft_ckpt.stat().st_mtime_ns
    run_ok("demo", "--vlm", "--out", str(out))
    state = json.loads((out / "demo.json").read_text())
    assert all(state["stages"][s]["cached"] for s in done) and not state["stages"]["rft"]["cached"]
    assert sft_ckpt.stat().st_mtime_ns == before
    assert state["plan_name"] == "vlm" and state["plan"]["model"] == "tiny-qwen2.5-vl"
    assert list(state["stages"]) == ["probes", "data", "sft", "rft", "rollouts", "sft-rollouts", "influence",
                                     "compare", "figures"]
    train = [json.loads(x) for x in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert all(rec["images"] and (out / "data" / rec["images"][0]).is_file() for rec in train)
    assert (out / "figures" / "influence_magnitude.png").is_file()
    assert (out / "report.html").is_file() and "Mechanics only" in (out / "report.md").read_text()

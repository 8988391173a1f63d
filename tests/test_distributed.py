"""Sharded influence on torch.distributed: 2 gloo processes give the single-process table."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

TRAIN = [{"id": f"t{i}", "prompt": "abc " * (i + 1), "completion": "xy" * (i % 3 + 1)} for i in range(7)]
PROBES = [{"id": f"p{i}", "prompt": "q" * (2 * i + 1), "completion": "answer"[: i + 2]} for i in range(3)]


def test_torchrun_two_processes_equal_single_process(tmp_path, cli):
    for name, rows in (("train.jsonl", TRAIN), ("probes.jsonl", PROBES)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["influence", "--ckpt", "tiny-llama", "--train", str(tmp_path / "train.jsonl"), "--probes",
              str(tmp_path / "probes.jsonl"), "--target", "gold", "--shard-size", "2"]
    single = cli(*common, "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    sharded = cli(*common, "--out", str(tmp_path / "sharded"), "--launcher", "torchrun", "--nproc", "2")
    assert sharded.returncode == 0, sharded.stderr
    a = pd.read_parquet(tmp_path / "single" / "influence.parquet")
    b = pd.read_parquet(tmp_path / "sharded" / "influence.parquet")
    pd.testing.assert_frame_equal(a.drop(columns=["kernel", "cosine", "train_norm", "probe_norm"]),
                                  b.drop(columns=["kernel", "cosine", "train_norm", "probe_norm"]))
    for col in ("kernel", "cosine", "train_norm", "probe_norm"):
        np.testing.assert_allclose(b[col], a[col], rtol=1e-5, atol=1e-6)
    # the 4 shards were split over the two ranks and merged by rank 0
    assert len(list((tmp_path / "sharded" / "shards").glob("*.parquet"))) == 4
    assert json.loads((tmp_path / "sharded" / "manifest.json").read_text())["n_train"] == 7

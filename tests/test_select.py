"""dynamics select: conflicting training samples are dropped first."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from dynamics.errors import DynamicsError
from dynamics.influence import InfluenceConfig
from dynamics.select import SelectConfig, decisions_path, parse_budget, select

FACTS = ["Is Paris the capital of France?", "Is water wet?", "Is the sun hot?", "Do fish live in water?"]
PROBES = [{"id": f"fact{i}", "prompt": q + " Answer yes or no.", "completion": "Yes"} for i, q in enumerate(FACTS)]
CONFLICTING = [{"id": f"contradicts{i}", "prompt": q + " Answer yes or no.", "completion": "No"}
               for i, q in enumerate(FACTS[:2])]
NEUTRAL = [{"id": "jig1", "prompt": "Pieces: B) the cat A) sat on C) the mat. Give the order.", "completion": "B A C"},
           {"id": "jig2", "prompt": "Pieces: A) quick brown B) the C) fox. Give the order.", "completion": "B A C"},
           {"id": "jig3", "prompt": "Pieces: C) rain A) falls B) softly. Give the order.", "completion": "C A B"},
           {"id": "jig4", "prompt": "Pieces: B) sun A) rises C) early. Give the order.", "completion": "B A C"}]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("strategy", ["drop-harmful", "keep-aligned"])
def test_conflicting_samples_are_dropped_first(tmp_path, default_lm, strategy):
    data = write(tmp_path / "train.jsonl", NEUTRAL[:2] + CONFLICTING + NEUTRAL[2:])
    probes = write(tmp_path / "probes.jsonl", PROBES)
    cfg = SelectConfig(data=str(data), probes=str(probes), out=str(tmp_path / "kept.jsonl"), budget="4",
                       strategy=strategy, influence=InfluenceConfig(target="gold", tokens="content"))
    out, table = select(cfg, lm=default_lm)
    kept = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(kept) == sorted(r["id"] for r in NEUTRAL)
    dropped = table[table.decision == "dropped"]
    assert set(dropped.train_id) == {r["id"] for r in CONFLICTING}
    assert (dropped.mean_kernel < 0).all() and (table[table.decision == "kept"].mean_kernel > 0).all()
    stored = pd.read_parquet(decisions_path(out))
    assert list(stored.train_id) == list(table.train_id) and stored.reason.str.len().min() > 0


def test_budget_parsing():
    assert parse_budget("3", 10) == 3 and parse_budget("0.25", 8) == 2 and parse_budget("1.0", 8) == 8
    assert parse_budget("50", 10) == 10
    for bad in ("-1", "abc", "2.5", "0"):
        with pytest.raises(DynamicsError, match="budget"):
            parse_budget(bad, 10)


def test_cli_select_and_bad_strategy(tmp_path, cli):
    data = write(tmp_path / "train.jsonl", NEUTRAL)
    probes = write(tmp_path / "probes.jsonl", PROBES)
    res = cli("select", "--model", "tiny-llama", "--data", str(data), "--probes", str(probes), "--out",
              str(tmp_path / "kept.jsonl"), "--budget", "0.5", "--target", "gold")
    assert res.returncode == 0, res.stderr
    assert len((tmp_path / "kept.jsonl").read_text().splitlines()) == 2 and "kept 2 of 4" in res.stdout
    res = cli("select", "--model", "tiny-llama", "--data", str(data), "--probes", str(probes), "--out",
              str(tmp_path / "k2.jsonl"), "--strategy", "random")
    assert res.returncode == 2 and "strategy" in res.stderr and "Traceback" not in res.stderr


def test_cli_defaults_are_the_library_defaults(cli_params):
    """`dynamics select` and `dynamics probes build` only parse into their configs: a library caller gets the
    defaults a CLI user gets (select scores the answers' own tokens, probes generate 64 prompts a batch)."""
    from dynamics.probes import ProbeBuildConfig

    cli = {name: p.default for name, p in cli_params("select").items()}
    cfg = SelectConfig(data="d", probes="p", out="o")
    for name in ("budget", "strategy", "model", "task", "task_args", "samples", "temperature"):
        assert cli[name] == getattr(cfg, name), name
    for name in ("params", "mode", "batch_size", "target", "tokens"):
        assert cli[name] == getattr(cfg.influence, name), name
    cli = {name: p.default for name, p in cli_params("probes", "build").items()}
    build = ProbeBuildConfig()
    for name in ("model", "suite", "keep_correct", "limit", "max_new_tokens", "batch_size"):
        assert cli[name] == getattr(build, name), name


def test_selecting_from_a_stored_influence_table_equals_computing_it(tmp_path, tiny_lm, monkeypatch):
    """`--from-influence`: the decisions made from a `dynamics influence` table (at its earliest checkpoint by
    default, or the one of the step asked) are those made by computing the kernels at that model; samples the table lacks, or
    holds under another text, or a table whose own training file has changed since, are refused. The table is
    never loaded whole (it is reduced as it is read)."""
    import numpy as np
    import torch

    from dynamics.analyses import loader
    from dynamics.influence import InfluenceRun, run
    from dynamics.models import load_model

    monkeypatch.setattr(loader, "read_parquet", lambda *a, **k: pytest.fail("a whole table was read"))

    trained = tmp_path / "checkpoint-5"  # a later checkpoint: the tiny model with its weights moved
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        moved = load_model("tiny-llama")
        for p in moved.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    moved.save(trained)
    data = write(tmp_path / "train.jsonl", NEUTRAL + CONFLICTING)
    probes = write(tmp_path / "probes.jsonl", PROBES)
    inf = InfluenceConfig(target="gold", tokens="content")
    run(InfluenceRun(ckpts=["tiny-llama", str(trained)], train=str(data), probes=str(probes),
                     out=str(tmp_path / "inf"), config=inf))
    for step, ckpt, lm in ((None, "tiny-llama", tiny_lm), (5, "checkpoint-5", load_model(str(trained)))):
        common = dict(data=str(data), budget="3", strategy="drop-harmful")
        _, live = select(SelectConfig(**common, probes=str(probes), out=str(tmp_path / "live.jsonl"), influence=inf),
                         lm=lm)
        out, stored = select(SelectConfig(**common, out=str(tmp_path / f"{ckpt}.jsonl"), step=step,
                                          from_influence=str(tmp_path / "inf")))
        assert stored.ckpt.iloc[0] == ckpt
        assert list(stored.decision) == list(live.decision) and list(stored["rank"]) == list(live["rank"])
        np.testing.assert_allclose(stored.mean_kernel, live.mean_kernel, rtol=1e-5)
        assert len(out.read_text().splitlines()) == 3
    assert not np.allclose(stored.mean_kernel, select(SelectConfig(
        data=str(data), out=str(tmp_path / "k.jsonl"), from_influence=str(tmp_path / "inf")))[1].mean_kernel)
    edited = [dict(r) for r in NEUTRAL]
    edited[1]["completion"] = "A B C"
    # (the file's lines: a blank first line counts)
    for rows, message in ((edited, r"train2.jsonl:3: field 'id': sample 'jig2' is not the one"),
                          (NEUTRAL + [{**PROBES[0], "id": "new"}], r"train2.jsonl:6: field 'id': sample 'new' has no")):
        (tmp_path / "train2.jsonl").write_text("\n" + write(tmp_path / "rows.jsonl", rows).read_text())
        with pytest.raises(DynamicsError, match=message):
            select(SelectConfig(data=str(tmp_path / "train2.jsonl"), out=str(tmp_path / "x.jsonl"),
                                from_influence=str(tmp_path / "inf" / "influence.parquet")))
    with pytest.raises(DynamicsError, match="computed on other probes"):
        select(SelectConfig(data=str(data), probes=str(data), out=str(tmp_path / "x.jsonl"),
                            from_influence=str(tmp_path / "inf")))
    with pytest.raises(DynamicsError, match="no checkpoint at step 9 in .*; it holds steps 0, 5"):
        select(SelectConfig(data=str(data), out=str(tmp_path / "x.jsonl"), step=9,
                            from_influence=str(tmp_path / "inf")))
    # the table's own training file edited since (here, as `edited`): a subset of it matches nothing the table
    # was computed on, however equal to that file now
    write(data, edited + CONFLICTING)
    with pytest.raises(DynamicsError, match=r"train.jsonl: the table at .* was computed on this file, which "
                                            r"\(or an image it names\) has changed since"):
        select(SelectConfig(data=str(write(tmp_path / "train2.jsonl", edited[:3])), out=str(tmp_path / "x.jsonl"),
                            from_influence=str(tmp_path / "inf")))
    assert not (tmp_path / "x.jsonl").exists()

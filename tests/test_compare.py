"""`dynamics compare`: detects a shifted distribution, flags two samples of one distribution at rate alpha,
joins influence by training id, measures base-model log p, and reports bad input in one line."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dynamics.analyses.compare import CompareConfig, pairwise_tests, sample_table
from dynamics.errors import DynamicsError


def jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def records(prefix, n, words):
    return [{"id": f"{prefix}{i}", "prompt": [{"role": "user", "content": f"Question {i}?"}],
             "completion": [{"role": "assistant", "content": " ".join(["word"] * (words + i % 3))}]}
            for i in range(n)]


def samples(x, y, measure="logp_mean"):
    return pd.DataFrame({"label": ["a"] * len(x) + ["b"] * len(y), "id": [str(i) for i in range(len(x) + len(y))],
                         measure: np.concatenate([x, y])})


def test_detects_a_shift_with_the_right_signs():
    rng = np.random.default_rng(0)
    x, y = rng.normal(0.0, 1.0, 200), rng.normal(0.8, 1.0, 200)
    row = pairwise_tests(samples(x, y), n_resamples=500).iloc[0]
    assert (row.a, row.b, row.metric) == ("a", "b", "logp_mean")
    assert row.differs and row.mwu_p < 1e-4 and row.ks_p < 1e-3
    assert row.mean_diff == pytest.approx(x.mean() - y.mean())
    assert row.mean_diff_lo < -0.8 < row.mean_diff_hi  # the interval holds the true shift
    assert row.cliffs_delta_hi < 0 and row.cohens_d_hi < 0
    assert row.cohens_d == pytest.approx(-0.8, abs=0.25)


def test_same_distribution_is_flagged_at_rate_alpha():
    """Over 400 seeded pairs of samples from one distribution, Mann–Whitney flags about alpha = 5% of them
    (99.9% binomial range 1.5%–9%); Kolmogorov–Smirnov (exact, conservative) at most that."""
    rng = np.random.default_rng(1)
    flagged, ks = [], []
    for _ in range(400):
        row = pairwise_tests(samples(rng.gamma(2.0, 1.0, 40), rng.gamma(2.0, 1.0, 40)), n_resamples=0).iloc[0]
        flagged.append(row.differs)
        ks.append(row.ks_p < 0.05)
    assert 0.015 <= np.mean(flagged) <= 0.09
    assert np.mean(ks) <= 0.09


def test_paired_by_prompt_removes_prompt_difficulty():
    """Per-prompt difficulty varies far more than the shift between data sets: unpaired tests miss the shift,
    the comparison paired on shared prompts finds it, and its estimate is the mean per-prompt difference."""
    rng = np.random.default_rng(2)
    difficulty = rng.normal(0, 3, 40)
    x = difficulty + rng.normal(0.3, 0.2, 40)
    y = np.repeat(difficulty, 2) + rng.normal(0.0, 0.2, 80)  # two rollouts per prompt in B
    df = pd.DataFrame({"label": ["a"] * 40 + ["b"] * 80, "id": [str(i) for i in range(120)],
                       "prompt_key": [f"k{i}" for i in range(40)] + [f"k{i // 2}" for i in range(80)],
                       "logp_mean": np.concatenate([x, y])})
    row = pairwise_tests(df, n_resamples=300).iloc[0]
    assert row.mwu_p > 0.2 and not row.differs
    assert row.n_paired == 40 and row.wilcoxon_p < 1e-6 and row.paired_diff_lo > 0
    assert row.paired_diff == pytest.approx(np.mean(x - y.reshape(40, 2).mean(1)))


def test_cli_compares_lengths_and_joins_influence(tmp_path, cli):
    gold = jsonl(tmp_path / "gold.jsonl", records("g", 30, 12))
    roll = jsonl(tmp_path / "rollouts.jsonl", records("r", 30, 3))
    inf = tmp_path / "inf-gold"
    inf.mkdir()
    rows = [{"ckpt": "base", "step": 0, "train_id": f"g{i}", "probe_id": f"p{j}", "kernel": (i + 1) * c,
             "cosine": c, "train_norm": float(i + 1), "probe_norm": 1.0}
            for i in range(30) for j, c in enumerate((0.5, -0.25))]
    pd.DataFrame(rows).to_parquet(inf / "influence.parquet")
    (inf / "manifest.json").write_text(json.dumps({"train": str(gold), "probes": str(tmp_path / "p.jsonl")}))
    out = tmp_path / "cmp"
    res = cli("compare", "--data", str(gold), "--data", str(roll), "--label", "sft", "--label", "rft",
              "--influence", str(inf), "--out", str(out), "--resamples", "200")
    assert res.returncode == 0, res.stderr
    assert "length (characters)" in res.stdout and "sft vs rft" in res.stdout
    s = pd.read_parquet(out / "samples.parquet").set_index("id")
    assert s.loc["g4", "train_norm"] == 5.0 and s.loc["g4", "mean_abs_kernel"] == pytest.approx(5 * 0.375)
    assert s.loc["g4", "mean_cosine"] == pytest.approx(0.125) and s.loc["g4", "frac_negative"] == 0.5
    assert np.isnan(s.loc["r4", "train_norm"])
    t = pd.read_parquet(out / "tests.parquet").set_index("metric")
    assert t.loc["n_chars", "differs"] and t.loc["n_chars", "cliffs_delta"] == 1.0  # every gold answer is longer
    assert "train_norm" not in t.index  # only one side has influence
    # both sets answer the same 30 prompts: the paired difference of lengths is exact, (12 − 3) words of 5 chars
    assert t.loc["n_chars", "n_paired"] == 30 and t.loc["n_chars", "paired_diff"] == pytest.approx(45.0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "compare" and [d["label"] for d in manifest["data"]] == ["sft", "rft"]
    with Image.open(out / "compare.png") as im:
        im.load()
        assert im.size[0] > 400 and len(np.unique(np.asarray(im.convert("L")))) > 10
    assert (out / "compare.pdf").read_bytes().startswith(b"%PDF")


def test_bad_input_is_one_line_naming_the_file(tmp_path, cli):
    good = jsonl(tmp_path / "a.jsonl", records("a", 3, 2))
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "x", "completion": "y"}\n{"prompt": \n')
    res = cli("compare", "--data", str(good), "--data", str(bad), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and f"{bad}:2: invalid JSON" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    out = tmp_path / "o"
    for cfg, needle in [
        (CompareConfig(data=[good], out=out), "at least two data sets"),
        (CompareConfig(data=[good, tmp_path / "absent.jsonl"], out=out), f"{tmp_path / 'absent.jsonl'}: file not found"),
        (CompareConfig(data=[good, good], out=out), "labels must be unique"),
        (CompareConfig(data=[good, good], out=out, labels=["x", "y"], influence=[tmp_path]), "no influence.parquet"),
    ]:
        with pytest.raises(DynamicsError) as err:
            sample_table(cfg)
        assert needle in str(err.value)
    assert not out.exists()  # nothing half-written


def test_what_can_fail_is_checked_before_the_model_scores_a_set(tmp_path, monkeypatch):
    """A completion beyond the model's context in the last set is named before the first set is scored, and a
    bad influence folder before the model is loaded (both took the log p of the sets before them)."""
    import dynamics.models
    import dynamics.probes

    calls = {"load_model": 0, "completion_logprobs": 0}
    for module, name in ((dynamics.models, "load_model"), (dynamics.probes, "completion_logprobs")):
        real = getattr(module, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    a = jsonl(tmp_path / "a.jsonl", records("a", 4, 2))
    b = jsonl(tmp_path / "b.jsonl", [*records("b", 2, 2), {**records("c", 1, 5000)[0], "id": "long"}])
    with pytest.raises(DynamicsError) as err:
        sample_table(CompareConfig(data=[a, b], out=tmp_path / "o", model="tiny-llama"))
    assert f"{b}:3" in str(err.value) and "'completion (record long)'" in str(err.value), str(err.value)
    assert calls == {"load_model": 1, "completion_logprobs": 0}
    with pytest.raises(DynamicsError, match="no influence.parquet"):
        sample_table(CompareConfig(data=[a, a], labels=["x", "y"], out=tmp_path / "o", model="tiny-llama",
                                   influence=[tmp_path]))
    assert calls == {"load_model": 1, "completion_logprobs": 0}


def test_base_model_logprobs_equal_a_direct_forward_pass(tmp_path):
    """With --model, log p of each completion is the sum of the completion tokens' log-probabilities under the
    model (project tokenization), its mean per token, and the perplexity exp(−mean)."""
    from dynamics.data import collate, encode_record, read_records
    from dynamics.models import load_model

    a = jsonl(tmp_path / "a.jsonl", records("a", 4, 2))
    b = jsonl(tmp_path / "b.jsonl", records("b", 4, 6))
    s = sample_table(CompareConfig(data=[a, b], out=tmp_path / "o", model="tiny-llama", batch_size=3)).set_index("id")
    lm = load_model("tiny-llama")
    for rec in read_records(b)[:2]:
        enc = encode_record(lm.processing_class, rec)
        batch = collate([enc], lm.tokenizer.pad_token_id)
        with torch.no_grad():
            logits = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0]
        lp = torch.log_softmax(logits[:-1].double(), -1).gather(-1, batch["input_ids"][0, 1:, None])[:, 0]
        mask = batch["completion_mask"][0, 1:].bool()
        row = s.loc[rec["id"]]
        assert row["n_tokens"] == int(mask.sum())
        assert row["logp_sum"] == pytest.approx(lp[mask].sum().item(), abs=1e-3)
        assert row["ppl"] == pytest.approx(np.exp(-row["logp_mean"]))


def test_influence_is_joined_at_the_checkpoint_of_the_step_asked(tmp_path, monkeypatch):
    """``step`` picks the influence table's checkpoint (the earliest by default); a step the table lacks, or one
    held by two checkpoints, is one error naming the step (before, two step-0 checkpoints failed in pandas). The
    table is reduced to per-sample means as it is read, never loaded whole."""
    from dynamics.analyses import loader

    monkeypatch.setattr(loader, "read_parquet", lambda *a, **k: pytest.fail("a whole table was read"))
    gold = jsonl(tmp_path / "gold.jsonl", records("g", 4, 3))
    roll = jsonl(tmp_path / "rollouts.jsonl", records("r", 4, 2))

    def folder(name, ckpts):
        inf = tmp_path / name
        inf.mkdir()
        rows = [{"ckpt": ckpt, "step": step, "train_id": f"g{i}", "probe_id": "p0", "kernel": 1.0, "cosine": 0.1,
                 "train_norm": float(step + 1), "probe_norm": 1.0} for ckpt, step in ckpts for i in range(4)]
        pd.DataFrame(rows).to_parquet(inf / "influence.parquet")
        (inf / "manifest.json").write_text(json.dumps({"train": str(gold), "probes": str(tmp_path / "p.jsonl")}))
        return inf

    inf = folder("inf", [("sft/checkpoint-4", 4), ("base", 0)])
    for step, norm in ((None, 1.0), (0, 1.0), (4, 5.0)):
        s = sample_table(CompareConfig(data=[gold, roll], out=tmp_path / "o", influence=[inf], step=step))
        assert s.dropna(subset=["train_norm"]).train_norm.tolist() == [norm] * 4
    twins = folder("twins", [("base", 0), ("other-base", 0)])
    for table, step, needle in ((inf, 9, "no checkpoint at step 9 in"), (inf, 9, "it holds steps 0, 4"),
                                (twins, None, "field 'step': several checkpoints at step 0 (base, other-base)")):
        with pytest.raises(DynamicsError) as err:
            sample_table(CompareConfig(data=[gold, roll], out=tmp_path / "o", influence=[table], step=step))
        assert needle in str(err.value)


def test_influence_of_other_samples_under_the_same_ids_is_refused(tmp_path):
    """An influence folder is joined by training id only to the samples it was computed on: a data file whose
    sample differs from the table's under its id, or the table's own training file edited since, is one error
    (before, the kernels were joined to whatever the ids now hold)."""
    from dynamics.data import data_hash

    gold = jsonl(tmp_path / "gold.jsonl", records("g", 4, 3))
    roll = jsonl(tmp_path / "rollouts.jsonl", records("r", 4, 2))
    inf = tmp_path / "inf"
    inf.mkdir()
    pd.DataFrame([{"ckpt": "base", "step": 0, "train_id": f"g{i}", "probe_id": "p0", "kernel": 1.0, "cosine": 0.1,
                   "train_norm": 2.0, "probe_norm": 1.0} for i in range(4)]).to_parquet(inf / "influence.parquet")
    (inf / "manifest.json").write_text(json.dumps({"train": str(gold), "train_sha256": data_hash(gold),
                                                   "probes": str(tmp_path / "p.jsonl")}))
    s = sample_table(CompareConfig(data=[gold, roll], out=tmp_path / "o", influence=[inf]))
    assert s.dropna(subset=["train_norm"]).id.tolist() == ["g0", "g1", "g2", "g3"]
    edited = records("g", 4, 3)
    edited[1]["completion"] = "another answer"
    copy = jsonl(tmp_path / "copy.jsonl", edited)
    with pytest.raises(DynamicsError, match=r"copy.jsonl:2: field 'id': sample 'g1' is not the one the table at"):
        sample_table(CompareConfig(data=[copy, roll], out=tmp_path / "o", influence=[inf]))
    jsonl(gold, edited)
    with pytest.raises(DynamicsError, match=r"gold.jsonl: the table at .* was computed on this file, which \(or an "
                                            r"image it names\) has changed since"):
        sample_table(CompareConfig(data=[gold, roll], out=tmp_path / "o", influence=[inf]))

"""Analyses: statistics, the loader's errors, and every recipe on small hand-written result tables (in the
exact on-disk formats of DESIGN.md) whose answers are worked out here independently of the recipe code."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from dynamics.analyses import (
    base_alignment,
    influence_direction,
    influence_magnitude,
    knowledge_categories,
    learning_forgetting,
    loader,
    monitor,
    rollout_sign,
    selection,
    training,
)
from dynamics.analyses.loader import Study, read_jsonl_table
from dynamics.analyses.stats import (
    Claim,
    bootstrap_ci,
    cliffs_delta,
    cohens_d,
    holm,
    mean_ci,
    spearman,
    t_interval_diff,
)
from dynamics.errors import DynamicsError


# ------------------------------------------------------------------------------------------- fixtures
def jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def eval_rows(steps, task, probe_acc, logp_base, cats=None):
    rows = []
    for i, s in enumerate(steps):
        row = {"step": s, "task_accuracy": task[i], "task_reward": 2 * task[i], "probe_accuracy": probe_acc[i],
               "probe_logp": -1.0, "probe_logp_base": logp_base[i]}
        for c, vals in (cats or {}).items():
            row[f"probe_accuracy/{c}"] = vals[0][i]
            row[f"probe_logp_base/{c}"] = vals[1][i]
        rows.append(row)
    return rows


def record(i, prefix="s", **extra):
    return {"id": f"{prefix}{i}", "prompt": [{"role": "user", "content": f"q{i}"}],
            "completion": [{"role": "assistant", "content": f"a{i}"}], "answer": str(i), **extra}


def influence_dir(root, label, rows, train_path, probes_path):
    out = root / "influence" / label
    out.mkdir(parents=True)
    pd.DataFrame(rows, columns=["ckpt", "step", "train_id", "probe_id", "kernel", "cosine", "train_norm",
                                "probe_norm"]).to_parquet(out / "influence.parquet", index=False)
    (out / "manifest.json").write_text(json.dumps({"format": 1, "train": str(train_path), "probes": str(probes_path)}))
    return out


def influence_rows(train_norms, cosines, probe_norms, step=0, prefix="s"):
    """Rows for train samples i (norm train_norms[i]) and probes j (norm probe_norms[j]), cosine cosines[i][j]."""
    return [{"ckpt": f"checkpoint-{step}", "step": step, "train_id": f"{prefix}{i}", "probe_id": f"p{j}",
             "kernel": cosines[i][j] * tn * pn, "cosine": cosines[i][j], "train_norm": tn, "probe_norm": pn}
            for i, tn in enumerate(train_norms) for j, pn in enumerate(probe_norms)]


@pytest.fixture
def probes(tmp_path):
    return jsonl(tmp_path / "probes.jsonl", [record(j, "p", meta={"category": "facts" if j < 2 else "math"})
                                             for j in range(4)])


# ---------------------------------------------------------------------------------------------- statistics
def test_effect_sizes_match_their_definitions():
    rng = np.random.default_rng(0)
    x, y = rng.normal(0.3, 1, 23), np.round(rng.normal(0, 1, 31), 1)
    brute = np.mean([np.sign(a - b) for a in x for b in y])  # P(X>Y) − P(X<Y)
    assert cliffs_delta(x, y) == pytest.approx(brute, abs=1e-12)
    pooled = math.sqrt(((len(x) - 1) * x.var(ddof=1) + (len(y) - 1) * y.var(ddof=1)) / (len(x) + len(y) - 2))
    assert cohens_d(x, y) == pytest.approx((x.mean() - y.mean()) / pooled)
    assert spearman(x[:20], y[:20]) == pytest.approx(sps.spearmanr(x[:20], y[:20]).statistic)
    assert list(holm(np.array([0.01, 0.04, 0.03]))) == pytest.approx([0.03, 0.06, 0.06])


def test_bootstrap_interval_covers_the_mean_at_its_level():
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(120):
        m, ci = mean_ci(rng.exponential(1.0, 40), n_resamples=400, seed=int(rng.integers(1e9)))
        hits += ci[0] <= 1.0 <= ci[1]
    assert 0.86 <= hits / 120 <= 0.99  # nominal 0.95; BCa on a skewed sample of 40
    assert bootstrap_ci((np.array([1.0]),), np.mean) is None
    assert mean_ci(np.full(5, 2.0))[1] == (2.0, 2.0)


def test_bootstrap_of_many_samples_is_scipys_in_bounded_memory():
    """Intervals over thousands of training samples: scipy's bootstrap with the same seed (BCa up to
    BCA_MAX_N units, percentile above), fed in batches, so that memory does not grow with BCa's n² jackknife
    values (800 MB at n = 10,000 in one call) or with n_resamples · n."""
    import subprocess
    import sys

    from dynamics.analyses.stats import BCA_MAX_N

    rng = np.random.default_rng(2)
    for n, method in ((3_000, "BCa"), (BCA_MAX_N + 1, "percentile")):
        x = rng.exponential(1.0, n)
        ref = sps.bootstrap((x,), np.mean, vectorized=True, n_resamples=500, method=method,
                            rng=np.random.default_rng(7)).confidence_interval
        assert mean_ci(x, n_resamples=500, seed=7)[1] == pytest.approx((ref.low, ref.high), rel=1e-12)
    script = ("import numpy as np\n"
              "from dynamics.analyses.stats import BCA_MAX_N, mean_ci\n"
              "def peak(): return int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
              "x = np.random.default_rng(0).normal(size=BCA_MAX_N)\n"
              "base = peak()\n"
              "mean_ci(x)\n"
              "print(peak() - base)\n")  # VmHWM: this process's peak RSS (kB)
    grew_kb = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert grew_kb < 200_000, grew_kb


def test_seed_t_interval_equals_welch_free_pooled_t():
    a, b = np.array([0.5, 0.7, 0.6]), np.array([0.2, 0.1])
    est, ci = t_interval_diff(a, b)
    ref = sps.ttest_ind(a, b, equal_var=True).confidence_interval(0.95)
    assert est == pytest.approx(0.45) and ci == pytest.approx((ref.low, ref.high))
    assert t_interval_diff(np.array([1.0]), np.array([0.0])) == (1.0, None)


@pytest.mark.parametrize(("estimate", "ci", "expected", "verdict"), [
    (0.4, (0.1, 0.7), ">", "held"), (0.4, (-0.1, 0.7), ">", "inconclusive"), (-0.2, (-0.5, 0.1), ">", "did not hold"),
    (0.4, None, ">", "held"), (None, None, "<", "not measured"), (-0.3, (-0.4, -0.2), "<", "held")])
def test_claim_verdicts(estimate, ci, expected, verdict):
    c = Claim("k", "s", "m", expected, estimate, ci)
    assert c.verdict == verdict and c.to_dict()["verdict"] == verdict
    assert Claim("r", "s", "m", "<", 0.5, (0.4, 0.9), null=1.0).verdict == "held"


# -------------------------------------------------------------------------------------------------- loader
@pytest.mark.parametrize(("lines", "line", "field", "text"), [
    (['{"step": 0, "loss": 1.0}', '{"step": 1, "loss": ', '{"step": 2, "loss": 0.5}'], 2, None, "invalid JSON"),
    (['{"step": 0}'], 1, "loss", "missing"),
    (['{"step": 0, "loss": "high"}'], 1, "loss", "expected a number"),
    (['[1, 2]'], 1, None, "expected a JSON object"),
    ([''], None, None, "empty"),
])
def test_malformed_logs_name_file_line_and_field(tmp_path, lines, line, field, text):
    path = jsonl(tmp_path / "run" / "metrics.jsonl", lines)
    with pytest.raises(DynamicsError) as err:
        Study.discover(tmp_path).runs["run"].metrics  # noqa: B018
    e = err.value
    assert e.file == str(path) and e.line == line and e.field == field and text in e.message
    assert "\n" not in str(e)


def test_torn_last_line_is_skipped_and_resumed_steps_keep_the_last_row(tmp_path):
    path = jsonl(tmp_path / "m.jsonl", ['{"step": 1, "loss": 2.0}', '{"step": 1, "loss": 1.5}', '{"step": 2, "lo'])
    assert len(read_jsonl_table(path, ("step", "loss"))) == 2
    jsonl(tmp_path / "run" / "metrics.jsonl", path.read_text().splitlines())
    assert Study.discover(tmp_path).runs["run"].metrics["loss"].tolist() == [1.5]


def test_discovery_labels_seeds_and_bad_inputs(tmp_path, probes):
    for name in ("a/sft-seed0", "a/sft-seed1", "b/rft", "c/rft"):
        jsonl(tmp_path / "runs" / name / "eval.jsonl", eval_rows([0], [0.0], [1.0], [-0.5]))
    (tmp_path / "runs" / "b" / "rft" / "checkpoint-5").mkdir()
    jsonl(tmp_path / "runs" / "b" / "rft" / "checkpoint-5" / "eval.jsonl", ["{}"])  # inside a checkpoint: ignored
    study = Study.discover(tmp_path)
    assert sorted(study.runs) == ["runs/b/rft", "runs/c/rft", "sft-seed0", "sft-seed1"]
    assert sorted(study.run_groups()) == ["runs/b/rft", "runs/c/rft", "sft"]
    assert [r.seed for r in study.run_groups()["sft"]] == [0, 1]
    with pytest.raises(DynamicsError, match="folder not found"):
        Study.discover(tmp_path / "nope")

    moved = influence_dir(tmp_path, "y", influence_rows([1.0], [[0.1]], [1.0]), "/old/place/probes.jsonl", probes)
    assert Study.discover(tmp_path).influence["y"].input_path("train") == tmp_path / "probes.jsonl"  # found in root
    shutil.rmtree(moved)
    inf = influence_dir(tmp_path, "x", influence_rows([1.0], [[0.1]], [1.0]), tmp_path / "gone.jsonl", probes)
    study = Study.discover(tmp_path)
    with pytest.raises(DynamicsError) as err:
        study.influence["x"].train_records  # noqa: B018
    assert err.value.file == str(inf / "manifest.json") and err.value.field == "train"
    pd.DataFrame({"ckpt": ["c"], "step": [0]}).to_parquet(inf / "influence.parquet")
    with pytest.raises(DynamicsError, match="missing column") as err:
        Study.discover(tmp_path).influence["x"].per_sample  # noqa: B018
    assert err.value.file == str(inf / "influence.parquet")
    (inf / "influence.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(DynamicsError, match="parquet"):
        Study.discover(tmp_path).influence["x"].per_sample  # noqa: B018
    (inf / "manifest.json").write_text("{not json")
    with pytest.raises(DynamicsError, match="invalid JSON") as err:
        Study.discover(tmp_path).influence["x"].manifest  # noqa: B018
    assert err.value.file == str(inf / "manifest.json")
    # a run's rollout without its reward: named by its own line (blank lines count)
    rollouts = tmp_path / "runs" / "c" / "rft" / "rollouts.jsonl"
    rollouts.write_text(json.dumps({"prompt": "p", "completion": "c", "reward": 1.0}) + "\n\n"
                        + json.dumps({"prompt": "p", "completion": "d"}) + "\n")
    with pytest.raises(DynamicsError, match="needs a reward") as err:
        Study.discover(tmp_path).runs["runs/c/rft"].rollouts  # noqa: B018
    assert (err.value.file, err.value.line, err.value.field) == (str(rollouts), 3, "reward")


# ------------------------------------------------------------------------------ 1. learning vs forgetting
STEPS = [0, 10, 20, 30]
SFT = dict(task=[0.0, 0.5, 0.8, 0.8], probe_acc=[1.0, 0.8, 0.6, 0.5], logp_base=[-0.5, -0.8, -1.0, -1.1])
RFT = dict(task=[0.0, 0.1, 0.2, 0.3], probe_acc=[1.0, 1.0, 0.95, 0.95], logp_base=[-0.5, -0.52, -0.53, -0.55])


def test_learning_forgetting_numbers_by_hand(tmp_path):
    jsonl(tmp_path / "runs" / "sft" / "eval.jsonl", eval_rows(STEPS, **SFT))
    jsonl(tmp_path / "runs" / "rft" / "eval.jsonl", eval_rows(STEPS, **RFT))
    jsonl(tmp_path / "runs" / "sft" / "metrics.jsonl", [{"step": s, "loss": 1 / s, "lr": 1e-5, "grad_norm": 1.0}
                                                         for s in range(1, 31)])
    f = learning_forgetting.analyse(Study.discover(tmp_path))
    # mean task accuracy over 0..30 by trapezoids: SFT (2.5 + 6.5 + 8) / 30, RFT (0.5 + 1.5 + 2.5) / 30
    assert f.claim("sft_learns_faster").estimate == pytest.approx(17 / 30 - 4.5 / 30)
    assert f.claim("sft_forgets_more").estimate == pytest.approx(-0.6 - (-0.05))
    assert f.claim("sft_forgets_more_accuracy").estimate == pytest.approx(-0.5 - (-0.05))
    # matched task accuracy 0.3 = min(best 0.8, best 0.3): SFT reaches it at step 6 (log p −0.68), RFT at 30
    matched = f.claim("sft_forgets_more_matched")
    assert matched.estimate == pytest.approx(-0.18 - (-0.05)) and "30%" in matched.measure
    assert all(c.ci is None and "no interval" in c.detail for c in f.claims[:4])
    assert [c.verdict for c in f.claims[:4]] == ["held"] * 4
    assert f.claim("rollouts_learn_fast").verdict == "not measured"
    assert f.stats["logp_metric"] == "probe_logp_base"
    runs = f.tables["runs"].set_index("label")
    assert runs.loc["sft", "probe_accuracy_change"] == pytest.approx(-0.5)
    assert set(f.figures) == {"learning_forgetting"}
    t = training.analyse(Study.discover(tmp_path))
    assert t.stats == {"sft": {"steps": 30, "loss_first": 1.0, "loss_last": pytest.approx(1 / 30)}}
    assert training.needs(Study.discover(tmp_path / "runs" / "rft")) == "no run folder with metrics.jsonl"


def test_learning_forgetting_without_a_task_evaluation(tmp_path):
    """Runs evaluated on probes only: forgetting is measured, learning claims say what is missing."""
    for label, d in (("sft", SFT), ("rft", RFT)):
        jsonl(tmp_path / "runs" / label / "eval.jsonl",
              [{"step": s, "probe_accuracy": d["probe_acc"][i], "probe_logp": d["logp_base"][i]}
               for i, s in enumerate(STEPS)])
    f = learning_forgetting.analyse(Study.discover(tmp_path))
    assert f.claim("sft_forgets_more").estimate == pytest.approx(-0.55)  # gold log p, the only one stored
    assert f.claim("sft_learns_faster").verdict == "not measured"
    assert "task_accuracy is not stored" in f.claim("sft_learns_faster").detail
    assert "task_accuracy is not stored" in f.claim("sft_forgets_more_matched").detail


def test_learning_forgetting_intervals_from_seeds(tmp_path):
    for k, shift in enumerate((0.0, 0.1, -0.1)):
        jsonl(tmp_path / "runs" / f"sft-seed{k}" / "eval.jsonl",
              eval_rows(STEPS, SFT["task"], SFT["probe_acc"], [v + shift * (i > 0) for i, v in
                                                               enumerate(SFT["logp_base"])]))
    for k, shift in enumerate((0.0, 0.02)):
        jsonl(tmp_path / "runs" / f"rft-seed{k}" / "eval.jsonl",
              eval_rows(STEPS, RFT["task"], RFT["probe_acc"], [v + shift * (i > 0) for i, v in
                                                               enumerate(RFT["logp_base"])]))
    c = learning_forgetting.analyse(Study.discover(tmp_path)).claim("sft_forgets_more")
    ref = sps.ttest_ind([-0.6, -0.5, -0.7], [-0.05, -0.03]).confidence_interval(0.95)
    assert c.estimate == pytest.approx(-0.56) and c.ci == pytest.approx((ref.low, ref.high))
    assert "3 vs 2" in c.detail


def test_learning_forgetting_item_bootstrap_from_eval_parquet(tmp_path):
    """With per-item eval tables, intervals are a paired bootstrap over items and contain the estimate."""
    rng = np.random.default_rng(0)
    for label, p_task in (("sft", [0.0, 0.6, 0.9]), ("rft", [0.0, 0.1, 0.2])):
        thresholds = rng.random(40)
        correct = (thresholds[:, None] < np.array(p_task)[None, :]).astype(float)
        rows = [{"model": label, "step": s, "item_id": f"t{i}", "kind": "task", "category": "jigsaw",
                 "correct": correct[i, j], "logp_sum": -1.0, "logp_mean": -1.0}
                for j, s in enumerate((0, 10, 20)) for i in range(40)]
        run = tmp_path / "runs" / label
        jsonl(run / "eval.jsonl", eval_rows([0, 10, 20], correct.mean(0).tolist(), [1, 1, 1], [-0.5] * 3))
        pd.DataFrame(rows).to_parquet(run / "eval.parquet", index=False)
    c = learning_forgetting.analyse(Study.discover(tmp_path)).claim("sft_learns_faster")
    assert c.ci is not None and c.ci[0] < c.estimate < c.ci[1] and c.ci[0] > 0
    assert "paired bootstrap over 40" in c.detail


# ---------------------------------------------------------------------------- 2./3. magnitude and direction
@pytest.fixture(params=["whole", "in batches of 5 rows"])
def batches(request, monkeypatch):
    """Recipes reduce influence tables batch by batch: the same results from one batch or many."""
    if request.param != "whole":
        monkeypatch.setattr(loader, "BATCH_ROWS", 5)


@pytest.fixture
def two_sources(tmp_path, probes, batches):
    sft = jsonl(tmp_path / "data" / "sft.jsonl", [record(i, "g") for i in range(4)])
    rft = jsonl(tmp_path / "data" / "rft.jsonl", [record(i, "r") for i in range(4)])
    pn = [1.0, 2.0, 1.0, 2.0]
    cos_sft = [[-0.2, -0.1, 0.1, -0.2], [-0.1, -0.1, -0.1, 0.2], [0.0, -0.3, 0.1, -0.1], [-0.2, 0.1, -0.1, -0.2]]
    cos_rft = [[0.2, 0.1, 0.1, -0.1], [0.1, 0.3, 0.1, 0.2], [0.0, 0.1, 0.1, 0.1], [0.2, -0.1, 0.1, 0.2]]
    influence_dir(tmp_path, "sft", influence_rows([2.0, 4.0, 6.0, 8.0], cos_sft, pn, prefix="g")
                  + influence_rows([3.0, 5.0, 7.0, 9.0], cos_sft, pn, step=20, prefix="g"), sft, probes)
    influence_dir(tmp_path, "rft", influence_rows([1.0, 2.0, 3.0, 2.0], cos_rft, pn, prefix="r"), rft, probes)
    return tmp_path, np.array(cos_sft), np.array(cos_rft), np.array(pn)


def test_influence_magnitude_by_hand(two_sources):
    root, cos_sft, cos_rft, pn = two_sources
    f = influence_magnitude.analyse(Study.discover(root))
    norm = f.claim("rft_smaller_train_norm")
    assert norm.estimate == pytest.approx(2.0 / 5.0) and norm.null == 1.0 and norm.verdict == "held"
    assert "step 0" in norm.measure  # the only step both sources share
    k_sft = (np.abs(cos_sft) * pn).mean(1) * np.array([2.0, 4.0, 6.0, 8.0])
    k_rft = (np.abs(cos_rft) * pn).mean(1) * np.array([1.0, 2.0, 3.0, 2.0])
    assert f.claim("rft_smaller_mean_abs_kernel").estimate == pytest.approx(k_rft.mean() / k_sft.mean())
    assert f.claim("rollouts_smaller_train_norm").verdict == "not measured"
    means = f.tables["means"].set_index(["label", "step", "measure"])["mean"]
    assert means["sft", 20, "train_norm"] == pytest.approx(6.0)


def test_influence_direction_by_hand(two_sources):
    root, cos_sft, cos_rft, _ = two_sources
    f = influence_direction.analyse(Study.discover(root))
    aligned = f.claim("rft_aligned")
    assert aligned.estimate == pytest.approx(cos_rft.mean() - cos_sft.mean())
    assert aligned.ci[0] > 0 and aligned.verdict == "held"
    assert f.claim("rft_fewer_conflicts").estimate == pytest.approx((cos_rft < 0).mean() - (cos_sft < 0).mean())
    hist = f.tables["histogram"]  # sft at steps 0 and 20, rft at 0; bins shared by the sources at each step
    shared, alone = (np.histogram_bin_edges(c, 40) for c in (np.concatenate([cos_sft, cos_rft]), cos_sft))
    for label, step, cos, edges in (("sft", 0, cos_sft, shared), ("sft", 20, cos_sft, alone),
                                    ("rft", 0, cos_rft, shared)):
        h = hist[(hist["label"] == label) & (hist["step"] == step)].sort_values("lo")
        assert h["count"].tolist() == np.histogram(cos, edges)[0].tolist()
        np.testing.assert_allclose(h["lo"], edges[:-1])
        assert (h["density"] * (h["hi"] - h["lo"])).sum() == pytest.approx(1.0)


def test_cosine_histogram_of_a_checkpoint_without_gradients(tmp_path, probes, batches):
    """A checkpoint whose gradients are all zero (every cosine NaN) gets empty bins; the others keep theirs."""
    sft = jsonl(tmp_path / "data" / "sft.jsonl", [record(i, "g") for i in range(2)])
    cos = [[-0.2, 0.1, 0.3, 0.0], [0.4, -0.1, 0.2, 0.1]]
    influence_dir(tmp_path, "sft", influence_rows([1.0, 2.0], cos, [1.0] * 4, prefix="g")
                  + influence_rows([0.0, 0.0], [[float("nan")] * 4] * 2, [1.0] * 4, step=5, prefix="g"), sft, probes)
    hist = influence_direction.analyse(Study.discover(tmp_path)).tables["histogram"]
    assert hist[hist["step"] == 0]["count"].tolist() == np.histogram(cos, 40)[0].tolist()
    assert len(hist[hist["step"] == 5]) == 40 and hist[hist["step"] == 5]["count"].sum() == 0


# ------------------------------------------------------------------------------------- 4. base alignment
def test_base_alignment_by_hand(two_sources):
    root, *_ = two_sources
    from dynamics.analyses.compare import write_outputs

    logp = {"sft": [-1.0, -1.5, -2.0, -2.5], "rft": [-0.2, -0.5, -0.6, -0.4]}
    samples = pd.DataFrame([{"label": lab, "id": f"{lab[0] if lab == 'rft' else 'g'}{i}", "n_chars": 3,
                             "logp_mean": v, "ppl": math.exp(-v)} for lab, vals in logp.items()
                            for i, v in enumerate(vals)])
    write_outputs(root / "compare", samples, n_resamples=100, figure=False)
    f = base_alignment.analyse(Study.discover(root))
    assert f.claim("rft_closer_to_base").estimate == pytest.approx(np.mean(logp["rft"]) - np.mean(logp["sft"]))
    # norms joined from the influence folders by id: (−1.0, 2), (−1.5, 4), (−2.0, 6), (−2.5, 8), (−0.2, 1) ...
    x = logp["sft"] + logp["rft"]
    y = [2.0, 4.0, 6.0, 8.0, 1.0, 2.0, 3.0, 2.0]
    rho = f.claim("likelihood_predicts_magnitude")
    assert rho.estimate == pytest.approx(sps.spearmanr(x, y).statistic)
    assert f.stats["spearman_by_source"]["sft"]["rho"] == pytest.approx(-1.0)
    assert f.claim("rft_closer_to_base").detail.startswith("no shared prompts: unpaired")
    # when both sets answer the same prompts, the claim is the mean per-prompt difference (prompts 0..2 shared)
    samples["prompt_key"] = [f"q{i}" for i in range(4)] + ["q0", "q1", "q2", "other"]
    write_outputs(root / "compare", samples, n_resamples=100, figure=False)
    c = base_alignment.analyse(Study.discover(root)).claim("rft_closer_to_base")
    assert c.estimate == pytest.approx(np.mean(np.array(logp["rft"][:3]) - logp["sft"][:3]))
    assert c.detail.startswith("paired by prompt") and "3 prompts" in c.measure


# --------------------------------------------------------------------------------------- 5. rollout sign
def test_rollout_sign_push_and_groups_by_hand(tmp_path, probes, batches):
    # two prompts, two rollouts each; no stored advantage: GRPO's reward − mean reward of the prompt's group
    recs = [record(0, "r", reward=1.0), record(1, "r", reward=0.0), record(2, "r", reward=3.0),
            record(3, "r", reward=1.0)]
    recs[1]["prompt"] = recs[0]["prompt"]
    recs[3]["prompt"] = recs[2]["prompt"]
    data = jsonl(tmp_path / "data" / "rollouts.jsonl", recs)  # advantages: +0.5, −0.5, +1, −1
    cos = [[0.1, 0.2, 0.1, 0.2], [-0.1, 0.1, -0.2, 0.1], [0.2, 0.1, 0.2, 0.1], [0.1, -0.1, 0.1, -0.2]]
    pn, tn = np.array([1.0, 1.0, 2.0, 2.0]), np.array([1.0, 3.0, 2.0, 4.0])
    later = influence_rows(tn, -np.array(cos), pn, step=10, prefix="r")  # a later checkpoint: not the one used
    influence_dir(tmp_path, "rft", influence_rows(tn, cos, pn, prefix="r") + later, data, probes)
    f = rollout_sign.analyse(Study.discover(tmp_path))
    adv = np.array([0.5, -0.5, 1.0, -1.0])
    kernel = np.array(cos) * tn[:, None] * pn[None, :]
    push = f.tables["push"].set_index("probe_id")
    assert push["total"].to_numpy() == pytest.approx((adv[:, None] * kernel).mean(0))
    assert push["positive"].to_numpy() == pytest.approx((adv[[0, 2], None] * kernel[[0, 2]]).sum(0) / 4)
    assert f.tables["samples"].set_index("train_id")["group"].tolist() == ["positive", "negative"] * 2
    assert f.claim("positive_smaller_norm").estimate == pytest.approx(1.5 / 3.5)
    assert f.claim("positive_better_aligned").estimate == pytest.approx(
        np.mean(np.array(cos)[[0, 2]]) - np.mean(np.array(cos)[[1, 3]]))
    assert f.stats["counts"] == {"positive": 2, "negative": 2}


def test_an_input_file_edited_after_its_table_is_refused(tmp_path, probes):
    """The recipes read a table's training records (rewards) and probe records (categories) through its
    manifest: a file that no longer hashes as the manifest says is one error naming it, not its new contents
    joined to the table's rows."""
    from dynamics.analyses.loader import InfluenceSet
    from dynamics.data import data_hash

    recs = [record(i, "r", reward=float(i % 2)) for i in range(4)]
    recs[1]["prompt"], recs[3]["prompt"] = recs[0]["prompt"], recs[2]["prompt"]  # two groups of two rollouts
    data = jsonl(tmp_path / "data" / "rollouts.jsonl", recs)
    out = influence_dir(tmp_path, "rft", influence_rows([1.0, 2.0, 3.0, 4.0], [[0.1] * 4] * 4, [1.0] * 4,
                                                        prefix="r"), data, probes)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "train_sha256": data_hash(data),
                                                   "probes_sha256": data_hash(probes)}))
    assert rollout_sign.analyse(Study.discover(tmp_path)).stats["counts"] == {"positive": 2, "negative": 2}
    assert set(InfluenceSet("rft", out).probe_categories) == {"facts", "math"}
    jsonl(data, [{**r, "reward": 1.0 - r["reward"]} for r in recs])  # the rewards flipped after the table
    with pytest.raises(DynamicsError, match=r"rollouts.jsonl: the table at .* was computed on this file, which"):
        rollout_sign.analyse(Study.discover(tmp_path))
    jsonl(probes, [record(j, "p", meta={"category": "other"}) for j in range(4)])
    with pytest.raises(DynamicsError, match=r"probes.jsonl: the table at .* was computed on this file, which"):
        len(InfluenceSet("rft", out).probe_categories)


def test_rollout_sign_needs_rewarded_training_data(two_sources):
    root, *_ = two_sources
    assert "rollouts with rewards" in rollout_sign.needs(Study.discover(root))


# ----------------------------------------------------------------------------------- 6. knowledge categories
def test_knowledge_categories_by_hand(two_sources):
    root, cos_sft, cos_rft, pn = two_sources
    cats = {"facts": ([1.0, 0.5, 0.0, 0.0], [-0.5, -1.0, -1.5, -2.0]), "math": ([1.0, 1.0, 1.0, 0.5],
                                                                             [-0.5, -0.6, -0.6, -0.7])}
    jsonl(root / "runs" / "sft" / "eval.jsonl", eval_rows(STEPS, **SFT, cats=cats))
    f = knowledge_categories.analyse(Study.discover(root))
    fg = f.tables["forgetting"].set_index(["group", "category", "metric"])["change"]
    assert fg["sft", "facts", "probe_accuracy"] == pytest.approx(-1.0)
    assert fg["sft", "math", "probe_logp_base"] == pytest.approx(-0.2)
    assert f.stats["most_hurt"] == {"sft": "facts"}
    inf = f.tables["influence"].set_index(["label", "category", "measure"])["mean"]
    assert inf["sft", "facts", "mean_cosine"] == pytest.approx(cos_sft[:, :2].mean())  # probes p0, p1 are facts
    assert inf["rft", "math", "mean_cosine"] == pytest.approx(cos_rft[:, 2:].mean())
    assert f.stats["least_aligned"]["sft"] == ("facts" if cos_sft[:, :2].mean() < cos_sft[:, 2:].mean() else "math")


# ------------------------------------------------------------------------------------- beyond the study
def test_selection_by_hand(tmp_path):
    """SFT on a selected set vs the whole gold set at equal steps: forgetting and learning differences."""
    jsonl(tmp_path / "runs" / "sft" / "eval.jsonl", eval_rows(STEPS, **SFT))
    select = dict(task=[0.0, 0.3, 0.6, 0.7], probe_acc=[1.0, 0.9, 0.9, 0.85], logp_base=[-0.5, -0.6, -0.65, -0.7])
    jsonl(tmp_path / "variants" / "sft-select" / "eval.jsonl", eval_rows(STEPS, **select))
    assert selection.needs(Study.discover(tmp_path / "runs")) is not None
    f = selection.analyse(Study.discover(tmp_path))
    assert f.claim("select_forgets_less").estimate == pytest.approx(-0.2 - (-0.6))
    assert f.claim("select_forgets_less").verdict == "held"
    # mean task accuracy over 0..30: selected (1.5 + 4.5 + 6.5) / 30, gold (2.5 + 6.5 + 8) / 30: slower
    assert f.claim("select_learns_as_fast").estimate == pytest.approx(12.5 / 30 - 17 / 30)
    assert f.claim("select_learns_as_fast").verdict == "did not hold"
    assert f.stats["runs"]["sft-select"]["data"] == "gold, selected" and set(f.figures) == {"selection"}


def test_monitor_forecast_against_measurement_by_hand(tmp_path):
    """Refreshes at steps 0, 2, 4; per-probe predictions summed over each interval against measured changes."""
    rows = [{"step": 0, "measured_logp_per_probe": [-1.0, -2.0, -3.0]},
            {"step": 1, "predicted_dlogp_per_probe": [-0.1, 0.0, 0.1]},
            {"step": 2, "predicted_dlogp_per_probe": [-0.1, -0.2, 0.1], "measured_logp_per_probe": [-1.3, -2.1, -2.7]},
            {"step": 3, "predicted_dlogp_per_probe": [0.2, 0.0, -0.1]},
            {"step": 4, "predicted_dlogp_per_probe": [0.1, 0.0, -0.1], "measured_logp_per_probe": [-1.0, -2.1, -3.0]}]
    jsonl(tmp_path / "runs" / "sft" / "monitor.jsonl", rows)
    jsonl(tmp_path / "runs" / "sft" / "metrics.jsonl", [{"step": s, "loss": 1.0} for s in range(1, 5)])
    f = monitor.analyse(Study.discover(tmp_path))
    pairs = f.tables["intervals"]
    assert list(pairs["predicted"]) == pytest.approx([-0.2, -0.2, 0.2, 0.3, 0.0, -0.2])
    assert list(pairs["measured"]) == pytest.approx([-0.3, -0.1, 0.3, 0.3, 0.0, -0.3])
    c = f.claim("forecast_sft")
    assert c.estimate == pytest.approx(np.corrcoef(pairs["predicted"], pairs["measured"])[0, 1])
    path = f.tables["path"]
    assert path[(path["step"] == 3)]["forecast"].item() == pytest.approx(np.mean([-1.1, -2.1, -2.8]))
    (tmp_path / "empty").mkdir()
    assert monitor.needs(Study.discover(tmp_path / "empty")) is not None

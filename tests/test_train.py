"""Training wrappers: SFT/RFT run folders, checkpoints on a schedule, resume, LoRA, multi-process, VLMs.

Tiny models wherever the mechanics are the point; the default SmolLM2 for a few steps where realism is
(a real forgetting signal, GRPO rollouts on the jigsaw task).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from dynamics.data import collate, encode_record, read_records, text_of, write_records
from dynamics.errors import DynamicsError
from dynamics.models import load_model, native_bf16, resolve_checkpoints
from dynamics.probes import completion_logprobs
from dynamics.store import read_jsonl_rows
from dynamics.train.rft import RFTRunConfig, build_rft_trainer, train_rft
from dynamics.train.rollouts import RolloutsConfig, make_rollouts
from dynamics.train.run import load_config, run_trainer
from dynamics.train.schedules import checkpoint_steps, log_steps
from dynamics.train.sft import CompletionCollator, SFTRunConfig, build_sft_trainer, sft_dataset, train_sft

ROOT = Path(__file__).resolve().parents[1]


def sums(n: int = 16) -> list[dict]:
    return [{"id": f"s{i}", "prompt": f"{i % 7}+{i % 5}=", "completion": str(i % 7 + i % 5)} for i in range(n)]


def sft_config(tmp_path: Path, name: str = "run", **kw) -> SFTRunConfig:
    opts = dict(model="tiny-llama", output_dir=str(tmp_path / name), max_steps=6, learning_rate=3e-3,
                per_device_train_batch_size=4, disable_tqdm=True, seed=0)
    return load_config(SFTRunConfig, None, **{**opts, **kw})


def logp(lm, records) -> torch.Tensor:
    """Summed log p of each record's completion tokens (the probes' measure, dynamics.probes)."""
    return torch.tensor(completion_logprobs(lm, records, batch_size=16)["logp_sum"].to_numpy())


# ------------------------------------------------------------------------------------------------ schedules
def test_checkpoint_schedules():
    steps = log_steps(12, 1000)
    assert len(steps) == 12 and steps[0] == 1 and steps[-1] == 1000 and steps == sorted(set(steps))
    assert all(b / a < 2.2 for a, b in zip(steps[2:], steps[3:], strict=False))  # geometric, not linear
    assert log_steps(12, 5) == [1, 2, 3, 4, 5]
    assert checkpoint_steps("every:4", 10) == [4, 8, 10]
    assert checkpoint_steps(None, 10, every=5) == [5, 10]
    assert checkpoint_steps("steps:3,7,50", 10) == [3, 7, 10]
    assert checkpoint_steps("none", 10) == [10] == checkpoint_steps(None, 10)
    for bad in ("log", "log:0", "every:x", "steps:", "weekly:3"):
        with pytest.raises(DynamicsError):
            checkpoint_steps(bad, 10)


# ------------------------------------------------------------------------------------------------------ SFT
def test_sft_loss_is_the_completion_nll_and_training_raises_log_p(tmp_path):
    """TRL's loss on our pre-tokenized rows is exactly the mean NLL of the completion tokens the probes score;
    training lowers it and raises log p of the training completions."""
    recs = sums(16)
    base = completion_logprobs(load_model("tiny-llama"), recs)
    nll0, n_tok = -base["logp_sum"].sum(), base["n_tokens"].sum()
    res = train_sft(sft_config(tmp_path, max_steps=12, per_device_train_batch_size=16, learning_rate=1e-2), recs)
    rows = read_jsonl_rows(res.run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[0]["loss"] == pytest.approx(nll0 / n_tok, rel=1e-5)  # batch = all records at the initial weights
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    assert {"lr", "grad_norm", "mean_token_accuracy"} <= set(rows[0])
    trained = load_model(res.run / "checkpoint-12")
    nll1 = -logp(trained, recs).sum().item()
    assert nll1 < 0.8 * nll0  # log p of the training completions rose
    manifest = json.loads((res.run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["base_model"] == "tiny-llama" and manifest["steps"] == 12
    assert manifest["data"]["sha256"] and manifest["config"]["learning_rate"] == 1e-2


def test_collator_labels_exactly_the_completion_tokens(tiny_lm):
    recs = sums(3)
    ds = sft_dataset(tiny_lm.tokenizer, recs)
    batch = CompletionCollator(tiny_lm.tokenizer.pad_token_id)([ds[i] for i in range(3)])
    for i, rec in enumerate(recs):
        enc = encode_record(tiny_lm.tokenizer, rec)
        n = len(enc.input_ids)
        want = [t if m else -100 for t, m in zip(enc.input_ids, enc.completion_mask, strict=True)]
        assert batch["labels"][i, :n].tolist() == want and (batch["labels"][i, n:] == -100).all()
        assert tiny_lm.tokenizer.decode([t for t in want if t != -100]).startswith(text_of(rec["completion"]))


def test_checkpoint_schedule_optimizer_policy_and_atomic_folders(tmp_path):
    res = train_sft(sft_config(tmp_path, max_steps=10, checkpoint_schedule="log:4"), sums(8))
    want = checkpoint_steps("log:4", 10)
    assert res.checkpoints == want == [1, 2, 5, 10]
    assert sorted(p.name for p in res.run.iterdir()) == sorted(
        ["README.md", "manifest.json", "metrics.jsonl"] + [f"checkpoint-{s}" for s in want])  # no .staging left
    assert [c.step for c in resolve_checkpoints(res.run)] == want
    for s in want:
        m = json.loads((res.run / f"checkpoint-{s}" / "manifest.json").read_text())
        assert m["step"] == s and m["base_model"] == "tiny-llama" and m["kind"] == "sft"
        assert (res.run / f"checkpoint-{s}" / "optimizer.pt").exists() == (s == 10)  # 'last' policy


CAPITALS = [("France", "Paris", "Lyon"), ("Italy", "Rome", "Milan"), ("Japan", "Tokyo", "Osaka"),
            ("Germany", "Berlin", "Munich"), ("Spain", "Madrid", "Seville"), ("Canada", "Ottawa", "Toronto"),
            ("Australia", "Canberra", "Sydney"), ("Egypt", "Cairo", "Alexandria")]
UNRELATED = [("largest planet in the solar system", "Jupiter"), ("chemical symbol for gold", "Au"),
             ("tallest mountain on Earth", "Mount Everest"), ("largest ocean on Earth", "the Pacific Ocean"),
             ("boiling point of water at sea level", "100 degrees Celsius"),
             ("author of Romeo and Juliet", "William Shakespeare"), ("fastest land animal", "the cheetah"),
             ("smallest prime number", "2")]


@pytest.mark.slow
def test_sft_on_false_facts_makes_the_default_model_forget_them(tmp_path, default_lm):
    """A real forgetting signal: one SFT step on false capitals (asked in other words, answered in the base
    model's own format) lower log p of the true-capital probes, while probes of unrelated facts in the same
    format gain (the format is reinforced) -- so the drop is the conflicting knowledge being overwritten."""
    train = [{"id": f"t{i}", "prompt": f"Which city is the capital of {c}?", "completion": f"The capital of {c} is {f}."}
             for i, (c, _, f) in enumerate(CAPITALS)]
    probes = [{"id": f"p{i}", "prompt": f"What is the capital of {c}?", "completion": f"The capital of {c} is {t}."}
              for i, (c, t, _) in enumerate(CAPITALS)]
    control = [{"id": f"c{i}", "prompt": f"What is the {q}?", "completion": f"The {q} is {a}."}
               for i, (q, a) in enumerate(UNRELATED)]
    before = [logp(default_lm, recs) for recs in (probes, control)]
    cfg = sft_config(tmp_path, model="default", max_steps=1, per_device_train_batch_size=8, learning_rate=2e-4,
                     bf16=native_bf16(), optimizer_state="none")
    trainer, resume = build_sft_trainer(cfg, train)
    run_trainer(trainer, cfg, resume, trainer.run_info)
    trained = SimpleNamespace(model=trainer.model.eval(), processing_class=default_lm.tokenizer,
                              tokenizer=default_lm.tokenizer)
    d_probe, d_control = (logp(trained, recs) - b for recs, b in zip((probes, control), before, strict=True))
    assert (d_probe < 0).all() and d_probe.mean() < -1  # nats per probe completion: every true capital lost
    assert d_control.mean() > 0 and d_probe.mean() < d_control.mean() - 2


def test_bf16_on_a_cpu_that_emulates_it_is_noted(tmp_path, capsys):
    """A CPU run under bf16 autocast says, in one line, when the CPU has no native bf16 (it is then slower than
    fp32); an fp32 run, or a CPU with AVX512-BF16 or AMX, says nothing about it."""
    for bf16 in (True, False):
        train_sft(sft_config(tmp_path, f"bf16-{bf16}", max_steps=1, bf16=bf16, optimizer_state="none"), sums(4))
        noted = [line for line in capsys.readouterr().err.splitlines() if "bf16 autocast is emulated" in line]
        assert len(noted) == (bf16 and not torch.cuda.is_available() and not native_bf16())


def test_in_run_eval_starts_at_the_base_and_matches_offline_eval(tmp_path):
    """eval.jsonl gets a row at step 0 (the base model), every N steps and at the end; the last row equals
    evaluating the saved checkpoint offline with the same inputs."""
    from dynamics.evaluate import EvalConfig, evaluate_model, summarise
    from dynamics.probes import text_suite
    from dynamics.tasks import get_task

    probes = write_records(tmp_path / "probes.jsonl", text_suite()[:6])
    task = get_task("jigsaw")
    res = train_sft(sft_config(tmp_path, max_steps=4, eval_every=2, eval_task="jigsaw", eval_n=4,
                               probes=str(probes)), task.build(16, 0))
    rows = read_jsonl_rows(res.run / "eval.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert {"task_accuracy", "task_reward", "probe_accuracy", "probe_logp"} <= set(rows[0])
    assert rows[0]["probe_logp"] != rows[-1]["probe_logp"]  # the probes' log p moved with training
    import pandas as pd

    items = pd.read_parquet(res.run / "eval.parquet")
    assert sorted(items.groupby("step").size().items()) == [(0, 10), (2, 10), (4, 10)]
    ec = EvalConfig(task="jigsaw", n_task=4, progress=False)
    offline = summarise(evaluate_model(load_model(res.run / "checkpoint-4"), task.build(4, ec.task_seed),
                                       read_records(probes), ec, step=4))
    assert offline == pytest.approx({k: v for k, v in rows[-1].items() if k != "step"}, rel=1e-4)


def test_evaluation_records_without_their_task_are_scored_by_the_eval_task(tmp_path):
    """--eval-data records that do not name their task (meta.task) are scored by eval_task: the same rows as
    scoring the records that name it."""
    import pandas as pd

    from dynamics.evaluate import EvalConfig, evaluate_model
    from dynamics.probes import text_suite
    from dynamics.tasks import get_task

    named = get_task("jigsaw").build(3, 5)
    bare = write_records(tmp_path / "bare.jsonl", [{**r, "meta": {}} for r in named])
    probes = write_records(tmp_path / "probes.jsonl", text_suite()[:2])
    res = train_sft(sft_config(tmp_path, max_steps=1, eval_every=1, eval_task="jigsaw", eval_data=str(bare),
                               probes=str(probes)), get_task("jigsaw").build(8, 0))
    rows = pd.read_parquet(res.run / "eval.parquet").query("kind == 'task' and step == 1").reset_index(drop=True)
    offline = evaluate_model(load_model(res.run / "checkpoint-1"), named, [], EvalConfig(task=None, progress=False),
                             step=1)
    assert list(rows["item_id"]) == [r["id"] for r in named]
    cols = ["response", "reward", "hit", "format", "correct", "logp_sum"]
    pd.testing.assert_frame_equal(rows[cols], offline[cols], check_dtype=False)


def test_runs_from_one_base_share_the_step0_evaluation(tmp_path):
    """eval_base_from copies the base evaluation of a run with the same model and evaluation inputs (and only
    then): its step-0 rows equal a fresh evaluation's. A base model folder retrained in place is a new model."""
    import pandas as pd

    from dynamics.probes import text_suite
    from dynamics.tasks import get_task

    probes = write_records(tmp_path / "probes.jsonl", text_suite()[:4])
    other = write_records(tmp_path / "other.jsonl", text_suite()[4:8])
    train = get_task("jigsaw").build(8, 0)
    base = tmp_path / "base"
    load_model("tiny-llama").save(base)

    def run(name, probe_file, base_from=None):
        res = train_sft(sft_config(tmp_path, name, model=str(base), max_steps=1, eval_every=1, eval_task="jigsaw",
                                   eval_n=3, probes=str(probe_file), eval_base_from=base_from), train)
        return read_jsonl_rows(res.run / "eval.jsonl"), pd.read_parquet(res.run / "eval.parquet")

    first, first_items = run("a", probes)
    shared, shared_items = run("b", probes, base_from=str(tmp_path / "a"))
    assert shared[0]["reused_from"] == str(tmp_path / "a")
    assert {k: v for k, v in shared[0].items() if k != "reused_from"} == first[0]
    pd.testing.assert_frame_equal(shared_items[shared_items.step == 0].drop(columns="model"),
                                  first_items[first_items.step == 0].drop(columns="model"))
    assert set(shared_items["model"]) == {"b"} and [r["step"] for r in shared] == [0, 1]
    fresh, _ = run("c", other, base_from=str(tmp_path / "a"))  # other probes: evaluated, not copied
    assert "reused_from" not in fresh[0] and fresh[0]["probe_logp"] != first[0]["probe_logp"]
    with torch.no_grad():  # other weights in the base folder: evaluated, not copied
        moved = load_model(str(base))
        for p in moved.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0), dtype=p.dtype))
    moved.save(base)
    retrained, _ = run("d", probes, base_from=str(tmp_path / "a"))
    assert "reused_from" not in retrained[0] and retrained[0]["probe_logp"] != first[0]["probe_logp"]


def test_training_keys_hold_the_images_bytes(tmp_path):
    """What a resume checks its data against (``data_hash`` of the manifest), and what a run's step-0 evaluation
    is shared under (``eval_base_from``), change when an image is rewritten under its path."""
    from PIL import Image

    from dynamics.evaluate import EvalConfig
    from dynamics.tasks import get_task
    from dynamics.train.callbacks import EvalCallback
    from dynamics.train.run import data_fingerprint

    records = get_task("jigsaw", preset="image", patch_size=28, image_dir=str(tmp_path / "img")).build(2, seed=0)
    path = write_records(tmp_path / "train.jsonl", records)

    def keys():
        return (data_fingerprint(path), data_fingerprint(None, records),
                EvalCallback(None, records, [], EvalConfig(), 1, tmp_path / "run").inputs_key)

    before = keys()
    assert keys() == before
    Image.open(records[0]["images"][0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(records[0]["images"][0])
    assert all(a != b for a, b in zip(keys(), before, strict=True))


@pytest.mark.slow
def test_grpo_on_the_default_model_logs_rollouts_with_rewards_and_advantages(tmp_path):
    from dynamics.tasks import get_task

    task = get_task("jigsaw")
    cfg = load_config(RFTRunConfig, None, model="default", output_dir=str(tmp_path / "rft"), max_steps=2,
                      n_prompts=4, bf16=native_bf16(), disable_tqdm=True, seed=0, optimizer_state="none")
    res = train_rft(cfg)
    assert (cfg.prompts_per_step, cfg.num_generations, cfg.per_device_train_batch_size) == (2, 8, 16)
    assert cfg.max_completion_length == task.max_new_tokens
    rows = check_rollouts(res.run, task, steps=2, group=8, prompts=2)
    assert len({r["reward"] for r in rows}) > 1  # the base model's samples differ in reward: a learning signal
    assert all(r["meta"]["rewards"].keys() == {"jigsaw_accuracy", "jigsaw_hit", "jigsaw_format"} for r in rows)
    metrics = read_jsonl_rows(res.run / "metrics.jsonl")
    for m in metrics:
        acc = [r["meta"]["score"]["accuracy"] for r in rows if r["step"] == m["step"]]
        assert m["accuracy"] == pytest.approx(sum(acc) / len(acc))
        assert {"loss", "lr", "grad_norm", "reward_std"} <= set(m)


class Interrupt(TrainerCallback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt


def test_resume_reaches_the_uninterrupted_weights(tmp_path, capsys):
    recs = sums(16)
    full = train_sft(sft_config(tmp_path, "full", checkpoint_every=2), recs)
    with pytest.raises(KeyboardInterrupt):
        train_sft(sft_config(tmp_path, "cut", checkpoint_every=2), recs, callbacks=[Interrupt(3)])
    cut = tmp_path / "cut"
    assert json.loads((cut / "manifest.json").read_text())["status"] == "interrupted"
    (cut / "checkpoint-4").mkdir()  # a half-written checkpoint (no manifest) must be ignored and removed
    with pytest.raises(DynamicsError, match="--resume"):
        train_sft(sft_config(tmp_path, "cut", checkpoint_every=2), recs)
    with pytest.raises(DynamicsError, match="data_hash"):  # other data would not continue the same run
        train_sft(sft_config(tmp_path, "cut", checkpoint_every=2, resume=True), recs[:8])
    resumed = train_sft(sft_config(tmp_path, "cut", checkpoint_every=2, resume=True), recs)
    assert resumed.steps == 4 and resumed.checkpoints == [2, 4, 6]
    a, b = load_file(full.run / "checkpoint-6/model.safetensors"), load_file(cut / "checkpoint-6/model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    losses = [r["loss"] for r in read_jsonl_rows(cut / "metrics.jsonl")]
    assert [r["step"] for r in read_jsonl_rows(cut / "metrics.jsonl")] == list(range(1, 7))
    assert losses == pytest.approx([r["loss"] for r in read_jsonl_rows(full.run / "metrics.jsonl")], rel=1e-6)
    m = json.loads((cut / "manifest.json").read_text())
    assert m["status"] == "completed" and m["resumes"][0]["from"] == "checkpoint-2"
    assert m["resumes"][0]["changed"] == {}  # the same options: nothing to report
    # extending a run with another learning rate: the manifest keeps only the latest config, so the resume
    # entry records what changed, and the user is told
    capsys.readouterr()
    train_sft(sft_config(tmp_path, "cut", checkpoint_every=2, resume=True, max_steps=8, learning_rate=1e-3), recs)
    m = json.loads((cut / "manifest.json").read_text())
    assert m["resumes"][1]["changed"] == {"max_steps": [6, 8], "learning_rate": [3e-3, 1e-3]}
    err = capsys.readouterr().err
    assert "resuming from checkpoint-6 with changed options:" in err
    assert "max_steps 6 -> 8" in err and "learning_rate 0.003 -> 0.001" in err


def test_lora_adapter_checkpoint_is_read_by_load_model_influence_and_eval(tmp_path):
    recs = sums(8)
    trainer, resume = build_sft_trainer(sft_config(tmp_path, max_steps=4, lora_r=4, learning_rate=3e-2), recs)
    res = run_trainer(trainer, trainer.args, resume, trainer.run_info)
    ckpt = res.run / "checkpoint-4"
    assert (ckpt / "adapter_config.json").exists() and not (ckpt / "model.safetensors").exists()
    lm = load_model(ckpt)
    assert lm.is_peft and json.loads((ckpt / "manifest.json").read_text())["lora"] is True
    batch = collate([encode_record(lm.tokenizer, r) for r in recs], lm.tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(**inputs).logits
        got = lm.model(**inputs).logits
        base = load_model("tiny-llama").model(**inputs).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, base, atol=1e-3)
    # what `dynamics influence --ckpt` and `dynamics eval` run on it
    from dynamics.evaluate import EvalConfig, run_eval
    from dynamics.influence import InfluenceConfig, compute
    from dynamics.probes import text_suite

    table = compute(lm, recs[:2], recs[2:5], InfluenceConfig(params="lora", target="gold"), ckpt=str(ckpt), step=4)
    assert len(table) == 6 and table["kernel"].abs().gt(0).all() and table["train_norm"].gt(0).all()
    df = run_eval(res.run, [], text_suite()[:3], EvalConfig(task=None, progress=False), tmp_path / "eval")
    assert set(df["step"]) == {4} and len(df) == 3 and df["logp_sum"].notna().all()


def test_config_file_reaches_every_trl_option(tmp_path, cli):
    data = write_records(tmp_path / "train.jsonl", [{"id": r["id"], "prompt": r["prompt"],
                                                     "completion": r["completion"]} for r in sums(8)])
    (tmp_path / "cfg.yaml").write_text("lr_scheduler_type: constant\nweight-decay: 0.01\nmax_steps: 2\n")
    out = cli("train", "sft", "--model", "tiny-llama", "--data", str(data), "--out", str(tmp_path / "run"),
              "--config", str(tmp_path / "cfg.yaml"), "--lr", "0.001", "--batch-size", "4")
    assert out.returncode == 0, out.stderr
    assert "2 steps" in out.stdout and "checkpoints [2]" in out.stdout
    # the progress bar carries the last loss; no dict of logged values is printed per step
    assert "loss=" in out.stderr and "{'loss'" not in out.stdout + out.stderr
    cfg = json.loads((tmp_path / "run/manifest.json").read_text())["config"]
    assert (cfg["lr_scheduler_type"], cfg["weight_decay"], cfg["learning_rate"]) == ("constant", 0.01, 0.001)
    assert {r["lr"] for r in read_jsonl_rows(tmp_path / "run/metrics.jsonl")} == {0.001}  # constant schedule
    (tmp_path / "bad.yaml").write_text("learning_rat: 3\n")
    with pytest.raises(DynamicsError) as err:
        load_config(SFTRunConfig, tmp_path / "bad.yaml", output_dir=str(tmp_path / "r2"))
    assert (err.value.file, err.value.field) == (str(tmp_path / "bad.yaml"), "learning_rat")
    with pytest.raises(DynamicsError, match="optimizer_state"):
        load_config(SFTRunConfig, None, output_dir=str(tmp_path / "r2"), optimizer_state="some")
    # PyYAML (YAML 1.1) reads 1e-4 as a string, which torch's optimizer then refused with a traceback
    (tmp_path / "exp.yaml").write_text("learning_rate: 1e-4\nweight_decay: 5E-3\nmax_grad_norm: 2e0\nwarmup_steps: 3\n")
    cfg = load_config(SFTRunConfig, tmp_path / "exp.yaml", output_dir=str(tmp_path / "r3"))
    assert (cfg.learning_rate, cfg.weight_decay, cfg.max_grad_norm, cfg.warmup_steps) == (1e-4, 5e-3, 2.0, 3)


def test_rft_cli_on_jigsaw(tmp_path, cli):
    out = cli("train", "rft", "--model", "tiny-llama", "--task", "jigsaw", "--task-args", "preset=text-0shot",
              "--n-prompts", "4", "--out", str(tmp_path / "run"), "--max-steps", "1", "--group-size", "2",
              "--max-new-tokens", "6", "--beta", "0.1", "--epsilon", "0.3", "--temperature", "0.9")
    assert out.returncode == 0, out.stderr
    assert "1 steps" in out.stdout and "checkpoints [1]" in out.stdout and "reward_mean" in out.stdout
    assert "Warning" not in out.stderr, out.stderr  # (TRL's use of a deprecated transformers property, filtered)
    cfg = json.loads((tmp_path / "run/manifest.json").read_text())["config"]
    assert (cfg["beta"], cfg["epsilon"], cfg["temperature"], cfg["num_generations"]) == (0.1, 0.3, 0.9, 2)
    assert cfg["per_device_train_batch_size"] == 4 and cfg["max_completion_length"] == 6
    rows = read_jsonl_rows(tmp_path / "run/rollouts.jsonl")
    assert len(rows) == 4 and all(r["meta"]["task"] == "jigsaw" and r["step"] == 1 for r in rows)


def test_two_process_accelerate_launch(tmp_path):
    data = write_records(tmp_path / "train.jsonl", sums(16))
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dynamics.cli",
           "train", "sft", "--model", "tiny-llama", "--data", str(data), "--out", str(tmp_path / "run"),
           "--max-steps", "2", "--batch-size", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("2 steps") == 1  # one process reports
    rows = read_jsonl_rows(tmp_path / "run/metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0.25, 0.5]  # 2 processes x 2 records per step over 16 records
    ckpt = tmp_path / "run/checkpoint-2"
    assert (ckpt / "rng_state_0.pth").exists() and (ckpt / "rng_state_1.pth").exists()
    assert load_model(ckpt).kind == "causal-lm"


# ------------------------------------------------------------------------------------------------------ RFT
def say_task(images: list[str] | None = None) -> SimpleNamespace:
    """A small local task for the tiny models: say the digit; rewards vary with the (random) completions."""

    def score(text: str, answer: str) -> dict:
        acc = float(text.strip() == answer)
        hit = float(answer in text)
        fmt = len(set(text)) / max(len(text), 1)  # varies across random samples, so advantages do too
        return {"accuracy": acc, "hit": hit, "format": fmt, "total": acc + hit + fmt}

    def reward(key):
        def f(completions, answer, **kwargs):
            return [score(c if isinstance(c, str) else text_of(c), a)[key] for c, a in zip(completions, answer,
                                                                                         strict=True)]
        f.__name__ = key
        return f

    def build(n: int, seed: int) -> list[dict]:
        out = []
        for i in range(n):
            rec = {"id": f"p{seed}-{i}", "prompt": [{"role": "user", "content": f"Say {i % 10}"}],
                   "answer": str(i % 10), "meta": {"category": "say"}}
            if images:
                rec["images"] = [images[i % len(images)]]
            out.append(rec)
        return out

    return SimpleNamespace(name="say", build=build, score=score, max_new_tokens=6,
                           reward_funcs=[reward("accuracy"), reward("hit"), reward("format")])


def check_rollouts(run: Path, task, steps: int, group: int, prompts: int) -> list[dict]:
    rows = read_jsonl_rows(run / "rollouts.jsonl")
    assert len(rows) == steps * group * prompts
    for r in rows:
        s = task.score(text_of(r["completion"]), r["answer"])
        assert r["reward"] == pytest.approx(s["total"], abs=1e-5) and r["meta"]["score"]["total"] == s["total"]
    groups: dict = {}
    for r in rows:  # ids are <prompt id>:s<step>:<position in the step's generation batch>
        groups.setdefault((r["step"], int(r["id"].rsplit(":", 1)[1]) // group), []).append(r)
    for g in groups.values():  # advantages are TRL's group-normalised rewards of exactly these rollouts
        assert len({r["meta"]["prompt_id"] for r in g}) == 1 and len(g) == group
        rw = torch.tensor([r["reward"] for r in g])
        adv = (rw - rw.mean()) / (rw.std() + 1e-4)
        assert [r["advantage"] for r in g] == pytest.approx(adv.tolist(), abs=1e-4)
    metrics = read_jsonl_rows(run / "metrics.jsonl")
    for m in metrics:
        step_rows = [r["reward"] for r in rows if r["step"] == m["step"]]
        assert m["reward_mean"] == pytest.approx(sum(step_rows) / len(step_rows), abs=1e-5)
    return rows


def test_rft_vlm_end_to_end_images_reach_generation_and_loss(tmp_path):
    """GRPO on the tiny VLM with image-jigsaw prompts (the local task's rewards, which vary for a random model):
    the images reach sampling and the training forward, and the policy gradient reaches the vision tower."""
    from dynamics.tasks import get_task

    records = get_task("jigsaw", preset="image-direct", image_dir=str(tmp_path / "img")).build(8, 0)
    task = say_task()
    cfg = load_config(RFTRunConfig, None, model="tiny-qwen2.5-vl", output_dir=str(tmp_path / "run"), max_steps=2,
                      learning_rate=1e-2, num_generations=4, disable_tqdm=True, seed=0, beta=0.04)
    trainer, resume = build_rft_trainer(cfg, task=task, records=records)
    calls = []
    visual = trainer.model.model.visual
    visual.register_forward_hook(lambda m, args, out: calls.append(torch.is_grad_enabled()))
    before = {k: v.clone() for k, v in visual.state_dict().items()}
    res = run_trainer(trainer, cfg, resume, trainer.run_info)
    assert res.checkpoints == [2]
    assert False in calls and True in calls  # images in sampling (no grad) and in the training forward
    after = visual.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # policy gradient reached the vision tower
    rows = check_rollouts(res.run, task, steps=2, group=4, prompts=2)
    by_id = {r["id"]: r for r in records}
    assert all(r["images"] == by_id[r["meta"]["prompt_id"]]["images"] for r in rows)
    lm = load_model(res.run / "checkpoint-2")
    assert lm.kind == "vlm" and (res.run / "checkpoint-2/preprocessor_config.json").exists()
    assert "kl" in read_jsonl_rows(res.run / "metrics.jsonl")[0]


def test_sft_vlm_end_to_end_on_image_jigsaw_records(tmp_path):
    from dynamics.tasks import get_task

    data = tmp_path / "train.jsonl"
    write_records(data, get_task("jigsaw", preset="image-direct", image_dir=str(tmp_path / "img")).build(4, 0))
    res = train_sft(sft_config(tmp_path, model="tiny-qwen2.5-vl", data=str(data), max_steps=3, learning_rate=1e-2))
    losses = [r["loss"] for r in read_jsonl_rows(res.run / "metrics.jsonl")]
    assert losses[-1] < losses[0]
    base, trained = load_model("tiny-qwen2.5-vl"), load_model(res.run / "checkpoint-3")
    recs = read_records(data)
    assert logp(trained, recs).sum() > logp(base, recs).sum()
    vb, vt = base.model.model.visual.state_dict(), trained.model.model.visual.state_dict()
    assert any(not torch.equal(vb[k], vt[k]) for k in vb)  # pixel_values reached the vision tower


def test_rft_resumes_exactly_and_its_rollouts_feed_sft(tmp_path):
    """An interrupted GRPO run resumes to the same weights and the same logged rollouts (sampling RNG restored);
    its rollouts.jsonl is extracted (`dynamics rollouts --from-run`) and trains with SFT."""
    task = say_task()
    recs = task.build(12, 0)

    def cfg(name: str, **kw) -> RFTRunConfig:
        return load_config(RFTRunConfig, None, model="tiny-llama", output_dir=str(tmp_path / name), max_steps=4,
                           learning_rate=1e-2, num_generations=4, disable_tqdm=True, seed=0, checkpoint_every=2,
                           **kw)

    full = train_rft(cfg("full"), task=task, records=recs)
    with pytest.raises(KeyboardInterrupt):
        train_rft(cfg("rft"), task=task, records=recs, callbacks=[Interrupt(3)])
    res = train_rft(cfg("rft", resume=True), task=task, records=recs)
    assert res.checkpoints == [2, 4] and res.steps == 2
    a, b = load_file(full.run / "checkpoint-4/model.safetensors"), load_file(res.run / "checkpoint-4/model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert read_jsonl_rows(res.run / "rollouts.jsonl") == read_jsonl_rows(full.run / "rollouts.jsonl")
    check_rollouts(res.run, task, steps=4, group=4, prompts=2)
    path, summary = make_rollouts(RolloutsConfig(out=str(tmp_path / "r.jsonl"), from_run=str(res.run), steps="2:3"))
    recs = read_records(path)
    assert len(recs) == summary["kept"] == 16 and {r["step"] for r in recs} == {2, 3}
    assert all(math.isfinite(r["advantage"]) and "reward" in r for r in recs)
    sft = train_sft(sft_config(tmp_path, "sft", data=str(path), max_steps=2))
    assert sft.steps == 2 and json.loads((sft.run / "manifest.json").read_text())["data"]["n"] == 16

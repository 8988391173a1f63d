"""RFT-simulated rollouts: sampled, scored with the task reward, filtered to the correct ones, written as records."""

from __future__ import annotations

import json

import pytest

from dynamics.data import read_records, text_of
from dynamics.errors import DynamicsError
from dynamics.tasks import get_task
from dynamics.train.rollouts import (
    RolloutsConfig,
    group_advantages,
    keep_rollouts,
    make_rollouts,
    sample_in_shards,
    sample_rollouts,
    step_range,
)


def test_group_advantages_and_step_ranges():
    adv = group_advantages([0, 1, 1, 2, 3, 3, 3, 3], 4)
    assert adv[:4] == pytest.approx([-1.2247, 0.0, 0.0, 1.2247], abs=1e-3)  # (r - mean) / (sample std + 1e-4)
    assert adv[4:] == [0.0] * 4  # a group with one reward carries no signal
    assert step_range("2:5") == (2, 5) and step_range("7") == (7, 7) and step_range(":3")[0] == 0
    assert step_range("4:")[1] > 10**9
    with pytest.raises(DynamicsError, match="step range"):
        step_range("a:b")
    with pytest.raises(DynamicsError, match="keep"):
        RolloutsConfig(out="x.jsonl", keep="best")


@pytest.mark.slow
def test_keep_correct_keeps_exactly_the_reward_one_rollouts(default_lm):
    """Sample 4 completions for 8 jigsaw prompts from the default model (temperature 0.7: about 10% are right);
    every rollout carries the task's score and GRPO's group advantage, and keep=correct keeps exactly those
    with accuracy 1."""
    task = get_task("jigsaw")
    prompts = task.build(8, 0)
    rows = sample_rollouts(default_lm, task, prompts, samples=4, temperature=0.7, seed=0, progress=False)
    assert len(rows) == 32 and len({r["id"] for r in rows}) == 32
    for i, r in enumerate(rows):
        src = prompts[i // 4]
        score = task.score(text_of(r["completion"]), src["answer"])
        assert r["meta"]["prompt_id"] == src["id"] and r["prompt"] == src["prompt"] and r["answer"] == src["answer"]
        assert r["meta"]["score"] == score and r["reward"] == score["total"]
    assert [r["advantage"] for r in rows] == pytest.approx(group_advantages([r["reward"] for r in rows], 4))
    kept = keep_rollouts(rows, "correct")
    assert kept == [r for r in rows if task.score(text_of(r["completion"]), r["answer"])["accuracy"] == 1.0]
    assert 0 < len(kept) < len(rows)  # the base model solves some 1x3 puzzles, not all
    assert all(r["meta"]["score"]["accuracy"] == 1.0 and r["reward"] == 3.0 for r in kept)


def test_rollouts_cli_writes_records_that_sft_reads(tmp_path, cli):
    out = tmp_path / "r.jsonl"
    res = cli("rollouts", "--model", "tiny-llama", "--task", "jigsaw", "--n-prompts", "3", "--samples", "2",
              "--max-new-tokens", "8", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "6 of 6 rollouts over 3 prompts" in res.stdout
    recs = read_records(out)
    assert len(recs) == 6 and all(isinstance(r["reward"], float) and "advantage" in r for r in recs)
    assert [r["meta"]["sample"] for r in recs] == [0, 1] * 3
    assert all(json.loads(json.dumps(r["meta"]["score"])).keys() == {"accuracy", "hit", "format", "total"}
               for r in recs)
    with pytest.raises(DynamicsError, match="none kept by keep=correct"):  # a random tiny model solves nothing
        make_rollouts(RolloutsConfig(out=str(tmp_path / "c.jsonl"), model="tiny-llama", n_prompts=3, samples=2,
                                     max_new_tokens=8, keep="correct"))
    assert not (tmp_path / "c.jsonl").exists()


def test_bf16_sampling_on_a_cpu_that_emulates_it_is_noted(tmp_path, capsys):
    """Sampling under bf16 autocast says, in one line, when the CPU has no native bf16 (it is then slower than
    fp32); sampling in fp32, or on a CPU with AVX512-BF16 or AMX, says nothing about it."""
    from dynamics.models import native_bf16

    for bf16 in (True, False):
        make_rollouts(RolloutsConfig(out=str(tmp_path / f"{bf16}.jsonl"), model="tiny-llama", n_prompts=2, samples=1,
                                     max_new_tokens=4, bf16=bf16))
        noted = [line for line in capsys.readouterr().err.splitlines() if "bf16 autocast is emulated" in line]
        assert len(noted) == (bf16 and not native_bf16("cpu"))


def test_resumed_rollouts_of_a_model_retrained_in_place_are_sampled_again(tmp_path, tiny_lm, monkeypatch):
    """``resume`` reads back finished shards only if the model's weight files are those they were sampled from."""
    import torch

    from dynamics import models
    from dynamics.models import load_model

    loads = []
    monkeypatch.setattr(models, "load_model", lambda spec, **k: loads.append(spec) or load_model(spec, **k))
    ckpt = tmp_path / "checkpoint-2"
    tiny_lm.save(ckpt)
    task = get_task("jigsaw")
    prompts = task.build(4, seed=0)
    cfg = RolloutsConfig(out=str(tmp_path / "r.jsonl"), model=str(ckpt), samples=2, max_new_tokens=8, shard_size=2,
                         temperature=1.0, resume=True)
    first = sample_in_shards(cfg, task, prompts)
    assert loads == [str(ckpt)]
    assert sample_in_shards(cfg, task, prompts) == first and loads == [str(ckpt)]  # read back: no model loaded
    with torch.no_grad():
        moved = load_model(str(ckpt))
        for p in moved.model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0), dtype=p.dtype))
    moved.save(ckpt)
    again = sample_in_shards(cfg, task, prompts)
    assert again == sample_in_shards(RolloutsConfig(**{**vars(cfg), "resume": False}), task, prompts)
    assert [r["completion"] for r in again] != [r["completion"] for r in first]


def test_resumed_rollouts_after_an_image_is_rewritten_in_place_are_sampled_again(tmp_path, monkeypatch):
    """Prompts name images by path: rewritten under the same path, an image makes new prompts, whose rollouts
    ``resume`` samples again rather than reading back."""
    from PIL import Image

    from dynamics import models
    from dynamics.models import load_model

    loads = []
    monkeypatch.setattr(models, "load_model", lambda spec, **k: loads.append(spec) or load_model(spec, **k))
    task = get_task("jigsaw", preset="image", patch_size=28, image_dir=str(tmp_path / "img"))
    prompts = task.build(2, seed=0)
    cfg = RolloutsConfig(out=str(tmp_path / "r.jsonl"), model="tiny-qwen2.5-vl", samples=2, max_new_tokens=4,
                         shard_size=1, resume=True)
    sample_in_shards(cfg, task, prompts)
    sample_in_shards(cfg, task, prompts)
    assert loads == ["tiny-qwen2.5-vl"]  # read back
    Image.open(prompts[0]["images"][0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(prompts[0]["images"][0])
    sample_in_shards(cfg, task, prompts)
    assert loads == ["tiny-qwen2.5-vl"] * 2

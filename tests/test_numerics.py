"""Numerical faults are caught and reported with the sample ids: a tiny Llama whose embedding of one byte is
NaN makes exactly the samples containing that byte non-finite; influence and SFT must name those, and only
those (fp32 vs fp64 agreement of the kernel itself is tested in tests/test_influence.py)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from influence_reference import untied_copy

from dynamics.errors import DynamicsError
from dynamics.influence import InfluenceConfig, compute
from dynamics.models import load_model
from dynamics.store import read_jsonl_rows
from dynamics.train.run import load_config
from dynamics.train.sft import SFTRunConfig, train_sft

POISON = "~"  # the byte whose input embedding is NaN


def poisoned_lm():
    """tiny-llama with an untied output head (so logits of other samples stay finite) and a NaN input
    embedding for the POISON byte."""
    lm = untied_copy(load_model("tiny-llama"))
    lm.model.config.tie_word_embeddings = False
    (tok,) = lm.tokenizer(POISON, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lm.model.get_input_embeddings().weight[tok] = float("nan")
    return lm


def recs(prefix: str, n: int, poisoned: set[int]) -> list[dict]:
    return [{"id": f"{prefix}{i}", "prompt": f"{i}+{i % 3}=" + (POISON if i in poisoned else ""),
             "completion": str(i + i % 3)} for i in range(n)]


def named_ids(message: str, what: str) -> set[str]:
    m = re.search(rf"{what} ([^;]+)", message)
    return set(m.group(1).split(", ")) if m else set()


@pytest.mark.parametrize("mode", ["exact", "projected"])
def test_influence_names_exactly_the_non_finite_training_samples(mode):
    lm = poisoned_lm()
    train, probes = recs("t", 6, {1, 4}), recs("p", 3, set())
    with pytest.raises(DynamicsError) as err:
        compute(lm, train, probes, InfluenceConfig(mode=mode, batch_size=4, proj_dim=16), ckpt="poisoned")
    msg = str(err.value)
    assert named_ids(msg, "training samples") == {"t1", "t4"}
    assert "probes" not in msg and "poisoned" in msg and "NaN" in msg
    clean = compute(lm, [train[i] for i in (0, 2, 3, 5)], probes, InfluenceConfig(mode=mode, proj_dim=16))
    assert torch.isfinite(torch.tensor(clean[["kernel", "cosine", "train_norm", "probe_norm"]].to_numpy())).all()


def test_influence_names_a_non_finite_probe():
    lm = poisoned_lm()
    with pytest.raises(DynamicsError) as err:
        compute(lm, recs("t", 3, set()), recs("p", 3, {2}), InfluenceConfig(target="gold"))
    assert named_ids(str(err.value), "probes") == {"p2"} and "training samples" not in str(err.value)


def test_sft_stops_at_the_first_non_finite_step_naming_the_batch_samples(tmp_path):
    model_dir = tmp_path / "poisoned-model"
    poisoned_lm().save(model_dir)
    data = recs("s", 8, {5})  # one batch of 4 per step: the poisoned sample is in the second half of an epoch
    cfg = load_config(SFTRunConfig, None, model=str(model_dir), output_dir=str(tmp_path / "run"), max_steps=4,
                      learning_rate=1e-3, per_device_train_batch_size=4, disable_tqdm=True, seed=0,
                      checkpoint_every=1)
    with pytest.raises(DynamicsError) as err:
        train_sft(cfg, data)
    msg = str(err.value)
    step = int(re.search(r"at step (\d+)", msg).group(1))
    assert named_ids(msg, "samples with non-finite logits:") == {"s5"}, msg
    # the steps before it trained normally, logged finite losses and saved finite checkpoints
    rows = read_jsonl_rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, step)) and all(r["loss"] == r["loss"] for r in rows)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["last_checkpoint"] == step - 1

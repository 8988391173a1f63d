"""Model loading: the embedded default, its one-time conversion, tiny models, folders, adapters, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from dynamics.data import collate, encode
from dynamics.errors import DynamicsError
from dynamics.models import load_model, native_bf16


def greedy_answer(lm, question: str, max_new_tokens: int = 20) -> str:
    enc = encode(lm.processing_class, [{"role": "user", "content": question}])
    ids = torch.tensor([enc.input_ids])
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    return lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_default_model_answers_paris(default_lm):
    assert default_lm.kind == "causal-lm"
    assert default_lm.path is not None and (default_lm.path / "config.json").exists()
    cfg = json.loads((default_lm.path / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert "Paris" in greedy_answer(default_lm, "What is the capital of France?")


def test_default_model_is_trainable_and_saveable(default_lm, tmp_path):
    """The converted model is a plain (non-quantized) model: save_pretrained works and reloads equal."""
    assert not getattr(default_lm.model, "is_quantized", False)
    assert default_lm.model.lm_head.weight is default_lm.model.model.embed_tokens.weight  # tied, as SmolLM2
    default_lm.save(tmp_path / "copy")
    again = load_model(tmp_path / "copy")
    a = default_lm.model.model.layers[3].mlp.up_proj.weight
    b = again.model.model.layers[3].mlp.up_proj.weight
    assert torch.equal(a, b)


CONVERT = textwrap.dedent("""
    import json
    from dynamics import models
    import transformers
    calls = []
    orig = transformers.AutoModelForCausalLM.from_pretrained.__func__
    def counting(cls, *a, **k):
        if k.get("gguf_file"):
            calls.append(1)
        return orig(cls, *a, **k)
    transformers.AutoModelForCausalLM.from_pretrained = classmethod(counting)
    path = models.default_model_path()
    print(json.dumps({"path": str(path), "conversions": len(calls)}))
""")


def _convert_in_subprocess(cache, count: int):
    env = {**os.environ, "DYNAMICS_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(count)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def test_concurrent_first_loads_convert_once_and_later_loads_reuse(tmp_path):
    first = _convert_in_subprocess(tmp_path, 2)
    assert first[0]["path"] == first[1]["path"]
    assert sum(o["conversions"] for o in first) == 1  # the lock made the second wait, then reuse
    folder = first[0]["path"]
    assert sorted(p.name for p in tmp_path.joinpath("models").iterdir() if not p.name.startswith(".")) == [
        "SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.lock"]
    mtime = os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns
    second = _convert_in_subprocess(tmp_path, 1)
    assert second[0]["conversions"] == 0
    assert os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns == mtime


@pytest.mark.skipif(not os.path.isfile("/proc/cpuinfo") or os.uname().machine != "x86_64",
                    reason="reads an x86 Linux CPU's flags")
def test_native_bf16_follows_the_cpu_flags():
    """bf16 autocast is chosen (by the demo) only where the CPU computes bf16 natively: AVX512-BF16 or AMX."""
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    assert native_bf16("cpu") == bool({"avx512_bf16", "amx_tile"} & set(flags))

def test_tiny_vlm_forward_backward_with_image(tiny_vl):
    assert tiny_vl.kind == "vlm"
    img = Image.fromarray((np.random.default_rng(0).random((112, 84, 3)) * 255).astype("uint8"))
    enc = encode(tiny_vl.processing_class, "What is in the picture?", "A cat.", images=[img])
    n_pad = sum(1 for t in enc.input_ids if t == tiny_vl.model.config.image_token_id)
    assert n_pad == int(enc.image_grid_thw.prod()) // 4  # merged patches: (8*6)/4
    batch = collate([enc], tiny_vl.tokenizer.pad_token_id)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    model = tiny_vl.model
    model.zero_grad()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"], labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0  # the gradient reached the vision tower
    model.zero_grad()


def test_tiny_models_are_seeded():
    a, b = load_model("tiny-llama", seed=3), load_model("tiny-llama", seed=3)
    c = load_model("tiny-llama", seed=4)
    wa, wb, wc = (m.model.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_saved_tiny_vlm_folder_reloads(tiny_vl, tmp_path):
    tiny_vl.save(tmp_path / "vl")
    again = load_model(tmp_path / "vl")
    assert again.kind == "vlm"
    assert again.processor.image_processor.merge_size == 2
    sd_a, sd_b = tiny_vl.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_lora_adapter_folder_loads_with_its_base(tiny_lm, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_model("tiny-llama")
    base.save(tmp_path / "base")
    peft_model = get_peft_model(load_model(tmp_path / "base").model, LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = load_model(tmp_path / "adapter")
    assert loaded.is_peft
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ref = peft_model(ids).logits
        got = loaded.model(ids).logits
        plain = base.model(ids).logits
    assert torch.allclose(ref, got) and not torch.allclose(ref, plain)


def test_gguf_file_spec_and_hub_id_errors(tmp_path):
    with pytest.raises(DynamicsError, match="GGUF file not found"):
        load_model(tmp_path / "nope.gguf")
    with pytest.raises(DynamicsError, match="unknown model spec"):
        load_model("not a model")
    with pytest.raises(DynamicsError, match="no folder 'no-such-org/no-such-model-xyz' here, and cannot load it from "
                       "the Hugging Face hub"):
        load_model("no-such-org/no-such-model-xyz")
    for path in (tmp_path / "missing", "./runs/sft/checkpoint-4", "~/no-such-model"):  # a path, not a name
        with pytest.raises(DynamicsError, match="no model folder or file at"):
            load_model(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DynamicsError, match="not a model folder"):
        load_model(tmp_path / "empty")


def test_models_command(cli):
    res = cli("models")
    assert res.returncode == 0, res.stderr
    assert "SmolLM2-135M-Instruct" in res.stdout and "cache" in res.stdout
    res = cli("--help")
    assert res.returncode == 0 and "models" in res.stdout

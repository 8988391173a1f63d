"""Influence core against brute-force autograd (one backward per sample, flatten, dot)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from influence_reference import reference_grads, untied_copy
from PIL import Image

from dynamics import influence
from dynamics.errors import DynamicsError
from dynamics.gradients import ROW_CHUNK, row_sq_norms, rows_inner, stacked_inner
from dynamics.influence import InfluenceConfig, compute, one_step, per_token_kernel
from dynamics.models import load_model

TRAIN = [
    {"id": f"t{i}", "prompt": [{"role": "user", "content": "abc " * (i + 1)}],
     "completion": [{"role": "assistant", "content": "xy" * (i % 3 + 1)}]}
    for i in range(5)
]
PROBES = [
    {"id": f"p{i}", "prompt": [{"role": "user", "content": "q" * (2 * i + 1)}],
     "completion": [{"role": "assistant", "content": "answer"[: i + 2]}]}
    for i in range(3)
]


def kernel_of(df: pd.DataFrame, n: int, p: int) -> torch.Tensor:
    return torch.tensor(df["kernel"].to_numpy()).reshape(n, p)


def assert_matches_reference(lm, train, probes, config, rtol, ref_lm=None):
    df = compute(lm, train, probes, config)
    ref_lm = ref_lm or lm
    gt = reference_grads(ref_lm, train, config.params, config.reduce)
    gp = reference_grads(ref_lm, probes, config.params, config.reduce)
    K_ref = gt @ gp.T
    K = kernel_of(df, len(train), len(probes))
    torch.testing.assert_close(K, K_ref, rtol=rtol, atol=rtol * K_ref.abs().max().item())
    torch.testing.assert_close(torch.tensor(df["train_norm"].to_numpy()).reshape(len(train), -1)[:, 0],
                               gt.norm(dim=1), rtol=rtol, atol=0)
    torch.testing.assert_close(torch.tensor(df["probe_norm"].to_numpy()[: len(probes)]), gp.norm(dim=1),
                               rtol=rtol, atol=0)
    cos_ref = K_ref / (gt.norm(dim=1)[:, None] * gp.norm(dim=1)[None])
    torch.testing.assert_close(torch.tensor(df["cosine"].to_numpy()).reshape(len(train), -1), cos_ref,
                               rtol=rtol, atol=rtol)
    return df, gt, gp


# CUDA cases run where a GPU is present (the GPU check in benchmarks/gpu_check.sh runs them); CI has none.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def tiny64():
    return load_model("tiny-llama", dtype="float64")


@pytest.mark.parametrize("scope", ["linear", "all", r"layers\.1\.(mlp|post_attention)"])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize(("batch_size", "contraction"), [(1, "auto"), (3, "ghost"), (2, "dense")])
def test_exact_kernel_equals_brute_force_fp64(tiny64, scope, reduce, batch_size, contraction):
    """Every scope, both reductions, batch sizes 1 and >1 with padding, ghost and materialised contractions;
    tiny-llama ties its embedding and lm_head, so 'all' exercises the tied cross terms and 'linear' the
    lm_head use alone."""
    ref = untied_copy(tiny64) if scope == "linear" else tiny64
    cfg = InfluenceConfig(params=scope, reduce=reduce, batch_size=batch_size, contraction=contraction,
                          target="gold", dtype="float64")
    assert_matches_reference(tiny64, TRAIN, PROBES, cfg, rtol=1e-6, ref_lm=ref)


@pytest.mark.parametrize(("group_bytes", "largest"), [(1, 1), (1 << 28, 4)])
def test_grouped_ghost_contraction_equals_brute_force(tiny64, monkeypatch, group_bytes, largest):
    """Same-shape weights contracted in one batched GEMM (up to 4 in tiny-llama: q and o, or gate and up, of both
    layers) or one at a time, against probe batches of unequal sizes (2 and 1)."""
    seen = []

    def recording(out_a, *rest):
        seen.append(out_a.shape[0])
        return stacked_inner(out_a, *rest)

    monkeypatch.setattr(influence, "GROUP_BYTES", group_bytes)
    monkeypatch.setattr(influence, "stacked_inner", recording)
    cfg = InfluenceConfig(params="linear", batch_size=2, contraction="ghost", target="gold", dtype="float64")
    assert_matches_reference(tiny64, TRAIN, PROBES, cfg, rtol=1e-6, ref_lm=untied_copy(tiny64))
    assert max(seen) == largest


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_long_rows_product_in_chunks_equals_the_plain_product(monkeypatch, dtype):
    """``rows_inner`` cuts long rows into one chunk per thread plus a remainder, multiplies them as a batch and sums:
    the product ``a @ bᵀ`` (to the dtype's rounding); short rows and bf16 take the plain product."""
    calls = []

    def bmm(*args):
        calls.append(args[0].shape)
        return torch.matmul(*args)

    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    monkeypatch.setattr(torch, "bmm", bmm)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(9, 3 * 4096 + 2, generator=gen, dtype=dtype)
    b = torch.randn(4, 3 * 4096 + 2, generator=gen, dtype=dtype)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(rows_inner(a, b).double(), a.double() @ b.double().T, rtol=rtol, atol=rtol * 100)
    assert calls == [(3, 9, 4096)]
    rows_inner(a[:, :4096], b[:, :4096])
    assert len(calls) == 1
    rows_inner(a.bfloat16(), b.bfloat16())
    assert len(calls) == 1


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_row_norms_in_chunks_equal_the_whole_rows(dtype, rtol):
    """``row_sq_norms`` sums squares over column chunks (and a remainder) on the CPU: ‖m[b]‖² to the dtype's
    rounding (bf16 rows whole)."""
    m = torch.randn(5, 3 * ROW_CHUNK + 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = row_sq_norms(m.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), (m.to(dtype).double() ** 2).sum(-1), rtol=rtol, atol=0)


def test_gradient_passes_leave_out_cudnn_attention(tiny64):
    """cuDNN attention builds a graph per sequence length; the passes (batches sorted by length) switch it off and
    restore the setting after."""
    seen = []
    handle = tiny64.model.model.register_forward_pre_hook(
        lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    try:
        compute(tiny64, TRAIN, PROBES, InfluenceConfig(batch_size=2, target="gold", dtype="float64"))
    finally:
        handle.remove()
    assert seen and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()


@needs_cuda
@pytest.mark.parametrize(("dtype", "rtol"), [("float64", 1e-6), ("float32", 1e-4)])
@pytest.mark.parametrize("contraction", ["ghost", "dense"])
@pytest.mark.parametrize("scope", ["linear", "all"])
def test_exact_kernel_on_cuda_equals_brute_force(tiny64, scope, contraction, dtype, rtol):
    """The same kernel on a GPU (model, probe store and contraction on the device) as the CPU float64 brute
    force."""
    gpu = load_model("tiny-llama", dtype=dtype, device="cuda")
    ref = untied_copy(tiny64) if scope == "linear" else tiny64
    cfg = InfluenceConfig(params=scope, batch_size=2, contraction=contraction, target="gold", dtype=dtype,
                          device="cuda")
    assert_matches_reference(gpu, TRAIN, PROBES, cfg, rtol=rtol, ref_lm=ref)


@needs_cuda
def test_bf16_kernel_on_cuda_within_its_error(tiny64):
    """bfloat16 on a GPU: relative Frobenius error of K against the float64 brute force under 25% (docs/numerics.md
    measured 12% on the CPU), and the same signs on the large entries."""
    gpu = load_model("tiny-llama", dtype="bfloat16", device="cuda")
    cfg = InfluenceConfig(params="linear", batch_size=2, target="gold", dtype="bfloat16", device="cuda")
    K = kernel_of(compute(gpu, TRAIN, PROBES, cfg), len(TRAIN), len(PROBES))
    ref = untied_copy(tiny64)
    K_ref = reference_grads(ref, TRAIN, "linear") @ reference_grads(ref, PROBES, "linear").T
    assert (K - K_ref).norm() / K_ref.norm() < 0.25
    big = K_ref.abs() > 0.1 * K_ref.abs().max()
    assert (K.sign() == K_ref.sign())[big].all()


def test_bf16_products_in_the_model_dtype_within_its_error(tiny64):
    """``products="model"``: a bf16 model's probe store and products in bf16 (half the bytes). The kernel stays
    within the bf16 error bound against the float64 brute force, keeps the large entries' signs, and is not the
    float32-products kernel (the option takes effect)."""
    lm = load_model("tiny-llama", dtype="bfloat16")
    ref = untied_copy(tiny64)
    K_ref = reference_grads(ref, TRAIN, "linear") @ reference_grads(ref, PROBES, "linear").T
    kernels = {}
    for products in ("float32", "model"):
        cfg = InfluenceConfig(params="linear", batch_size=2, target="gold", dtype="bfloat16", products=products)
        K = kernels[products] = kernel_of(compute(lm, TRAIN, PROBES, cfg), len(TRAIN), len(PROBES))
        assert (K - K_ref).norm() / K_ref.norm() < 0.25
        big = K_ref.abs() > 0.1 * K_ref.abs().max()
        assert (K.sign() == K_ref.sign())[big].all()
    assert not torch.equal(kernels["float32"], kernels["model"])
    with pytest.raises(DynamicsError, match="products must be float32 or model, got .half."):
        InfluenceConfig(products="half").validate()


def test_tied_weights_include_cross_terms(tiny64):
    """SmolLM2-style tied embedding/lm_head: the tensor's per-sample gradient is the sum of both uses, so the
    kernel carries cross terms <g_emb(o), g_head(u)> that two separate parameters would not have."""

    def k(lm, scope):
        cfg = InfluenceConfig(params=scope, target="gold", dtype="float64")
        return kernel_of(compute(lm, TRAIN, PROBES, cfg), 5, 3)

    untied = untied_copy(tiny64)
    tied = k(tiny64, "embed_tokens")
    ref = reference_grads(tiny64, TRAIN, "embed_tokens") @ reference_grads(tiny64, PROBES, "embed_tokens").T
    torch.testing.assert_close(tied, ref, rtol=1e-6, atol=1e-9)
    separate = k(untied, "embed_tokens") + k(untied, "lm_head")
    assert (tied - separate).abs().max() > 1e-3 * tied.abs().max()


def test_lora_checkpoint_scope(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_model("tiny-llama", dtype="float64")
    base.save(tmp_path / "base")
    peft = get_peft_model(load_model(tmp_path / "base", dtype="float64").model,
                          LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    peft.save_pretrained(tmp_path / "adapter")
    lm = load_model(tmp_path / "adapter", dtype="float64")
    assert lm.is_peft
    cfg = InfluenceConfig(params="lora", batch_size=2, target="gold", dtype="float64")
    df, gt, _ = assert_matches_reference(lm, TRAIN, PROBES, cfg, rtol=1e-6)
    assert gt.shape[1] == sum(p.numel() for n, p in lm.model.named_parameters() if "lora_" in n)


def _images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(112, 112), (56, 84), (84, 56)]):
        p = tmp_path / f"{i}.png"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(p)
        paths.append(str(p))
    return paths


@pytest.mark.parametrize("scope", ["linear", "all"])
def test_tiny_vlm_with_images(tmp_path, scope):
    """Vision tower in scope (patch conv, window attention, merger), images of different sizes, a text-only
    sample in the same batch."""
    vl = load_model("tiny-qwen2.5-vl", dtype="float64")
    paths = _images(tmp_path)
    train = [{"id": f"v{i}", "prompt": "what" * (i + 1), "completion": "it is"[: 2 + i], "images": [paths[i]]}
             for i in range(3)] + [{"id": "text", "prompt": "plain", "completion": "ok"}]
    probes = [{"id": "vp", "prompt": "colour?", "completion": "red", "images": [paths[0]]},
              {"id": "tp", "prompt": "hi", "completion": "yo"}]
    cfg = InfluenceConfig(params=scope, batch_size=2, target="gold", dtype="float64")
    _, gt, _ = assert_matches_reference(vl, train, probes, cfg, rtol=1e-6)
    names = [n for n, _ in vl.model.named_parameters()]
    assert any("visual" in n for n in names) and gt[:3].abs().sum() > 0


def test_default_model_fp32(default_lm):
    """SmolLM2 (tied embeddings) in fp32: within 1e-3 of brute force."""
    train = [{"id": "t0", "prompt": "What is the capital of Spain?", "completion": "The capital of Spain is Madrid."},
             {"id": "t1", "prompt": "Order the pieces: B A C", "completion": "A B C"},
             {"id": "t2", "prompt": "Name a colour.", "completion": "Blue is a colour."}]
    probes = [{"id": "p0", "prompt": "What is the capital of France?", "completion": "Paris."},
              {"id": "p1", "prompt": "What is 2+3?", "completion": "5"}]
    cfg = InfluenceConfig(params="linear", batch_size=2, target="gold")
    assert_matches_reference(default_lm, train, probes, cfg, rtol=1e-3, ref_lm=untied_copy(default_lm))


def test_layers_materialised_for_every_batch_keep_no_lowrank_copy(default_lm, tiny64, monkeypatch):
    """``dense_only``: a layer whose materialised contraction is cheaper even for the shortest training sample (the
    cost ratio falls with length) drops its probes' low-rank terms; shorter samples keep them; the plan itself is
    the same. SmolLM2 at 8 probes of 128 tokens: at 64 tokens the MLP layers' ghost form is cheaper, the
    attention ones' is not."""
    from dynamics.gradients import plan_forms

    rec = influence._GradientPass(default_lm, InfluenceConfig(params="linear")).recorder
    plans = {s: plan_forms(rec, 8, 128.0, 128.0, (32.0, 32.0), 1 << 34, shortest=s)
             for s in [(128, 32), (64, 16), (16, 4), None]}
    dense = {k for k in plans[None].forms if plans[None].dense(k)}
    assert len(dense) == 210 and all(p.forms == plans[None].forms for p in plans.values())
    assert plans[(128, 32)].dense_only == dense
    assert {k.split(".")[-2] for k in plans[(64, 16)].dense_only} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not plans[(16, 4)].dense_only and not plans[None].dense_only
    # in a run: no low-rank copy of those layers in the probe store, the kernel still exact
    seen = []
    real_plan, real_pass = influence.plan_forms, influence._probe_pass
    monkeypatch.setattr(influence, "plan_forms", lambda *a, **k: seen.append(real_plan(*a, **k)) or seen[-1])
    monkeypatch.setattr(influence, "_probe_pass", lambda *a, **k: seen.append(real_pass(*a, **k)) or seen[-1])
    cfg = InfluenceConfig(params="linear", batch_size=2, target="gold", dtype="float64")
    assert_matches_reference(tiny64, TRAIN, PROBES, cfg, rtol=1e-6, ref_lm=untied_copy(tiny64))
    plan, store = seen
    assert plan.dense_only and set(store.dense) >= plan.dense_only and not set(store.lowrank) & plan.dense_only


def test_a_run_frees_its_probe_store_without_the_garbage_collector(tiny64, monkeypatch):
    """No reference cycle keeps the probe store (GBs on a real model) alive once a run returns: repeated runs in one
    process would otherwise each hold theirs until a collection happened to run (four SmolLM2 runs of 256 tokens
    were killed for memory on 24 GiB)."""
    import gc
    import weakref

    refs = []
    real_pass = influence._probe_pass

    def spy(*args, **kwargs):
        store = real_pass(*args, **kwargs)
        refs.append(weakref.ref(store))
        return store

    monkeypatch.setattr(influence, "_probe_pass", spy)
    gc.collect()
    gc.disable()
    try:
        compute(tiny64, TRAIN, PROBES, InfluenceConfig(target="gold", dtype="float64"))
        assert len(refs) == 1 and refs[0]() is None
    finally:
        gc.enable()


def test_fp32_agrees_with_fp64():
    k64 = kernel_of(compute(load_model("tiny-llama", dtype="float64"), TRAIN, PROBES,
                            InfluenceConfig(target="gold", dtype="float64")), 5, 3)
    k32 = kernel_of(compute(load_model("tiny-llama"), TRAIN, PROBES, InfluenceConfig(target="gold")), 5, 3)
    torch.testing.assert_close(k32, k64, rtol=1e-4, atol=1e-4 * k64.abs().max().item())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("projection", ["jl", "kron"])
def test_projected_mode_error_within_bound(tiny64, projection, device):
    """Projected kernels are unbiased; each pair's error stays within 5 standard deviations of its stated bound:
    JL: Var ≤ 2‖g‖²‖h‖²/k; Kronecker per layer l: Var_l ≤ (2/k_o + 2/k_i + 4/(k_o k_i))‖g_l‖²‖h_l‖²."""
    k = 256
    cfg = InfluenceConfig(params="linear", mode="projected", projection=projection, proj_dim=k, target="gold",
                          device=device)
    ref = untied_copy(tiny64)
    lm = tiny64 if device == "cpu" else load_model("tiny-llama", dtype="float64", device=device)
    df = compute(lm, TRAIN, PROBES, cfg)
    K = kernel_of(df, 5, 3)
    gt = reference_grads(ref, TRAIN, "linear")
    gp = reference_grads(ref, PROBES, "linear")
    K_ref = gt @ gp.T
    if projection == "jl":
        sigma = math.sqrt(2 / k) * gt.norm(dim=1)[:, None] * gp.norm(dim=1)[None]
    else:
        from dynamics.gradients import scope_parameters

        var = torch.zeros_like(K_ref)
        start = 0
        for p in scope_parameters(ref.model, "linear").values():
            n = p.numel()
            d_out, d_in = p.shape[0], p[0].numel()
            k_o = max(1, min(d_out, round(math.sqrt(k))))
            k_i = max(1, min(d_in, k // k_o))
            po, pi = k_o < d_out, k_i < d_in  # a side no wider than its k is kept exactly
            c = 0.0 if p.dim() == 1 else (2 / k_o) * po + (2 / k_i) * pi + 4 / (k_o * k_i) * (po and pi)
            var += c * gt[:, start:start + n].norm(dim=1)[:, None] ** 2 * gp[:, start:start + n].norm(dim=1)[None] ** 2
            start += n
        sigma = var.sqrt()
    err = (K - K_ref).abs()
    assert (err <= 5 * sigma + 1e-9).all(), (err / sigma).max()
    assert (err > 0).any()  # it is an estimate, not the exact kernel


def test_per_token_kernels_sum_to_sequence_kernel(tiny64):
    cfg = InfluenceConfig(params="linear", batch_size=3, target="gold", dtype="float64")
    tokens = per_token_kernel(tiny64, TRAIN, PROBES, cfg)
    whole = compute(tiny64, TRAIN, PROBES, cfg)
    summed = tokens.groupby(["train_id", "probe_id"], sort=False)["kernel"].sum()
    merged = whole.set_index(["train_id", "probe_id"])["kernel"]
    np.testing.assert_allclose(summed.loc[merged.index].to_numpy(), merged.to_numpy(), rtol=1e-7)
    assert set(tokens.columns) >= {"token_index", "token", "kernel"}
    # one token against brute force: the gradient of log p of probe p2's second completion token alone
    from dynamics.data import collate, encode_record
    from dynamics.gradients import scope_parameters

    ref = untied_copy(tiny64)
    params = list(scope_parameters(ref.model, "linear").values())
    enc = encode_record(ref.tokenizer, PROBES[2])
    b = collate([enc], ref.tokenizer.pad_token_id)
    start = enc.prompt_len
    logits = ref.model(input_ids=b["input_ids"]).logits
    logp = torch.log_softmax(logits[0, start], -1)[b["input_ids"][0, start + 1]]
    g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(logp, params)])
    expected = reference_grads(ref, TRAIN, "linear") @ g
    got = tokens[(tokens.probe_id == "p2") & (tokens.token_index == 1)].set_index("train_id")["kernel"]
    np.testing.assert_allclose(got.loc[[r["id"] for r in TRAIN]].to_numpy(), expected.detach().numpy(), rtol=1e-6)


def test_one_step_prediction_on_default_model(default_lm):
    """At small η the measured one-step change of probe log p follows η·K (Ren & Sutherland)."""
    train = [{"id": "t0", "prompt": "What is the capital of Spain?", "completion": "Madrid."},
             {"id": "t1", "prompt": "Order the pieces: B A C", "completion": "A B C"},
             {"id": "t2", "prompt": "What is 7 times 6?", "completion": "42"},
             {"id": "t3", "prompt": "Name a colour.", "completion": "Blue."}]
    probes = [{"id": "p0", "prompt": "What is the capital of France?", "completion": "Paris."},
              {"id": "p1", "prompt": "What is 2+3?", "completion": "5"},
              {"id": "p2", "prompt": "What colour is the sky?", "completion": "Blue."}]
    res = one_step(default_lm, train, probes, InfluenceConfig(target="gold"), lr=1e-5)
    assert res.pearson > 0.95
    assert (res.table["entk_fro_lower_bound"] > 0).all()
    assert np.isfinite(res.table[["dlogp_measured", "dlogp_predicted"]].to_numpy()).all()
    # weights restored after each step: a second run measures the same changes
    again = one_step(default_lm, train[:1], probes, InfluenceConfig(target="gold"), lr=1e-5)
    np.testing.assert_allclose(again.table["dlogp_measured"], res.table["dlogp_measured"][:3], rtol=1e-3, atol=1e-6)


def test_bad_options_are_user_errors(tiny64):
    with pytest.raises(DynamicsError, match="reduce"):
        compute(tiny64, TRAIN, PROBES, InfluenceConfig(reduce="max"))
    with pytest.raises(DynamicsError, match="no parameter name matches"):
        compute(tiny64, TRAIN, PROBES, InfluenceConfig(params="nothing_like_this", target="gold"))
    with pytest.raises(DynamicsError, match="LoRA"):
        compute(tiny64, TRAIN, PROBES, InfluenceConfig(params="lora", target="gold"))


# ------------------------------------------------------------------------------------------------- CLI
def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_writes_table_manifest_and_resumes(tmp_path, cli):
    train = _write(tmp_path / "train.jsonl", TRAIN)
    probes = _write(tmp_path / "probes.jsonl", PROBES)
    out = tmp_path / "out"
    args = ["influence", "--ckpt", "tiny-llama", "--train", str(train), "--probes", str(probes), "--out", str(out),
            "--shard-size", "2", "--target", "gold"]
    res = cli(*args)
    assert res.returncode == 0, res.stderr
    df = pd.read_parquet(out / "influence.parquet")
    assert list(df.columns) == ["ckpt", "step", "train_id", "probe_id", "kernel", "cosine", "train_norm",
                                "probe_norm"]
    assert len(df) == 15 and set(df.train_id) == {r["id"] for r in TRAIN}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_train"] == 5 and manifest["train_sha256"] and manifest["versions"]["torch"]
    assert "mean |K|" in res.stdout and f"{df.kernel.abs().mean():.4g}" in res.stdout  # the closing summary
    direct = compute(load_model("tiny-llama"), TRAIN, PROBES, InfluenceConfig(target="gold"))
    np.testing.assert_allclose(df["kernel"], direct["kernel"], rtol=1e-5)
    # --resume keeps finished shards untouched and reproduces the table
    shards = sorted((out / "shards").iterdir())
    first = shards[0]
    mtime = first.stat().st_mtime_ns
    shards[-1].unlink()
    res = cli(*args, "--resume")
    assert res.returncode == 0, res.stderr
    assert first.stat().st_mtime_ns == mtime
    pd.testing.assert_frame_equal(pd.read_parquet(out / "influence.parquet"), df)


def test_an_earlier_run_in_out_needs_resume_or_overwrite(tmp_path):
    """OUT holding results: a plain rerun is refused and leaves them as they are; --resume continues only the
    same inputs; --overwrite replaces the results and nothing else in OUT; a checkpoint retrained in place is
    computed again under --resume, not read from the shards of its old weights."""
    ckpt = tmp_path / "checkpoint-3"
    load_model("tiny-llama").save(ckpt)
    train, probes = _write(tmp_path / "train.jsonl", TRAIN), _write(tmp_path / "probes.jsonl", PROBES)
    out = tmp_path / "out"
    job = influence.InfluenceRun(ckpts=[str(ckpt)], train=str(train), probes=str(probes), out=str(out),
                                 config=InfluenceConfig(target="gold"), shard_size=2)
    first = pd.read_parquet(influence.run(job))
    (out / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in [out / "influence.parquet", *(out / "shards").iterdir()]}
    fewer = _write(tmp_path / "fewer.jsonl", TRAIN[:3])
    for changes, message in (({}, "holds the results of an earlier `dynamics influence` run: pass --resume"),
                             ({"resume": True, "train": str(fewer)}, "holds results computed on other inputs"),
                             ({"resume": True, "shard_size": 3}, "holds results computed on other inputs"),
                             ({"resume": True, "overwrite": True}, "resume keeps .* and overwrite deletes them")):
        with pytest.raises(DynamicsError, match=message):
            influence.run(influence.InfluenceRun(**{**vars(job), **changes}))
    assert {p: p.read_bytes() for p in before} == before
    # the same inputs: --resume reads every shard back (and drops what a killed run left half-written)
    half = out / "shards" / f".{sorted((out / 'shards').iterdir())[0].name}.x1y2.parquet"
    half.write_bytes(b"PAR1")
    pd.testing.assert_frame_equal(pd.read_parquet(influence.run(influence.InfluenceRun(**{**vars(job),
                                                                                          "resume": True}))), first)
    assert {p: p.read_bytes() for p in before} == before and not half.exists()
    # retrained in place: other weights in the same folder
    with torch.no_grad():
        moved = load_model(str(ckpt))
        for p in moved.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0), dtype=p.dtype))
    moved.save(ckpt)
    again = pd.read_parquet(influence.run(influence.InfluenceRun(**{**vars(job), "resume": True})))
    direct = compute(load_model(str(ckpt)), TRAIN, PROBES, InfluenceConfig(target="gold"))
    np.testing.assert_allclose(again["kernel"], direct["kernel"], rtol=1e-5)
    assert not np.allclose(again["kernel"], first["kernel"], rtol=1e-3)
    # --overwrite: the results of other inputs replace them; other files stay
    replaced = pd.read_parquet(influence.run(influence.InfluenceRun(**{**vars(job), "train": str(fewer),
                                                                       "overwrite": True})))
    assert set(replaced.train_id) == {r["id"] for r in TRAIN[:3]} and len(list((out / "shards").iterdir())) == 2
    assert (out / "notes.txt").read_text() == "mine"


def test_a_damaged_shard_is_named_and_recomputed_once_deleted(tmp_path):
    """A shard that no longer reads (a disk fault, a bad copy) stops the merge with one error naming it; deleted,
    it is computed again under --resume, and the table is the one the first run wrote."""
    train, probes = _write(tmp_path / "train.jsonl", TRAIN), _write(tmp_path / "probes.jsonl", PROBES)
    job = influence.InfluenceRun(ckpts=["tiny-llama"], train=str(train), probes=str(probes), out=str(tmp_path / "o"),
                                 config=InfluenceConfig(target="gold"), shard_size=2)
    first = pd.read_parquet(influence.run(job))
    job = influence.InfluenceRun(**{**vars(job), "resume": True})
    shard = sorted((tmp_path / "o" / "shards").glob("*.parquet"))[1]
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(DynamicsError, match="not a readable parquet file.*delete it and rerun with --resume") as e:
        influence.run(job)
    assert e.value.file == str(shard)
    shard.unlink()
    pd.testing.assert_frame_equal(pd.read_parquet(influence.run(job)), first)


@pytest.mark.parametrize("mode", ["exact", "projected"])
def test_shards_of_a_checkpoint_share_one_probe_pass(tmp_path, monkeypatch, mode):
    """`dynamics influence` splits the training set into shards; the probes' gradients (and per-token gradients,
    or projected features) are computed once per checkpoint and every shard is contracted with them. Here 3
    shards, and the tables those of one call on the whole set. Each training sample is encoded once to score it
    (its table and token table share the encoding), plus once before the first block when the set is split: to
    lay out the store (exact), or to check that every block fits the context (projected)."""
    from collections import Counter

    from dynamics import generation
    from dynamics.data import write_records

    encoded = Counter()  # record id -> times encoded
    real_encode = generation.encode_record
    monkeypatch.setattr(generation, "encode_record",
                        lambda pc, rec, *a, **k: encoded.update([rec["id"]]) or real_encode(pc, rec, *a, **k))
    sizes = []  # samples in each pass over probes (exact), or over any samples (projected features)
    real_pass, real_features = influence._probe_pass, influence.features
    monkeypatch.setattr(influence, "_probe_pass",
                        lambda e, b, *a, **k: sizes.append(len(b.encoded)) or real_pass(e, b, *a, **k))
    monkeypatch.setattr(influence, "features",
                        lambda lm, enc, *a, **k: sizes.append(len(enc)) or real_features(lm, enc, *a, **k))
    cfg = InfluenceConfig(target="gold", dtype="float64", mode=mode, per_token=mode == "exact")
    job = influence.InfluenceRun(ckpts=["tiny-llama"], train=str(write_records(tmp_path / "train.jsonl", TRAIN)),
                                 probes=str(write_records(tmp_path / "probes.jsonl", PROBES)),
                                 out=str(tmp_path / "out"), config=cfg, shard_size=2)
    bars = {}  # description -> [total, advanced]

    def factory(what: str, total: int):
        bars[what] = [total, 0]
        return lambda n: bars[what].__setitem__(1, bars[what][1] + n)

    df = pd.read_parquet(influence.run(job, progress_factory=factory))
    assert len(list((tmp_path / "out" / "shards").glob("*-0000[0-2].parquet"))) == 3
    assert [encoded[r["id"]] for r in TRAIN] == [2] * len(TRAIN), encoded
    # a bar for each shard and for each pass over the probes, each run to its end
    assert bars["tiny-llama probes"] == [len(PROBES)] * 2 and all(t == n for t, n in bars.values())
    assert [bars[f"tiny-llama [{i}/3]"][0] for i in (1, 2, 3)] == [2, 2, 1]
    if mode == "exact":
        assert bars["tiny-llama probe tokens"][0] == sizes[1]
    lm = load_model("tiny-llama", dtype="float64")
    if mode == "exact":  # the probes' store and their per-token store, one pass each
        assert len(sizes) == 2 and sizes[0] == len(PROBES) and sizes[1] > len(PROBES), sizes
        tokens = pd.read_parquet(tmp_path / "out" / "influence_tokens.parquet")
        whole = per_token_kernel(lm, TRAIN, PROBES, cfg)
        key = ["train_id", "probe_id", "token_index"]
        assert sorted(tokens.set_index(key).index) == sorted(whole.set_index(key).index)
        np.testing.assert_allclose(tokens.set_index(key)["kernel"].loc[whole.set_index(key).index], whole["kernel"],
                                   rtol=1e-10)
    else:  # each shard's training features, and the probes' once
        assert sorted(sizes) == [1, 2, 2, len(PROBES)], sizes
        # another run given the stored training features (--features) computes the probes' alone
        sizes.clear()
        again = influence.InfluenceRun(**{**vars(job), "out": str(tmp_path / "again"),
                                          "features_dir": str(tmp_path / "out" / "features")})
        pd.testing.assert_frame_equal(pd.read_parquet(influence.run(again, progress_factory=factory)), df)
        assert sizes == [len(PROBES)] and all(t == n for t, n in bars.values())
    # (projected features are float32, batched differently in shards than in one call)
    encoded.clear()
    np.testing.assert_allclose(df["kernel"], compute(lm, TRAIN, PROBES, cfg)["kernel"],
                               rtol=1e-10 if mode == "exact" else 1e-6)
    assert [encoded[r["id"]] for r in TRAIN] == [1] * len(TRAIN), encoded  # one call: the plan reads the scoring's


def test_stored_training_features_are_reused_only_for_the_same_samples_and_options(tmp_path):
    """``--features``: a run reuses the stored features of a block only if its samples (ids *and* contents) and
    feature options match; a sample edited under its id, or another ``tokens``, is computed afresh, so every run
    equals a run without the store."""
    from dynamics.data import write_records

    edited = [{**TRAIN[0], "completion": [{"role": "assistant", "content": "a different, longer answer"}]},
              *TRAIN[1:]]
    probes = str(write_records(tmp_path / "probes.jsonl", PROBES))
    store = str(tmp_path / "store")

    def table(train, out, features_dir, **options):
        cfg = InfluenceConfig(target="gold", mode="projected", proj_dim=64, **options)
        job = influence.InfluenceRun(ckpts=["tiny-llama"], train=str(write_records(tmp_path / f"{out}.jsonl", train)),
                                     probes=probes, out=str(tmp_path / out), config=cfg, shard_size=2,
                                     features_dir=features_dir)
        return pd.read_parquet(influence.run(job)).sort_values(["train_id", "probe_id"], ignore_index=True)

    first = table(TRAIN, "first", store)
    assert not np.allclose(table(edited, "fresh", None)["train_norm"], first["train_norm"])  # the edit matters
    pd.testing.assert_frame_equal(table(edited, "edited", store), table(edited, "fresh2", None))
    pd.testing.assert_frame_equal(table(TRAIN, "content", store, tokens="content"),
                                  table(TRAIN, "content2", None, tokens="content"))
    pd.testing.assert_frame_equal(table(TRAIN, "again", store), first)  # (the store still serves the first run)


def test_an_image_rewritten_in_place_is_a_new_input(tmp_path):
    """Records name images by path: after an image is rewritten under its path, ``--resume`` refuses the shards of
    the old one and a shared ``--features`` store computes afresh, so the table equals a run without the store."""
    from dynamics.data import write_records

    paths = _images(tmp_path)
    train = write_records(tmp_path / "train.jsonl", [{"id": f"v{i}", "prompt": "what is it", "completion": "a picture",
                                                       "images": [paths[i]]} for i in range(2)])
    probes = write_records(tmp_path / "probes.jsonl", [{"id": "p", "prompt": "colour?", "completion": "red",
                                                        "images": [paths[2]]}])

    def job(out, features_dir=None, **changes):
        return influence.InfluenceRun(ckpts=["tiny-qwen2.5-vl"], train=str(train), probes=str(probes),
                                      out=str(tmp_path / out), features_dir=features_dir, shard_size=1,
                                      config=InfluenceConfig(target="gold", mode="projected", proj_dim=64), **changes)

    store = str(tmp_path / "store")
    first = pd.read_parquet(influence.run(job("first", store)))
    Image.open(paths[2]).rotate(90).save(paths[0])  # an image of the training file, and another's
    with pytest.raises(DynamicsError, match="holds results computed on other inputs"):
        influence.run(job("first", store, resume=True))
    again = pd.read_parquet(influence.run(job("again", store)))
    pd.testing.assert_frame_equal(again, pd.read_parquet(influence.run(job("fresh"))))
    assert not np.allclose(again["train_norm"], first["train_norm"])


def test_cli_bad_input_is_one_line(tmp_path, cli):
    train = _write(tmp_path / "train.jsonl", TRAIN[:1] + [{"id": "x", "prompt": "p"}])
    probes = _write(tmp_path / "probes.jsonl", PROBES)
    res = cli("influence", "--ckpt", "tiny-llama", "--train", str(train), "--probes", str(probes),
              "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{train}:2: field 'completion'" in res.stderr
    res = cli("influence", "--ckpt", str(tmp_path / "missing"), "--train", str(train), "--probes", str(probes),
              "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1

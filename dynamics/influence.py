"""Per-sample gradient influence of training samples on prior-knowledge probes.

The maths
---------
For a probe o = (x_o, y_o) and a training sample u = (x_u, y_u) let g(z) = ∇_θ log π_θ(y | x), the log-likelihood
of the completion tokens summed (``reduce="sum"``) or averaged (``reduce="mean"``) under the project's tokenization
convention (:mod:`dynamics.data`). The empirical NTK entry is

    K(o, u) = ⟨g(o), g(u)⟩ .

One SGD step of size η on u's log-likelihood moves θ by η g(u), so it changes the probe's log-likelihood by

    Δ log π(y_o | x_o) = η K(o, u) + O(η²)                    (Ren & Sutherland, ICLR 2025)

For every pair we report ``kernel`` K, ``cosine`` K / (‖g(o)‖ ‖g(u)‖), ``train_norm`` ‖g(u)‖ and ``probe_norm``
‖g(o)‖. The *magnitude* of u's influence on prior knowledge is ‖g(u)‖ (and mean |K| over probes); its
*direction* is the cosine, whose sign says whether learning u helps (> 0) or hurts (< 0) the probe.

Ren & Sutherland's per-token decomposition Δ log π(·|x_o) = −η A(x_o) 𝒦(x_o, x_u) G(x_u, y_u) + O(η²), with
A = I − 1πᵀ the log-softmax Jacobian, 𝒦 the eNTK of the logits and G = π − e_y the loss gradient at the logits,
gives the study's lower bound on the logit-eNTK's size from one measured step (:func:`one_step`):

    ‖𝒦(x_o, x_u)‖_F ≥ ‖Δ log π(·|x_o)‖ / (η ‖A(x_o)‖₂ ‖G(x_u)‖),   ‖A‖₂ = √(V ‖π‖²) in closed form,

(over several probe tokens A is block diagonal, so its norm is the largest block's; G stacks the train tokens).

The engine (:mod:`dynamics.gradients`) never materialises every per-sample gradient: probes are stored in compact
form (low-rank factors, or materialised matrices for layers where that is cheaper and fits ``max_memory``), then
each training batch runs one forward and one backward through activations only, and its per-sample gradients are
contracted with the probe store layer by layer inside the backward hooks. Logits are formed only at completion
positions.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from dynamics.data import Encoded, collate, data_hash, image_digests, naming_records
from dynamics.errors import DynamicsError, check_bounds
from dynamics.generation import encode_scored
from dynamics.gradients import (
    BYTE_COST,
    LOWRANK_KINDS,
    FormPlan,
    Layout,
    LowRank,
    ParamGrad,
    Projector,
    Recorder,
    apply_delta,
    build_cost,
    dense_cost,
    ghost_cost,
    inner,
    plan_forms,
    row_sq_norms,
    rows_inner,
    self_inner,
    stacked_inner,
    stacked_self_inner,
)
from dynamics.models import LoadedModel, check_device, fingerprint
from dynamics.store import (
    atomic_path,
    check_folder,
    concat_parquet,
    make_folder,
    text_hash,
    versions,
    write_json,
)

COLUMNS = ["ckpt", "step", "train_id", "probe_id", "kernel", "cosine", "train_norm", "probe_norm"]


@dataclass
class InfluenceConfig:
    """How to compute influence; shared by :func:`compute` and ``dynamics influence``."""

    params: str = "linear"  # linear | all | lora | a regex over parameter names
    reduce: str = "sum"  # sum | mean over completion tokens
    batch_size: int = 8
    max_memory_gb: float | None = None  # probe-store budget; default 40% of RAM (of GPU memory on CUDA)
    dtype: str = "float32"  # float32 | float64 | bfloat16 (products then run in float32, unless products="model")
    products: str = "float32"  # a bf16/fp16 model's per-sample products and probe store in float32, or in its own
    # dtype ("model": half the store and bytes, tensor-core products on GPUs, the gradients' own bf16 rounding)
    mode: str = "exact"  # exact | projected
    proj_dim: int = 1024
    projection: str = "kron"  # kron (LoGra-style, per layer) | jl (TRAK-style, whole gradient)
    proj_seed: int = 0
    tokens: str = "all"  # all completion tokens, or content: cut at the end-of-turn (special) token
    contraction: str = "auto"  # auto (cheaper per layer and batch) | ghost | dense (force one, e.g. to compare)
    per_token: bool = False  # also the kernel of each probe token with each training sample
    target: str = "base"  # probe completion: the base model's own response (base) or the gold one (gold)
    device: str = "cpu"

    def validate(self) -> None:
        if self.reduce not in ("sum", "mean"):
            raise DynamicsError(f"reduce must be sum or mean, got {self.reduce!r}", field="reduce")
        if self.mode not in ("exact", "projected"):
            raise DynamicsError(f"mode must be exact or projected, got {self.mode!r}", field="mode")
        if self.projection not in ("kron", "jl"):
            raise DynamicsError(f"projection must be kron or jl, got {self.projection!r}", field="projection")
        if self.target not in ("base", "gold"):
            raise DynamicsError(f"target must be base or gold, got {self.target!r}", field="target")
        check_bounds(self, {"batch_size": 1, "proj_dim": 1, "max_memory_gb": 0})
        if self.tokens not in ("all", "content"):
            raise DynamicsError(f"tokens must be all or content, got {self.tokens!r}", field="tokens")
        if self.contraction not in ("auto", "ghost", "dense"):
            raise DynamicsError(f"contraction must be auto, ghost or dense, got {self.contraction!r}",
                                field="contraction")
        if self.products not in ("float32", "model"):
            raise DynamicsError(f"products must be float32 or model, got {self.products!r}", field="products")
        if self.per_token and self.mode != "exact":
            raise DynamicsError(f"per_token needs mode exact, got {self.mode!r}", field="per_token")
        check_device(self.device)


# --------------------------------------------------------------------------------------------- objective
def _split_model(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(HF model, its body returning hidden states, its output head), looking through peft wrappers."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hf, hf.base_model, hf.get_output_embeddings()


def completion_positions(input_ids: Tensor, completion_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Positions whose next token is a completion token, as a right-padded ``(B, Tc)`` index with its validity
    mask and the target ids: hidden state at position t predicts token t+1."""
    predicts = completion_mask[:, 1:].bool()
    counts = predicts.sum(1)
    width = max(int(counts.max()), 1)
    pos = torch.zeros(input_ids.shape[0], width, dtype=torch.long)
    valid = torch.zeros(input_ids.shape[0], width, dtype=torch.bool)
    for b in range(input_ids.shape[0]):
        idx = predicts[b].nonzero().squeeze(1)
        pos[b, : len(idx)] = idx
        valid[b, : len(idx)] = True
    targets = input_ids.gather(1, pos + 1)
    return pos, valid, targets


def token_logprobs(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """log π(y_t | y_<t, x) at every completion token, ``(B, Tc)`` (zero where invalid), and the validity mask.

    The body runs on the whole sequence; the output head only on the completion positions (rows of padding
    are zero, so they carry no gradient). A text-only causal LM gets no attention mask: batches are right-padded,
    so a real token never sees padding (it comes after), and plain causal attention takes the fused kernels that
    skip the masked half; padding rows then hold garbage that nothing reads and that gets no gradient. Models with
    a vision config keep the mask (Qwen2.5-VL derives its position ids from it)."""
    hf, body, head = _split_model(model)
    device = next(model.parameters()).device
    keys = ("input_ids", "pixel_values", "image_grid_thw")
    if hasattr(hf.config, "vision_config"):
        keys += ("attention_mask",)
    inputs = {k: batch[k].to(device) for k in keys if k in batch}
    hidden = body(**inputs, use_cache=False).last_hidden_state
    pos, valid, targets = (t.to(device) for t in completion_positions(batch["input_ids"], batch["completion_mask"]))
    h = hidden.gather(1, pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])) * valid.unsqueeze(-1)
    logits = head(h)
    cap = getattr(hf.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    logp = torch.log_softmax(_upcast(logits), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp * valid, valid


def _upcast(x: Tensor) -> Tensor:
    """Half-precision logits go through log-softmax in fp32; fp32/fp64 stay as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def sequence_weights(valid: Tensor, reduce: str) -> Tensor:
    """Per-token weights turning token log-probs into the per-sample objective: 1 (sum) or 1/T (mean)."""
    w = valid.to(torch.float32)
    return w / w.sum(1, keepdim=True).clamp(min=1) if reduce == "mean" else w


# ----------------------------------------------------------------------------------------------- batches
@dataclass
class Batches:
    """Encoded samples, batched by similar length (less padding), with each batch's original indices."""

    encoded: list[Encoded]
    batch_size: int
    order: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        by_len = sorted(range(len(self.encoded)), key=lambda i: len(self.encoded[i].input_ids))
        self.order = [by_len[i:i + self.batch_size] for i in range(0, len(by_len), self.batch_size)]

    def __iter__(self):
        for idx in self.order:
            yield idx, [self.encoded[i] for i in idx]

    def __len__(self) -> int:
        return len(self.order)


@dataclass(frozen=True)
class Lengths:
    """What a probe store's plan (:func:`plan_forms`) reads of a set of samples: the mean length, the mean
    completion length, and the shortest sample's (length, completion length) -- a lower bound on any batch's."""

    mean: float
    completion: float
    shortest: tuple[float, float] | None

    @classmethod
    def of(cls, encoded: Sequence[Encoded]) -> Lengths:
        if not encoded:
            return cls(0.0, 0.0, None)
        lens = [len(e.input_ids) for e in encoded]
        comp = [sum(e.completion_mask) for e in encoded]
        return cls(float(np.mean(lens)), float(np.mean(comp)), (min(lens), min(comp)))


def encode_all(lm: LoadedModel, records: Sequence[dict], completions: Sequence | None = None,
               tokens: str = "all", fields: Sequence[str] | None = None) -> list[Encoded]:
    """Encode records (optionally with other completions: ``fields[i]`` names where record i's comes from, for
    errors), checking each fits the model's context and has a token to score; ``tokens="content"`` keeps only
    the answer's own completion tokens (see :meth:`Encoded.content_only`)."""
    special = set(lm.tokenizer.all_special_ids)
    fields = fields or ["completion"] * len(records)
    out = []
    for rec, where, enc in zip(records, fields, encode_scored(lm, records, completions=completions,
                                                              completion_field=fields), strict=True):
        if tokens == "content":
            enc = enc.content_only(special)
        if not any(enc.completion_mask):
            why = ("is empty: with tokens=content (the answer's own tokens, not the chat template's end-of-turn) "
                   "nothing is left to score" if tokens == "content" else "has no tokens to score")
            raise DynamicsError(f"the completion {why}", field=f"{where} (record {rec['id']})")
        out.append(enc)
    return out


def encode_train(lm: LoadedModel, records: Sequence[dict], config: InfluenceConfig) -> list[Encoded]:
    return encode_all(lm, records, tokens=config.tokens)


def encode_probes(lm: LoadedModel, probes: Sequence[dict], config: InfluenceConfig) -> list[Encoded]:
    """Probes with their target completion (the base model's own response, or gold:
    :func:`dynamics.probes.probe_target`)."""
    from dynamics.probes import probe_target, probe_target_field

    return encode_all(lm, probes, [probe_target(p, config.target) for p in probes], tokens=config.tokens,
                      fields=[probe_target_field(p, config.target) for p in probes])


def _layout(items: Sequence[Encoded]) -> Layout:
    counts = [int(e.image_grid_thw.prod(-1).sum()) if e.image_grid_thw is not None else 0 for e in items]
    return Layout(len(items), counts if any(counts) else None)


def _memory_budget(config: InfluenceConfig) -> int:
    if config.max_memory_gb is not None:
        return int(config.max_memory_gb * 2**30)
    if config.device.startswith("cuda") and torch.cuda.is_available():
        return int(0.4 * torch.cuda.get_device_properties(0).total_memory)
    try:
        return int(0.4 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


# ------------------------------------------------------------------------------------------- the engine
def _attention_without_cudnn() -> contextlib.AbstractContextManager:
    """Scaled dot-product attention by flash or memory-efficient kernels (math as the fallback), not cuDNN's:
    cuDNN builds a graph for every new sequence length, hundreds of ms each (PyTorch prefers it on Hopper GPUs),
    and batches sorted by length give nearly every batch a new length. In a fresh process on an H200 that build
    was most of the gap between a first call and a warm one (benchmarks/RESULTS.md)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class _GradientPass:
    """Runs batches through the model with a :class:`Recorder`, handing each parameter's per-sample gradient to
    a callback; owns dtype handling and per-token expansion."""

    def __init__(self, lm: LoadedModel, config: InfluenceConfig) -> None:
        self.lm = lm
        self.config = config
        model_dtype = next(lm.model.parameters()).dtype
        half = model_dtype in (torch.bfloat16, torch.float16)
        self.compute_dtype = torch.float32 if half and config.products == "float32" else None
        self.recorder = Recorder(lm.model, config.params, dtype=self.compute_dtype)
        self.pad_id = lm.tokenizer.pad_token_id

    def run(self, items: Sequence[Encoded], on_param: Callable[[str, ParamGrad], None],
            token_weights: Tensor | None = None) -> Tensor:
        """One forward/backward; returns the per-sample objective values (detached)."""
        batch = collate(items, self.pad_id)
        with torch.enable_grad(), _attention_without_cudnn(), self.recorder.capture(_layout(items), on_param):
            logp, valid = token_logprobs(self.lm.model, batch)
            weights = token_weights if token_weights is not None else sequence_weights(valid, self.config.reduce)
            per_sample = (logp * weights.to(logp.device, logp.dtype)).sum(1)
            self.recorder.backward(per_sample)
        return per_sample.detach()


@dataclass
class ProbeStore:
    """The probes' per-sample gradients in compact form: low-rank terms per probe batch, and materialised
    ``(P, n)`` matrices for the parameters planned (or later switched) to dense."""

    n: int
    lowrank: dict[str, list[tuple[Tensor, ParamGrad]]] = field(default_factory=dict)
    dense: dict[str, Tensor] = field(default_factory=dict)
    norms_sq: Tensor | None = None
    dtype: torch.dtype | None = None  # of the materialised matrices; None: that of the gradients

    def dense_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.dense.values())

    def materialise(self, name: str) -> Tensor:
        parts = self.lowrank[name]
        first = parts[0][1].materialise()
        out = first.new_zeros(self.n, first.shape[1])
        out[parts[0][0]] = first
        for idx, pg in parts[1:]:
            out[idx] = pg.materialise()
        return out if self.dtype is None else out.to(self.dtype)


def _probe_pass(engine: _GradientPass, probes: Batches, plan: FormPlan, weights: list[Tensor] | None,
                keep_lowrank: bool = True, logp_out: Tensor | None = None,
                dtype: torch.dtype | None = None, progress: Callable[[int], None] | None = None) -> ProbeStore:
    """Run the probes once and keep their gradients: materialised where planned dense (in ``dtype``, default the
    gradients'), and (if ``keep_lowrank``) low-rank too, but for the plan's ``dense_only``, so each training batch
    can still pick the cheaper contraction. ``logp_out`` receives each probe's objective value (its log-likelihood)."""
    store = ProbeStore(n=len(probes.encoded), dtype=dtype)
    dev = engine.recorder.device
    norms = torch.zeros(store.n, dtype=torch.float64, device=dev)  # summed on the device, moved once
    for b, (idx, items) in enumerate(probes):
        index = torch.tensor(idx, device=dev)

        def on_param(name: str, pg: ParamGrad, index: Tensor = index) -> None:
            if plan.dense(name):
                if name not in store.dense:
                    p = engine.recorder.params[name]  # kept where the training gradients will be
                    store.dense[name] = p.new_zeros(store.n, p.numel(),
                                                    dtype=dtype or engine.recorder.dtype or p.dtype)
                g = pg.materialise()
                norms[index] += row_sq_norms(g).double()  # (the ghost norm costs T² per sample)
                store.dense[name][index] = g.to(store.dense[name].dtype)
            else:
                norms[index] += self_inner(pg).double()
            if not plan.dense(name) or (keep_lowrank and pg.terms and name not in plan.dense_only):
                store.lowrank.setdefault(name, []).append((index, pg))

        values = engine.run(items, on_param, None if weights is None else weights[b])
        if logp_out is not None:
            logp_out[index.cpu()] = values.double().cpu()
        if progress:
            progress(len(idx))
    store.norms_sq = norms.cpu()
    return store


def _train_pass(engine: _GradientPass, train: Batches, store: ProbeStore, budget: int,
                progress: Callable[[int], None] | None = None) -> tuple[Tensor, Tensor]:
    """Kernel ``(N_train, P)`` and train norms² against a probe store, one forward+backward per batch."""
    dev = engine.recorder.device  # summed where the products are formed: one copy to the host at the end
    K = torch.zeros(len(train.encoded), store.n, dtype=torch.float64, device=dev)
    norms = torch.zeros(len(train.encoded), dtype=torch.float64, device=dev)
    used = [store.dense_bytes()]
    for idx, items in train:
        acc = _BatchKernel(engine.recorder, store, budget, used, len(idx))
        engine.run(items, acc.add)
        index = torch.tensor(idx, device=dev)
        K[index], norms[index] = acc.finish()
        if progress:
            progress(len(idx))
    return K.cpu(), norms.cpu()


GROUP_BYTES = 1 << 28  # the most Gram (and stacked factor) bytes one grouped ghost contraction may hold


class _BatchKernel:
    """One training batch's kernel rows ``(B, P)`` and norms² ``(B,)``, summed over parameters on the device.

    Parameters that take the ghost contraction with one term of the same shapes (the same layer of every block)
    wait and are contracted together, as many layers per batched GEMM as :data:`GROUP_BYTES` allows
    (:func:`stacked_inner`): tens of small kernels per layer become a few per group, which is what bounds a GPU
    at small batches. The rest are contracted as they arrive (:func:`contract`)."""

    def __init__(self, recorder: Recorder, store: ProbeStore, budget: int, used: list[int], batch: int) -> None:
        self.recorder, self.store, self.budget, self.used = recorder, store, budget, used
        self.rows = torch.zeros(batch, store.n, dtype=torch.float64, device=recorder.device)
        self.sq = torch.zeros(batch, dtype=torch.float64, device=recorder.device)
        self.groups: dict[tuple, tuple[list[Tensor], list[tuple[LowRank, list[LowRank]]]]] = {}

    def add(self, name: str, pg: ParamGrad) -> None:
        parts = self.store.lowrank.get(name, [])
        both_sides = [pg, *(q for _, q in parts)]  # the batch's gradient and every stored probe batch's
        dense = _use_dense(self.recorder, self.store, name, pg, self.budget, self.used)
        if not dense and parts and all(q.dense is None and len(q.terms) == 1 and q.terms[0].out.dense is not None
                                       and q.terms[0].inp.dense is not None for q in both_sides):
            t = pg.terms[0]
            key = (t.out.dense.shape, t.inp.dense.shape, t.out.dense.dtype,
                   tuple((id(i), q.terms[0].out.dense.shape, q.terms[0].inp.dense.shape) for i, q in parts))
            _, group = self.groups.setdefault(key, ([i for i, _ in parts], []))
            group.append((t, [q.terms[0] for _, q in parts]))
            if len(group) >= self._group_size(t, group[0][1]):
                self._contract(key)
            return
        rows, sq, _ = _dense_rows(self.store, name, pg) if dense else _ghost_rows(self.store, name, pg)
        self.rows += rows
        self.sq += sq

    @staticmethod
    def _group_size(t: LowRank, probes: list[LowRank]) -> int:
        """Layers per grouped contraction: two Grams per probe batch and for the norms, plus the stacked factors."""
        (B, T, o), i = t.out.dense.shape, t.inp.dense.shape[-1]
        per_layer = 2 * B * T * (T + sum(q.batch * q.inp.length for q in probes))
        per_layer += (B * T + sum(q.batch * q.inp.length for q in probes)) * (o + i)
        return max(1, GROUP_BYTES // (per_layer * t.out.dense.element_size()))

    def _contract(self, key: tuple) -> None:
        probe_index, group = self.groups.pop(key)
        out = torch.stack([t.out.dense for t, _ in group])
        inp = torch.stack([t.inp.dense for t, _ in group])
        for j, pidx in enumerate(probe_index):
            q_out = torch.stack([qs[j].out.dense for _, qs in group])
            q_inp = torch.stack([qs[j].inp.dense for _, qs in group])
            self.rows[:, pidx] += stacked_inner(out, inp, q_out, q_inp).double()
        self.sq += stacked_self_inner(out, inp).double()

    def finish(self) -> tuple[Tensor, Tensor]:
        for key in list(self.groups):
            self._contract(key)
        return self.rows, self.sq


def contract(recorder: Recorder, store: ProbeStore, name: str, pg: ParamGrad, budget: int,
             used: list[int], delta: Tensor | None = None, g: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """One parameter's share of ⟨g(u), g(o)⟩ for a batch against every stored probe, ``(B, P)``, and of
    ‖g(u)‖², ``(B,)`` (float64, on the gradients' device), by the cheaper contraction for this batch. With ``delta`` (an update
    of the parameter) also its :func:`predicted_change` ⟨g(o), Δ⟩, ``(P,)``, in the same pass over a materialised
    store (one more row of the product), else ``None``. ``g``: the rows :func:`stacked_gradients` returns, already
    built (the store must hold the parameter materialised)."""
    if g is not None or _use_dense(recorder, store, name, pg, budget, used):
        return _dense_rows(store, name, pg, delta, g)
    return _ghost_rows(store, name, pg, delta)


def _dense_rows(store: ProbeStore, name: str, pg: ParamGrad, delta: Tensor | None = None,
                g: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`contract` by the materialised store: one product of the batch's built gradients with it."""
    S = store.dense[name]
    g = stacked_gradients(pg, delta, S) if g is None else g
    B = g.shape[0] - (delta is not None)
    prod = rows_inner(g.to(S.dtype), S).double()  # (a store kept in a lower precision than the gradients)
    sq = row_sq_norms(g[:B]).double()
    return prod[:B], sq, None if delta is None else prod[B]


def _ghost_rows(store: ProbeStore, name: str, pg: ParamGrad,
                delta: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`contract` by ghost inner products with each stored probe batch's low-rank terms."""
    rows = None
    for pidx, ppg in store.lowrank[name]:
        k = inner(pg, ppg).double()
        if rows is None:
            rows = k.new_zeros(k.shape[0], store.n)
        rows[:, pidx] += k
    return rows, self_inner(pg).double(), None if delta is None else predicted_change(store, name, delta)


def stacked_gradients(pg: ParamGrad, delta: Tensor | None, like: Tensor) -> Tensor:
    """The batch's materialised gradients ``(B, n)``, and the update Δ as one more last row when given, built in
    place in one buffer (no copy to stack them), in the gradients' dtype, on the device of ``like`` (the stored
    ``(P, n)``)."""
    B = pg.dense.shape[0] if pg.dense is not None else pg.terms[0].batch
    buf = like.new_empty(B + (delta is not None), like.shape[1], dtype=pg.dtype)
    if delta is not None:
        buf[-1].copy_(delta.reshape(-1))
    pg.materialise(out=buf[:B])
    return buf


def predicted_change(store: ProbeStore, name: str, delta: Tensor) -> Tensor:
    """⟨g(o), Δθ⟩ for every stored probe, ``(P,)``: the first-order change of each probe's objective when the
    parameter ``name`` moves by ``delta`` (any optimizer's update)."""
    if name in store.dense:
        return (store.dense[name] @ delta.reshape(-1).to(store.dense[name].dtype)).double()
    out = torch.zeros(store.n, dtype=torch.float64, device=delta.device)
    for pidx, ppg in store.lowrank[name]:
        out[pidx] += apply_delta(ppg, delta).double()
    return out


def _use_dense(recorder: Recorder, store: ProbeStore, name: str, pg: ParamGrad, budget: int,
               used: list[int]) -> bool:
    """Per batch and parameter: contract via materialised gradients, or via the ghost inner product?
    (The costs of :func:`plan_forms`, with this batch's lengths.)"""
    if name not in store.lowrank:
        return True
    if pg.dense is not None and not pg.terms:
        return name in store.dense
    if pg.dense is not None or not {u.kind for u in recorder.uses.get(name, [])} <= LOWRANK_KINDS:
        return False
    B, P, n = pg.terms[0].batch, store.n, recorder.params[name].numel()
    parts = [ppg for _, ppg in store.lowrank[name] if len(ppg.terms) == len(pg.terms)]
    train = [t.shape() for t in pg.terms]
    probes = [(float(np.mean([q.terms[j].inp.length for q in parts])), o, i) for j, (_, o, i) in enumerate(train)]
    ref = pg.terms[0].inp.dense if pg.terms[0].inp.dense is not None else pg.terms[0].out.dense
    eb = ref.element_size() if ref is not None else 4
    ghost = B * ghost_cost(train, probes, P, eb)
    dense = B * dense_cost(train, n, P, B, eb)
    if name not in store.dense:
        bytes_needed = P * n * (store.dtype or recorder.dtype or recorder.params[name].dtype).itemsize  # the store's
        dense += P * (build_cost(probes) + BYTE_COST * n * eb)
        if dense >= ghost or used[0] + bytes_needed > budget:
            return False
        store.dense[name] = store.materialise(name)
        used[0] += bytes_needed
        return True
    return dense < ghost


# --------------------------------------------------------------------------------------------- public API
def _expand_per_token(encoded: list[Encoded]) -> tuple[list[Encoded], list[tuple[int, int]]]:
    """One pseudo-probe per completion token (same input, weight on that token only)."""
    out, keys = [], []
    for i, e in enumerate(encoded):
        for t in range(sum(e.completion_mask)):
            out.append(e)
            keys.append((i, t))
    return out, keys


def compute(
    lm: LoadedModel,
    train: Sequence[dict],
    probes: Sequence[dict],
    config: InfluenceConfig | None = None,
    ckpt: str = "",
    step: int = 0,
    progress: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """The influence table (one row per training sample x probe) for one model; see the module docstring."""
    return Probes(lm, probes, config or InfluenceConfig(), train).table(train, ckpt, step, progress)


class Probes:
    """The probes' side of influence for one model, built on first use and shared by every training set scored
    against it: the probes' gradient store (exact mode), the per-token store (``per_token``) or the projected
    features (projected mode). A training set split into blocks (``dynamics influence``'s shards) pays for the
    probes once per checkpoint, not once per block.

    ``train``: every training record that will be scored; the stores are laid out for their :class:`Lengths`
    (:func:`plan_forms`), so that a block's contractions do not depend on which blocks came before it. Those are
    read from the first block scored when it is the whole set, else from one encoding of the set (then dropped).
    The last block's encodings are kept, so that its table and its token table share them.
    ``progress``: ``factory(what, total)`` of a progress callback for each pass over the probes."""

    def __init__(self, lm: LoadedModel, probes: Sequence[dict], config: InfluenceConfig, train: Sequence[dict],
                 progress: Callable[[str, int], Callable[[int], None]] | None = None) -> None:
        config.validate()
        self.lm, self.records, self.config, self.train = lm, list(probes), config, train
        self._bar = progress or (lambda what, total: None)
        self.encoded = encode_probes(lm, probes, config)
        self._kernel: ProbeKernel | None = None
        self._tokens: tuple[ProbeKernel, list[tuple[int, int]]] | None = None
        self._features: Tensor | None = None
        self._lengths: Lengths | None = None
        self._last: tuple[Sequence[dict], list[Encoded]] | None = None

    def _encode(self, block: Sequence[dict]) -> list[Encoded]:
        if self._last is None or self._last[0] is not block:
            self._last = None  # the previous block's encodings go first
            self._last = block, encode_train(self.lm, block, self.config)
        return self._last[1]

    def _plan_lengths(self, block: Sequence[dict], encoded: list[Encoded]) -> Lengths:
        """The whole training set's lengths, from ``block``'s encodings when it is the whole set."""
        if self._lengths is None:
            whole = len(block) == len(self.train) and all(a is b for a, b in zip(block, self.train, strict=True))
            self._lengths = Lengths.of(encoded if whole else encode_train(self.lm, self.train, self.config))
        return self._lengths

    def kernel(self, block: Sequence[dict]) -> tuple[ProbeKernel, list[Encoded]]:
        """The probes' store (built on first use) and ``block``'s encodings."""
        encoded = self._encode(block)
        if self._kernel is None:
            self._kernel = ProbeKernel(self.lm, self.encoded, self.config, self._plan_lengths(block, encoded),
                                       progress=self._bar("probes", len(self.encoded)))
        return self._kernel, encoded

    def features(self) -> Tensor:
        """The probes' projected features ``(P, D)``."""
        if self._features is None:
            self._features = features(self.lm, self.encoded, self.config, self._bar("probes", len(self.encoded)))
        return self._features

    def table(self, train: Sequence[dict], ckpt: str = "", step: int = 0,
              progress: Callable[[int], None] | None = None, train_features: Tensor | None = None) -> pd.DataFrame:
        """The influence table of ``train`` against the probes (``train_features``: their projected features, if
        already computed)."""
        if self.config.mode == "projected":
            ft = train_features if train_features is not None else \
                features(self.lm, encode_train(self.lm, train, self.config), self.config, progress)
            fp = self.features()
            K = (ft @ fp.T).double()
            tn, pn = ft.double().norm(dim=1), fp.double().norm(dim=1)
        else:
            pk, encoded = self.kernel(train)
            K, tn_sq = pk(encoded, progress)
            tn, pn = tn_sq.clamp(min=0).sqrt(), pk.norms_sq.clamp(min=0).sqrt()
        return kernel_table(K, tn, pn, [r["id"] for r in train], [p["id"] for p in self.records], ckpt, step)

    def token_table(self, train: Sequence[dict], ckpt: str = "", step: int = 0) -> pd.DataFrame:
        """Kernel between each probe *token*'s log-likelihood gradient and each training sample's gradient."""
        encoded = self._encode(train)
        if self._tokens is None:
            expanded, keys = _expand_per_token(self.encoded)
            weights = []
            for idx, items in Batches(expanded, self.config.batch_size):
                batch = collate(items, self.lm.tokenizer.pad_token_id)
                _, valid, _ = completion_positions(batch["input_ids"], batch["completion_mask"])
                w = torch.zeros(valid.shape)
                for r, i in enumerate(idx):
                    w[r, keys[i][1]] = 1.0
                weights.append(w)
            # Batches sorts by length: the probe pass feeds the same order the weights were built in
            self._tokens = ProbeKernel(self.lm, expanded, self.config, self._plan_lengths(train, encoded), weights,
                                       self._bar("probe tokens", len(expanded))), keys
        pk, keys = self._tokens
        K, _ = pk(encoded)
        rows = []
        tok = self.lm.tokenizer
        for j, (i, t) in enumerate(keys):
            enc = self.encoded[i]
            comp = [tid for tid, m in zip(enc.input_ids, enc.completion_mask, strict=True) if m]
            for u, rec in enumerate(train):
                rows.append({"ckpt": ckpt, "step": step, "train_id": rec["id"], "probe_id": self.records[i]["id"],
                             "token_index": t, "token": tok.decode([comp[t]]), "kernel": float(K[u, j])})
        return pd.DataFrame(rows)


def check_finite(K: Tensor, train_norm: Tensor, probe_norm: Tensor, train_ids: Sequence[str],
                 probe_ids: Sequence[str], ckpt: str = "") -> None:
    """Raise naming every sample whose gradient (norm) or kernel row/column is NaN or inf -- a probe whose
    gradient is not finite spoils its whole column, a training sample its row -- so that no non-finite value
    lands silently in the table."""
    bad_probe = ~torch.isfinite(probe_norm)
    bad_train = ~torch.isfinite(train_norm)
    cells = ~torch.isfinite(K) & ~bad_train[:, None] & ~bad_probe[None, :]  # non-finite with finite norms
    bad_train |= cells.any(dim=1)
    if not (bad_train.any() or bad_probe.any()):
        return
    parts = []
    for what, ids, mask in (("training samples", train_ids, bad_train), ("probes", probe_ids, bad_probe)):
        if mask.any():
            parts.append(f"{what} {', '.join(str(ids[i]) for i in mask.nonzero().flatten().tolist())}")
    where = f" at {ckpt}" if ckpt else ""
    raise DynamicsError(f"non-finite gradients (NaN/inf){where} for {'; '.join(parts)}", field="kernel")


def kernel_table(K: Tensor, train_norm: Tensor, probe_norm: Tensor, train_ids: Sequence[str],
                 probe_ids: Sequence[str], ckpt: str = "", step: int = 0) -> pd.DataFrame:
    """Long-format table of a kernel matrix with cosines and norms (the ``influence.parquet`` rows)."""
    n, p = K.shape
    check_finite(K, train_norm, probe_norm, train_ids, probe_ids, ckpt)
    denom = (train_norm[:, None] * probe_norm[None, :]).clamp(min=1e-300)
    cos = (K / denom).numpy()
    return pd.DataFrame({
        "ckpt": ckpt,
        "step": np.int64(step),
        "train_id": np.repeat(np.asarray(train_ids, dtype=object), p),
        "probe_id": np.tile(np.asarray(probe_ids, dtype=object), n),
        "kernel": K.numpy().reshape(-1),
        "cosine": cos.reshape(-1),
        "train_norm": np.repeat(train_norm.numpy(), p),
        "probe_norm": np.tile(probe_norm.numpy(), n),
    })[COLUMNS]


class ProbeKernel:
    """The probes' half of the exact kernel: one forward+backward pass over the probes keeps their gradients (a
    :class:`ProbeStore` laid out for ``plan_for``, the lengths of the training samples to come); each call then
    contracts a training set with it, one forward+backward per training batch."""

    def __init__(self, lm: LoadedModel, probe_enc: list[Encoded], config: InfluenceConfig,
                 plan_for: Lengths, probe_weights: list[Tensor] | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        self.engine = _GradientPass(lm, config)
        self.batch_size = config.batch_size
        probes, own = Batches(probe_enc, config.batch_size), Lengths.of(probe_enc)
        self.budget = _memory_budget(config)
        plan = plan_forms(self.engine.recorder, len(probe_enc), own.mean, plan_for.mean,
                          (own.completion, plan_for.completion), self.budget,
                          element_bytes=4 if self.engine.compute_dtype else next(lm.model.parameters()).element_size(),
                          force=None if config.contraction == "auto" else config.contraction,
                          batch_size=config.batch_size, shortest=plan_for.shortest)
        if config.contraction == "ghost":
            self.budget = 0
        self.store = _probe_pass(self.engine, probes, plan, probe_weights, keep_lowrank=config.contraction == "auto",
                                 progress=progress)

    @property
    def norms_sq(self) -> Tensor:
        """‖g(o)‖² of every probe, ``(P,)``."""
        return self.store.norms_sq

    def __call__(self, train_enc: list[Encoded], progress: Callable[[int], None] | None = None
                 ) -> tuple[Tensor, Tensor]:
        """K ``(N, P)`` and ‖g(u)‖² ``(N,)`` of these training samples."""
        return _train_pass(self.engine, Batches(train_enc, self.batch_size), self.store, self.budget, progress)


def exact_kernel(lm: LoadedModel, train_enc: list[Encoded], probe_enc: list[Encoded],
                 config: InfluenceConfig, progress: Callable[[int], None] | None = None,
                 probe_weights: list[Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Exact K ``(N, P)``, train norms² ``(N,)`` and probe norms² ``(P,)``."""
    pk = ProbeKernel(lm, probe_enc, config, Lengths.of(train_enc), probe_weights)
    K, train_sq = pk(train_enc, progress)
    return K, train_sq, pk.norms_sq


def per_token_kernel(lm: LoadedModel, train: Sequence[dict], probes: Sequence[dict],
                     config: InfluenceConfig, ckpt: str = "", step: int = 0) -> pd.DataFrame:
    """Kernel between each probe *token*'s log-likelihood gradient and each training sample's gradient."""
    return Probes(lm, probes, config, train).token_table(train, ckpt, step)


def features(lm: LoadedModel, encoded: list[Encoded], config: InfluenceConfig,
             progress: Callable[[int], None] | None = None) -> Tensor:
    """Projected gradient features of encoded samples, one forward+backward per batch."""
    engine = _GradientPass(lm, config)
    projector = Projector(config.projection, config.proj_dim, config.proj_seed)
    names = list(engine.recorder.params)
    shapes = engine.recorder.shapes()
    out: Tensor | None = None
    for idx, items in Batches(encoded, config.batch_size):
        grads: dict[str, ParamGrad] = {}
        engine.run(items, grads.__setitem__)
        with torch.no_grad():
            f = projector.features(names, grads, shapes).to(torch.float32).cpu()
        if out is None:
            out = torch.zeros(len(encoded), f.shape[1])
        out[torch.tensor(idx)] = f
        if progress:
            progress(len(idx))
    return out


# ----------------------------------------------------------------------------------------- one-step estimator
@dataclass
class OneStepResult:
    """Measured effect of one real optimizer step on each training sample."""

    table: pd.DataFrame  # train_id, probe_id, dlogp_measured, dlogp_predicted, entk_fro_lower_bound
    pearson: float
    spearman: float


def _probe_logits_state(lm: LoadedModel, probe_batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Full-vocabulary log-softmax at probe completion positions ``(P, Tc, V)``, validity, and targets."""
    hf, body, head = _split_model(lm.model)
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
    hidden = body(**{k: probe_batch[k] for k in keys if k in probe_batch}, use_cache=False).last_hidden_state
    pos, valid, targets = completion_positions(probe_batch["input_ids"], probe_batch["completion_mask"])
    h = hidden.gather(1, pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return torch.log_softmax(_upcast(head(h)), -1), valid, targets


def one_step(
    lm: LoadedModel,
    train: Sequence[dict],
    probes: Sequence[dict],
    config: InfluenceConfig,
    lr: float = 1e-4,
    optimizer: str = "sgd",
    optimizer_state: dict | None = None,
    kernel: Tensor | None = None,
) -> OneStepResult:
    """For each training sample: take one real optimizer step on its log-likelihood (only the scoped
    parameters move), measure Δ log π of every probe, restore the weights.

    With SGD the first-order prediction is η K(o, u) (``kernel``, computed if not given); with Adam the
    update is preconditioned (``optimizer_state`` from a checkpoint's ``optimizer.pt`` gives its moments) and
    only the measured change and the lower bound are reported.
    """
    from scipy import stats

    config.validate()
    model = lm.model
    recorder_params = Recorder(model, config.params).params
    params = list(recorder_params.values())
    train_enc, probe_enc = encode_train(lm, train, config), encode_probes(lm, probes, config)
    if kernel is None and optimizer == "sgd":
        kernel, _, _ = exact_kernel(lm, train_enc, probe_enc, config)
    probe_batch = collate(probe_enc, lm.tokenizer.pad_token_id)
    saved_flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        logsm0, valid, targets = _probe_logits_state(lm, probe_batch)
    w_probe = sequence_weights(valid, config.reduce)
    base = (logsm0.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * w_probe).sum(1).double()
    # ‖A‖₂ per probe: max over its tokens of √(V ‖π_t‖²)
    V = logsm0.shape[-1]
    a_norm = ((V * logsm0.exp().pow(2).sum(-1)).sqrt() * valid).amax(1).double()
    rows = []
    snapshot = [p.detach().clone() for p in params]
    try:
        for u, enc in enumerate(train_enc):
            batch = collate([enc], lm.tokenizer.pad_token_id)
            for p in params:
                p.requires_grad_(True)
            with torch.enable_grad():
                hf, body, head = _split_model(model)
                logp, valid_u = token_logprobs(model, batch)
                w_u = sequence_weights(valid_u, config.reduce)
                objective = (logp * w_u).sum()
                grads = torch.autograd.grad(objective, params, allow_unused=True)
            # ‖G_u‖ = sqrt(Σ_s w_s² ‖π_s − e_{y_s}‖²), π at the train sample's completion positions
            with torch.no_grad():
                lsm_u, _, tgt_u = _probe_logits_state(lm, batch)
                pi = lsm_u.exp()
                g_sq = pi.pow(2).sum(-1) - 2 * pi.gather(-1, tgt_u.unsqueeze(-1)).squeeze(-1) + 1
                g_norm = float((g_sq * w_u.pow(2)).sum().sqrt())
                _apply_step(params, grads, lr, optimizer, optimizer_state)
                logsm1, _, _ = _probe_logits_state(lm, probe_batch)
                after = (logsm1.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * w_probe).sum(1).double()
                d_full = ((logsm1 - logsm0) * valid.unsqueeze(-1)).double().pow(2).sum((1, 2)).sqrt()
                for p, s in zip(params, snapshot, strict=True):
                    p.copy_(s)
                    p.requires_grad_(False)
            for o in range(len(probes)):
                rows.append({
                    "train_id": train[u]["id"], "probe_id": probes[o]["id"],
                    "dlogp_measured": float(after[o] - base[o]),
                    "dlogp_predicted": float(lr * kernel[u, o]) if kernel is not None else float("nan"),
                    "entk_fro_lower_bound": float(d_full[o] / (lr * a_norm[o] * g_norm)) if g_norm > 0 else 0.0,
                })
    finally:
        with torch.no_grad():
            for p, s in zip(params, snapshot, strict=True):
                p.copy_(s)
        for p in model.parameters():
            p.requires_grad_(saved_flags[id(p)])
    table = pd.DataFrame(rows)
    if optimizer == "sgd" and len(table) > 2:
        pr = float(stats.pearsonr(table.dlogp_predicted, table.dlogp_measured)[0])
        sr = float(stats.spearmanr(table.dlogp_predicted, table.dlogp_measured)[0])
    else:
        pr = sr = float("nan")
    return OneStepResult(table, pr, sr)


def _apply_step(params: list, grads: Sequence[Tensor | None], lr: float, optimizer: str,
                state: dict | None) -> None:
    """θ ← θ + η·update(g) for the log-likelihood gradient g (ascent = descent on the NLL)."""
    if optimizer == "sgd":
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                p.add_(g, alpha=lr)
        return
    if optimizer != "adam":
        raise DynamicsError(f"optimizer must be sgd or adam, got {optimizer!r}", field="optimizer")
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        if g is None:
            continue
        st = (state or {}).get(i, {})
        m = st.get("exp_avg", torch.zeros_like(p)).to(p.dtype)
        v = st.get("exp_avg_sq", torch.zeros_like(p)).to(p.dtype)
        t = int(st.get("step", 0)) + 1
        nll_grad = -g
        m = beta1 * m + (1 - beta1) * nll_grad
        v = beta2 * v + (1 - beta2) * nll_grad * nll_grad
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
        p.sub_(lr * m_hat / (v_hat.sqrt() + eps))


# -------------------------------------------------------------------------------------------- run (CLI)
@dataclass
class InfluenceRun:
    """``dynamics influence``: checkpoints x training set x probes -> OUT/influence.parquet + manifest."""

    ckpts: list[str]
    train: str
    probes: str
    out: str
    config: InfluenceConfig = field(default_factory=InfluenceConfig)
    shard_size: int = 256
    resume: bool = False  # keep OUT's finished shards (of these inputs)
    overwrite: bool = False  # delete OUT's earlier results first
    features_dir: str | None = None  # projected mode: where train features are stored / reused
    predict_check: int = 0  # one-step check on this many training samples
    lr: float = 1e-4

    def validate(self) -> None:
        self.config.validate()
        check_bounds(self, {"shard_size": 1, "predict_check": 0}, above={"lr": 0})
        if self.resume and self.overwrite:
            raise DynamicsError("resume keeps the folder's finished shards and overwrite deletes them: pass one",
                                field="overwrite")
        check_folder(self.out)


@dataclass
class Shard:
    """One unit of resumable work: a checkpoint and a block of training samples."""

    index: int
    ckpt: object  # dynamics.models.Checkpoint
    block: int
    path: Path
    tokens_path: Path


def _input_hashes(job: InfluenceRun) -> tuple[str, str]:
    """:func:`dynamics.data.data_hash` of the training and probe files (it reads their records: once per phase)."""
    return data_hash(job.train), data_hash(job.probes)


def _key(job: InfluenceRun, hashes: tuple[str, str]) -> str:
    """What every shard of a run shares: its options and the contents of its training and probe files (and of
    the images they name), given as their :func:`_input_hashes`."""
    return text_hash(json.dumps([asdict(job.config), *hashes, job.shard_size]), 12)


RESULTS = ("influence.parquet", "influence_tokens.parquet", "predict_check.parquet", "manifest.json", "shards",
           "features")


def prepare_out(job: InfluenceRun, delete: bool = True) -> None:
    """Make OUT ready to compute into. A folder that holds an earlier run's results needs ``resume`` (keep its
    finished shards, which must be of these inputs) or ``overwrite`` (delete those results first); other files
    in OUT are left alone. Every process checks, before any computes; one deletes (``delete``)."""
    job.validate()
    out = Path(job.out)
    shards = sorted(p for p in (out / "shards").glob("*.parquet") if not p.name.startswith("."))
    if delete:  # what a killed process was writing (atomic_path's temporary files)
        for p in (out / "shards").glob(".*"):
            p.unlink()
    if not (shards or (out / "manifest.json").exists() or (out / "influence.parquet").exists()):
        return
    if job.overwrite:
        if not delete:
            return
        reused = Path(job.features_dir).resolve() if job.features_dir else None
        for path in (out / name for name in RESULTS):
            if path.is_dir() and path.resolve() != reused:
                shutil.rmtree(path)
            elif path.is_file():
                path.unlink()
        return
    if not job.resume:
        raise DynamicsError("holds the results of an earlier `dynamics influence` run: pass --resume to keep its "
                            "finished shards or --overwrite to replace them", file=out)
    key, manifest = _key(job, _input_hashes(job)), out / "manifest.json"
    stored = json.loads(manifest.read_text()).get("key", key) if manifest.exists() else key
    if stored != key or any(not p.name.startswith(f"{key}-") for p in shards):
        raise DynamicsError("holds results computed on other inputs (training or probe file or their images, "
                            "influence options or shard size) than these, which --resume cannot continue: pass "
                            "--overwrite to replace them", file=out)


def _inputs(job: InfluenceRun) -> tuple[list[dict], list[dict], list, list[list[dict]], list[Shard], tuple[str, str]]:
    from dynamics.data import read_records
    from dynamics.models import resolve_checkpoints

    job.validate()
    train = read_records(job.train)
    probes = read_records(job.probes)
    ckpts = [c for spec in job.ckpts for c in resolve_checkpoints(spec)]
    if not ckpts:
        raise DynamicsError("no checkpoints found", field="ckpt")
    blocks = [train[i:i + job.shard_size] for i in range(0, len(train), job.shard_size)]
    hashes = _input_hashes(job)
    key = _key(job, hashes)
    shards_dir = Path(job.out) / "shards"
    shards = []
    for ci, ck in enumerate(ckpts):
        for bi in range(len(blocks)):
            stem = f"{key}-{text_hash(fingerprint(ck.spec), 12)}-{bi:05d}"
            shards.append(Shard(ci * len(blocks) + bi, ck, bi, shards_dir / f"{stem}.parquet",
                                shards_dir / f"{stem}.tokens.parquet"))
    return train, probes, ckpts, blocks, shards, hashes


def compute_shards(job: InfluenceRun, rank: int = 0, world: int = 1,
                   progress_factory: Callable[[str, int], Callable[[int], None]] | None = None) -> dict[str, float]:
    """Compute this rank's unfinished shards (index ≡ rank mod world), each written atomically, into an OUT made
    ready by :func:`prepare_out`."""
    from dynamics.models import load_model

    train, probes, ckpts, blocks, shards, _ = _inputs(job)  # atomic_path makes OUT/shards with the first shard
    timings = {"load": 0.0, "compute": 0.0, "write": 0.0}
    mine = [s for s in shards if s.index % world == rank]
    lm, side, loaded_spec = None, None, None
    for s in mine:
        if s.path.exists() and (s.tokens_path.exists() or not job.config.per_token):
            continue
        t0 = time.perf_counter()
        if loaded_spec != s.ckpt.spec:
            lm, side, loaded_spec = None, None, None  # the last model and its probe store go first
            try:
                lm = load_model(s.ckpt.spec, dtype=job.config.dtype, device=job.config.device)
            except DynamicsError as e:  # a bad model is a bad --ckpt
                if e.field != "model":
                    raise
                raise DynamicsError(e.message, file=e.file, line=e.line, field="ckpt") from None
            loaded_spec = s.ckpt.spec
        timings["load"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        block = blocks[s.block]
        if side is None:  # the probe pass(es) of this checkpoint, shared by all its blocks
            bars = None if progress_factory is None else \
                lambda what, total, name=s.ckpt.name: progress_factory(f"{name} {what}", total)
            with naming_records(job.probes):  # it encodes the probes; the training samples are encoded below
                side = Probes(lm, probes, job.config, train, bars)
            if job.config.mode == "projected" and len(blocks) > 1:  # (exact mode's store layout encodes them all)
                with naming_records(job.train):  # every block fits the context before the first is computed
                    for b in blocks:
                        encode_train(lm, b, job.config)
        with naming_records(job.train):
            tick = progress_factory(f"{s.ckpt.name} [{s.block + 1}/{len(blocks)}]", len(block)) \
                if progress_factory else None
            ft = _train_features(lm, block, job, s.ckpt, tick) if job.config.mode == "projected" else None
            df = side.table(block, s.ckpt.name, s.ckpt.step, tick, train_features=ft)
            tokens = side.token_table(block, s.ckpt.name, s.ckpt.step) if job.config.per_token else None
        timings["compute"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        if tokens is not None:
            with atomic_path(s.tokens_path) as tmp:
                tokens.to_parquet(tmp, index=False)
        with atomic_path(s.path) as tmp:
            df.to_parquet(tmp, index=False)
        timings["write"] += time.perf_counter() - t0
    return timings


def _train_features(lm: LoadedModel, block: list[dict], job: InfluenceRun, ck,
                    tick: Callable[[int], None] | None) -> Tensor:
    """Projected features of one block's training samples, stored once in the features folder and reused by
    any run whose checkpoint, samples (ids and contents, images' bytes too) and feature options are the same."""
    cfg = job.config
    store = Path(job.features_dir) if job.features_dir else Path(job.out) / "features"
    make_folder(store)
    samples = [[r["id"], r["prompt"], r.get("completion"), r.get("images")] for r in block]
    fkey = text_hash(json.dumps([fingerprint(ck.spec), samples, image_digests(block), cfg.params, cfg.reduce,
                                 cfg.tokens, cfg.projection, cfg.proj_dim, cfg.proj_seed, cfg.dtype, cfg.products],
                                default=str), 12)
    path = store / f"train-{fkey}.pt"
    if path.exists():
        if tick:
            tick(len(block))
        return torch.load(path)["features"]
    ft = features(lm, encode_train(lm, block, cfg), cfg, tick)
    with atomic_path(path) as tmp:
        torch.save({"ids": [r["id"] for r in block], "features": ft, "ckpt": ck.spec, "config": asdict(cfg)}, tmp)
    return ft


def merge(job: InfluenceRun, timings: dict[str, float] | None = None) -> Path:
    """Concatenate every shard into OUT/influence.parquet (+ tokens), run the optional one-step check, and
    write OUT/manifest.json."""
    from dynamics.models import load_model

    train, probes, ckpts, _, shards, hashes = _inputs(job)
    out = Path(job.out)
    missing = [s.path for s in shards if not s.path.exists()]
    if missing:
        raise DynamicsError(f"{len(missing)} shards are missing; rerun with --resume", file=missing[0])
    timings = dict(timings or {})
    t0 = time.perf_counter()
    try:  # one shard in memory at a time
        concat_parquet([s.path for s in shards], out / "influence.parquet")
        if job.config.per_token:
            concat_parquet([s.tokens_path for s in shards], out / "influence_tokens.parquet")
    except DynamicsError as e:  # a damaged shard: computed again once deleted
        raise DynamicsError(f"{e.message}; delete it and rerun with --resume", file=e.file) from None
    timings["write"] = timings.get("write", 0.0) + time.perf_counter() - t0
    extra = {}
    if job.predict_check:
        last = ckpts[-1]
        lm = load_model(last.spec, dtype=job.config.dtype, device=job.config.device)
        res = one_step(lm, train[: job.predict_check], probes, job.config, lr=job.lr)
        res.table.insert(0, "ckpt", last.name)
        with atomic_path(out / "predict_check.parquet") as tmp:
            res.table.to_parquet(tmp, index=False)
        extra["predict_check"] = {"ckpt": last.name, "samples": job.predict_check, "lr": job.lr,
                                  "pearson": res.pearson, "spearman": res.spearman}
    write_json(out / "manifest.json", {
        "format": 1,
        "command": "influence",
        "key": _key(job, hashes),
        "ckpts": [{"spec": c.spec, "step": c.step, "name": c.name} for c in ckpts],
        "train": str(Path(job.train).resolve()),
        "train_sha256": hashes[0],
        "probes": str(Path(job.probes).resolve()),
        "probes_sha256": hashes[1],
        "n_train": len(train),
        "n_probes": len(probes),
        "options": {**asdict(job.config), "shard_size": job.shard_size},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "versions": versions(),
        **extra,
    })
    return out / "influence.parquet"


def run(job: InfluenceRun, progress_factory: Callable[[str, int], Callable[[int], None]] | None = None) -> Path:
    """Single process: compute every shard, then merge."""
    t0 = time.perf_counter()
    prepare_out(job)
    timings = compute_shards(job, progress_factory=progress_factory)
    timings["total"] = time.perf_counter() - t0
    return merge(job, timings)


def run_job(job: InfluenceRun, launcher: str = "none", nproc: int = 2) -> Path | None:
    """The ``dynamics influence`` entry: with progress bars, under torchrun when launched so (each rank
    computes its shards; rank 0 merges), or relaunched on ``nproc`` processes with ``launcher="torchrun"``."""
    from dynamics import distributed

    job.validate()
    if launcher not in ("none", "torchrun"):
        raise DynamicsError(f"launcher must be none or torchrun, got {launcher!r}", field="launcher")
    if launcher == "torchrun":  # this process prepares OUT; the ranks continue into it
        prepare_out(job)
        distributed.relaunch(replace(job, resume=True, overwrite=False), nproc)
        return Path(job.out) / "influence.parquet"
    rank, world = distributed.init(job.config.device)
    if world > 1 and job.config.device.startswith("cuda"):
        job.config.device = f"cuda:{distributed.local_rank()}"
    t0 = time.perf_counter()
    prepare_out(job, delete=rank == 0)  # every rank finds the same mistake, so each reports it and none waits
    distributed.barrier()
    with distributed.progress(enabled=rank == 0) as factory:
        timings = compute_shards(job, rank, world, factory)
    distributed.barrier()
    path = None
    if rank == 0:
        timings["total"] = time.perf_counter() - t0
        path = merge(job, timings)
    distributed.barrier()
    distributed.shutdown()
    return path


def report(path: str | os.PathLike) -> object:
    """A rich renderable summarising an influence table (per checkpoint, plus harmful/helpful samples)."""
    from rich.console import Group
    from rich.table import Table

    from dynamics.analyses.loader import per_train_sample_of_file

    summary = summarise(per_train_sample_of_file(path))  # read in batches: the table may not fit in memory
    table = Table(title=f"influence: {path}")
    for col in ("checkpoint", "step", "mean |K|", "mean cosine", "mean ‖g(train)‖"):
        table.add_column(col, justify="right" if col != "checkpoint" else "left")
    parts: list = [table]
    for ckpt, s in summary.items():
        table.add_row(ckpt, str(s["step"]), f"{s['mean_abs_kernel']:.4g}", f"{s['mean_cosine']:+.4f}",
                      f"{s['mean_train_norm']:.4g}")
    last_ckpt, last = list(summary.items())[-1]
    for label, title in (("harmful", "lowest mean K: harmful if < 0"), ("helpful", "highest mean K: helpful if > 0")):
        t = Table(title=title, caption=f"at {last_ckpt}")
        t.add_column("train_id")
        t.add_column("mean K", justify="right")
        t.add_column("mean cosine", justify="right")
        for r in last[label]:
            t.add_row(str(r["train_id"]), f"{r['kernel']:.4g}", f"{r['cosine']:+.4f}")
        parts.append(t)
    return Group(*parts)


def summarise(per_sample: pd.DataFrame, top: int = 5) -> dict:
    """Per checkpoint, in step order, from its :func:`~dynamics.analyses.loader.per_train_sample` rows: mean |K|
    and mean cosine over every (train, probe) pair, mean train norm; the most harmful and helpful samples (by mean
    kernel over probes: negative means learning the sample lowers the probes' log-likelihood)."""
    out = {}
    for (step, ckpt), g in per_sample.groupby(["step", "ckpt"], sort=True):
        ranked = g.set_index("train_id").rename(columns={"mean_kernel": "kernel", "mean_cosine": "cosine"})
        ranked = ranked[["kernel", "cosine"]]
        out[ckpt] = {
            "step": int(step),
            "mean_abs_kernel": float(np.average(g["mean_abs_kernel"], weights=g["n_probes"])),
            "mean_cosine": float(np.average(g["mean_cosine"], weights=g["n_probes"])),
            "mean_train_norm": float(g["train_norm"].mean()),
            "harmful": ranked.nsmallest(top, "kernel").reset_index().to_dict("records"),
            "helpful": ranked.nlargest(top, "kernel").reset_index().to_dict("records"),
        }
    return out

"""Per-sample gradients in compact form, and exact inner products between them.

For one sample with per-token log-likelihood weights w_t (completion tokens), let ℓ = Σ_t w_t log p(y_t | y_<t, x)
and g = ∇_θ ℓ. Autograd's backward of Σ_b ℓ_b gives, at the output of every layer, the rows of *each sample
separately* (samples never mix in a causal LM), so per-sample gradients can be read off layer by layer:

* linear layer y = W a (+ b) used at positions t = 1..T:  G_W = Σ_t δ_t a_tᵀ = Δᵀ A,  G_b = Σ_t δ_t
  with A (T × d_in) the inputs and Δ (T × d_out) the output gradients;
* embedding E[x_t] at positions t:  G_E = Σ_t e_{x_t} δ_tᵀ  (Δ rows scattered to token rows; the padding_idx row
  gets none), i.e. the same form with a one-hot factor;
* element-wise scales (RMSNorm / LayerNorm weights) y_t = w ∘ n(x_t) (+ b):  G_w = Σ_t δ_t ∘ ∂y_t/∂w, with
  ∂y_t/∂w read by a forward-mode JVP of the module, so every norm variant is exact;
* anything else: one autograd call per sample for those parameters only (exact, slower).

A gradient of the form Σ_t u_t v_tᵀ is a :class:`LowRank` term. Inner products of two such terms never build
the d_out × d_in matrices ("ghost" inner product):

    ⟨Δ_iᵀ A_i, Δ_jᵀ A_j⟩ = Σ_{t,s} (A_i A_jᵀ)_{ts} (Δ_i Δ_jᵀ)_{ts}        cost T_i T_j (d_in + d_out)

while materialising G = Δᵀ A costs T d_in d_out once per sample plus d_in d_out per pair. The choice between
the two is made per parameter from the total cost (see :func:`plan_forms`). One-hot factors (token ids) make
the Gram matrices index look-ups, which is how tied embeddings and lm_heads get their cross terms.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dynamics.errors import DynamicsError


# ------------------------------------------------------------------------------------------ factor algebra
@dataclass
class Factor:
    """One side of Σ_t u_t v_tᵀ for a batch: dense rows ``(B, T, d)`` or token ids ``(B, T)`` standing for
    one-hot rows of width ``d`` (id ``-1`` marks an empty row)."""

    dense: Tensor | None = None
    ids: Tensor | None = None
    width: int = 0

    @property
    def batch(self) -> int:
        return (self.dense if self.dense is not None else self.ids).shape[0]

    @property
    def length(self) -> int:
        return (self.dense if self.dense is not None else self.ids).shape[1]

    @property
    def cost_width(self) -> int:
        """Work per row pair of a Gram against this side: its width when dense, 1 for token ids (a look-up)."""
        return self.dense.shape[-1] if self.dense is not None else 1

    def select(self, index: Tensor | slice) -> Factor:
        return Factor(None if self.dense is None else self.dense[index],
                      None if self.ids is None else self.ids[index], self.width)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        if self.dense is not None:
            return self.dense
        onehot = torch.zeros(*self.ids.shape, self.width + 1, dtype=dtype, device=self.ids.device)
        onehot.scatter_(-1, self.ids.remainder(self.width + 1).unsqueeze(-1), 1.0)  # id -1 -> dropped column
        return onehot[..., : self.width]


def gram(f: Factor, g: Factor) -> Tensor:
    """All row inner products ⟨f[b,t], g[c,s]⟩ as a ``(B_f, B_g, T_f, T_g)`` tensor."""
    if f.dense is not None and g.dense is not None:
        return torch.einsum("btd,csd->bcts", f.dense, g.dense)
    if f.dense is None and g.dense is None:  # a boolean Gram; it promotes to the other Gram's dtype
        return (f.ids[:, None, :, None] == g.ids[None, :, None, :]) & (f.ids >= 0)[:, None, :, None]
    if f.dense is None:
        return gram(g, f).permute(1, 0, 3, 2)
    # dense f, ids g: f.dense[b, t, g.ids[c, s]]
    ids = g.ids.clamp(min=0)
    picked = f.dense[:, :, ids.reshape(-1)]  # (B_f, T_f, B_g*T_g)
    picked = picked.reshape(f.batch, f.length, g.batch, g.length).permute(0, 2, 1, 3)
    return picked * (g.ids >= 0)[None, :, None, :]


def diag_cross_gram(f: Factor, g: Factor) -> Tensor:
    """Per-sample Gram ``(B, T_f, T_g)`` between two factors of the same batch."""
    if f.dense is not None and g.dense is not None:
        return torch.einsum("btd,bsd->bts", f.dense, g.dense)
    full = gram(f, g)
    idx = torch.arange(f.batch, device=full.device)
    return full[idx, idx]


@dataclass
class LowRank:
    """Per-sample gradients G_b = Σ_t out[b,t] ⊗ inp[b,t] of one parameter use (``out`` indexes the
    parameter's first dimension, ``inp`` the flattened rest)."""

    out: Factor
    inp: Factor

    @property
    def batch(self) -> int:
        return self.out.batch

    def select(self, index: Tensor | slice) -> LowRank:
        return LowRank(self.out.select(index), self.inp.select(index))

    def shape(self) -> tuple[int, int, int]:
        """(T, w_out, w_in): rows, and each side's width as it costs work (1 for a one-hot side)."""
        return self.inp.length, self.out.cost_width, self.inp.cost_width

    def to_dense(self, out: Tensor | None = None) -> Tensor:
        """Materialise ``(B, d_out * d_in)`` (into ``out`` when given); a one-hot side scatters the other side's
        rows (no one-hot product)."""
        if out is not None:
            if self.out.dense is None or self.inp.dense is None:
                return out.copy_(self.to_dense())
            o, i = self.out.dense, self.inp.dense
            torch.bmm(o.transpose(1, 2), i, out=out.view(self.batch, o.shape[-1], i.shape[-1]))
            return out
        if self.out.ids is not None and self.inp.dense is not None:
            (B, T, d), ids = self.inp.dense.shape, self.out.ids
            out = self.inp.dense.new_zeros(B, self.out.width, d)
            rows = self.inp.dense * (ids >= 0).unsqueeze(-1)
            return out.scatter_add_(1, ids.clamp(min=0).unsqueeze(-1).expand(B, T, d), rows).reshape(B, -1)
        dtype = (self.out.dense if self.out.dense is not None else self.inp.dense).dtype
        out, inp = self.out.to_dense(dtype), self.inp.to_dense(dtype)
        return torch.bmm(out.transpose(1, 2), inp).reshape(self.batch, -1)  # (einsum may pick a slower order)


def lowrank_inner(a: LowRank, b: LowRank) -> Tensor:
    """⟨G_a[i], G_b[j]⟩ for all pairs, ``(B_a, B_b)``: Σ_{t,s} gram(out)_{ts} gram(in)_{ts}."""
    return (gram(a.out, b.out) * gram(a.inp, b.inp)).sum((-1, -2))


def lowrank_cross_diag(a: LowRank, b: LowRank) -> Tensor:
    """⟨G_a[i], G_b[i]⟩ for each sample i of one batch, ``(B,)``."""
    return (diag_cross_gram(a.out, b.out) * diag_cross_gram(a.inp, b.inp)).sum((-1, -2))


def stacked_inner(out_a: Tensor, inp_a: Tensor, out_b: Tensor, inp_b: Tensor) -> Tensor:
    """Σ_l ⟨G_a,l[i], G_b,l[j]⟩ over L layers of one shape, ``(B_a, B_b)``, from factors stacked ``(L, B, T, d)``:
    :func:`lowrank_inner` of every layer at once, two batched GEMMs in all instead of two per layer."""
    (L, B, T, _), (_, P, S, _) = out_a.shape, out_b.shape
    go = torch.bmm(out_a.reshape(L, B * T, -1), out_b.reshape(L, P * S, -1).transpose(1, 2))
    gi = torch.bmm(inp_a.reshape(L, B * T, -1), inp_b.reshape(L, P * S, -1).transpose(1, 2))
    return go.mul_(gi).view(L, B, T, P, S).sum((0, 2, 4))


def stacked_self_inner(out: Tensor, inp: Tensor) -> Tensor:
    """Σ_l ‖G_l[i]‖² over L layers of one shape, ``(B,)``, from factors stacked ``(L, B, T, d)``."""
    L, B, T, _ = out.shape
    go = torch.bmm(out.reshape(L * B, T, -1), out.reshape(L * B, T, -1).transpose(1, 2))
    gi = torch.bmm(inp.reshape(L * B, T, -1), inp.reshape(L * B, T, -1).transpose(1, 2))
    return go.mul_(gi).view(L, B, T * T).sum((0, 2))


# ---------------------------------------------------------------------------------- per-parameter gradients
@dataclass
class ParamGrad:
    """The per-sample gradient of one parameter for a batch: a sum of low-rank terms (one per use of the
    parameter) plus, optionally, a dense ``(B, n)`` part."""

    terms: list[LowRank] = field(default_factory=list)
    dense: Tensor | None = None
    segment: int = 0  # which forward of the batch these rows come from (see Recorder.capture)

    def select(self, index: Tensor | slice) -> ParamGrad:
        return ParamGrad([t.select(index) for t in self.terms], None if self.dense is None else self.dense[index],
                         self.segment)

    @property
    def dtype(self) -> torch.dtype:
        if self.dense is not None:
            return self.dense.dtype
        t = self.terms[0]
        return (t.out.dense if t.out.dense is not None else t.inp.dense).dtype

    def materialise(self, out: Tensor | None = None) -> Tensor:
        """``(B, n)``: the dense part plus every low-rank term built out (written into ``out`` when given)."""
        if out is not None:
            return self.terms[0].to_dense(out) if self.dense is None and len(self.terms) == 1 else out.copy_(
                self.materialise())
        total = self.dense
        for t in self.terms:
            total = t.to_dense() if total is None else total + t.to_dense()
        return total


def inner(a: ParamGrad, b: ParamGrad) -> Tensor:
    """⟨g_a[i], g_b[j]⟩ for every pair, ``(B_a, B_b)``, summing every term pair (tied-weight cross terms
    included)."""
    if a.dense is not None and b.dense is not None and not a.terms and not b.terms:
        return rows_inner(a.dense, b.dense)
    if (a.dense is not None or b.dense is not None) and (a.terms or b.terms):
        return rows_inner(a.materialise(), b.materialise())
    total = None
    for ta in a.terms:
        for tb in b.terms:
            k = lowrank_inner(ta, tb)
            total = k if total is None else total + k
    return total


def rows_inner(a: Tensor, b: Tensor) -> Tensor:
    """``a @ bᵀ`` for a few long rows, ``(M, n)`` and ``(N, n)`` with n ≫ M, N (per-sample gradients against
    stored probes). The CPU's BLAS splits such a product over M and N only, so it runs on one thread: float rows
    are cut along n into one chunk per thread, multiplied as a batch and summed (SmolLM2's 210 linear layers, 9
    rows against 32 in fp32 on 2 cores: 1.2 s against 2.1 s). bf16 products (whose batched GEMM is 8x slower here)
    and other devices take the plain product."""
    c, n = torch.get_num_threads(), a.shape[1]
    if (a.device.type != "cpu" or a.dtype not in (torch.float32, torch.float64) or c < 2 or n < 4096 * c
            or a.stride(-1) != 1 or b.stride(-1) != 1):
        return a @ b.T
    m = n // c
    out = torch.bmm(a[:, : c * m].view(-1, c, m).transpose(0, 1), b[:, : c * m].view(-1, c, m).permute(1, 2, 0))
    return out.sum(0) if c * m == n else out.sum(0) + a[:, c * m:] @ b[:, c * m:].T


ROW_CHUNK = 1 << 16  # columns per chunk of row_sq_norms on the CPU


def row_sq_norms(m: Tensor) -> Tensor:
    """‖m[b]‖² for every row of ``(B, n)``: ``(m * m).sum(-1)``, on the CPU over chunks of 64K columns. Squaring a
    whole layer's rows at once made a temporary as large as ``m`` (28 MB for 8 rows of a 576 × 1536 layer), which
    took 2.5-15 ms a call with thousands of page faults, where the chunks (a temporary that stays in cache) take
    about 1 ms, with the same error. ``torch.linalg.vecdot`` took 2-3 ms. (bf16 rows, half the bytes, were faster
    whole: 0.8 ms against 1.4.)"""
    if m.device.type != "cpu" or m.dtype.itemsize < 4 or m.shape[-1] <= ROW_CHUNK:
        return (m * m).sum(-1)
    out = None
    for part in m.split(ROW_CHUNK, dim=-1):
        sq = (part * part).sum(-1)
        out = sq if out is None else out.add_(sq)
    return out


def self_inner(a: ParamGrad) -> Tensor:
    """‖g[i]‖² for each sample, ``(B,)``."""
    if a.dense is not None:
        m = a.materialise()
        return row_sq_norms(m)
    total = 0
    for i, ta in enumerate(a.terms):
        for j, tb in enumerate(a.terms):
            if j < i:
                continue
            k = lowrank_cross_diag(ta, tb)
            total = total + (k if i == j else 2 * k)
    return total


# ----------------------------------------------------------------------------------------------- scopes
SCOPES = ("linear", "all", "lora")


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def scope_parameters(model: nn.Module, scope: str) -> dict[str, nn.Parameter]:
    """The parameters a scope names, by canonical (first) name; tied parameters appear once.

    ``linear``: weights and biases of linear layers (for a tied lm_head, only its use as lm_head counts: the
    embedding lookup's share of that tensor belongs to ``all``); ``all``: every trainable parameter;
    ``lora``: peft adapter weights; anything else: a regular expression over parameter names.
    """
    named = dict(model.named_parameters())
    if scope == "all":
        return {n: p for n, p in named.items() if p.requires_grad or not _any_trainable(model)}
    if scope == "lora":
        out = {n: p for n, p in named.items() if "lora_" in n}
        if not out:
            raise DynamicsError("scope 'lora' but the model has no LoRA adapter parameters", field="params")
        return out
    if scope == "linear":
        ids = {id(p) for m in model.modules() if _is_linear(m) for p in m.parameters(recurse=False)}
        return {n: p for n, p in named.items() if id(p) in ids}
    try:
        rx = re.compile(scope)
    except re.error as e:
        raise DynamicsError(f"not a scope ({', '.join(SCOPES)}) nor a valid regex: {e}", field="params") from None
    out = {n: p for n, p in named.items() if rx.search(n)}
    if not out:
        raise DynamicsError(f"no parameter name matches {scope!r}", field="params")
    return out


def _any_trainable(model: nn.Module) -> bool:
    return any(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------------------------ sites
@dataclass
class Use:
    """One module's use of one parameter (``role`` is the attribute name, e.g. ``weight``)."""

    module: nn.Module
    module_name: str
    role: str
    kind: str  # linear | conv1d | patch | embedding | elementwise | bias | other


def _use_kind(module: nn.Module, role: str, param: nn.Parameter) -> str:
    from transformers.pytorch_utils import Conv1D

    if role == "bias" and isinstance(module, (nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "bias"
    if role == "weight":
        if isinstance(module, nn.Linear):
            return "linear"
        if isinstance(module, Conv1D):
            return "conv1d"
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == 1:
            return "patch"
        if isinstance(module, nn.Embedding):
            return "embedding"
    if param.dim() == 1 and "norm" in type(module).__name__.lower():
        return "elementwise"
    return "other"


def parameter_uses(model: nn.Module, params: dict[str, nn.Parameter], scope: str) -> dict[str, list[Use]]:
    """Every module use of every scoped parameter (a tied weight has several uses; in the ``linear`` scope
    only its linear uses count)."""
    by_id = {id(p): n for n, p in params.items()}
    uses: dict[str, list[Use]] = defaultdict(list)
    for mname, module in model.named_modules():
        for role, p in module._parameters.items():
            if p is None or id(p) not in by_id:
                continue
            kind = _use_kind(module, role, p)
            if scope == "linear" and kind not in ("linear", "conv1d", "bias"):
                continue
            uses[by_id[id(p)]].append(Use(module, mname, role, kind))
    return dict(uses)


class _LinearWithoutWeightGrad(torch.autograd.Function):
    """``F.linear`` whose backward forms ∂L/∂x and ∂L/∂b but leaves ∂L/∂W to the caller: a caller that
    materialises the per-sample gradients G_b = Δ_bᵀ A_b anyway gets ∂L/∂W = Σ_b G_b for a sum, instead of
    autograd's own GEMM over all B·T rows (a third of a training step's flops)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.has_bias = bias is not None
        return nn.functional.linear(x, weight, bias)  # under autocast: in its dtype, as nn.Linear would

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        (weight,) = ctx.saved_tensors
        dx = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
        db = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, None, db


def owns_weight_grad(use: Use) -> bool:
    """Can :meth:`Recorder.capture` leave this use's weight gradient to its caller (a plain ``nn.Linear``)?"""
    return use.kind == "linear" and use.role == "weight" and type(use.module).forward is nn.Linear.forward


# ---------------------------------------------------------------------------------------- batch layout
@dataclass
class Layout:
    """How rows of a module's input map to samples: ``(B, T, ...)`` tensors map by their first dimension;
    flat ``(R, d)`` tensors (a vision tower's patches) are split in proportion to each sample's patch count."""

    batch: int
    patch_counts: list[int] | None = None

    def to_rows(self, x: Tensor) -> Tensor:
        """``(B, T, d)`` view of a captured tensor (zero-padded when samples have unequal row counts)."""
        if x.dim() >= 3 and x.shape[0] == self.batch:
            return x.reshape(self.batch, -1, x.shape[-1])
        flat = x.reshape(x.shape[0], -1)
        counts = self._split(flat.shape[0])
        width = max(counts) if counts else 0
        out = flat.new_zeros(self.batch, width, flat.shape[1])
        start = 0
        for b, n in enumerate(counts):
            out[b, :n] = flat[start:start + n]
            start += n
        return out

    def _split(self, rows: int) -> list[int]:
        if rows == self.batch and not self.patch_counts:  # one row per sample, e.g. a pooled head
            return [1] * rows
        counts = self.patch_counts or []
        total = sum(counts)
        if not total or any((rows * c) % total for c in counts):
            raise RuntimeError(f"cannot map {rows} rows onto {self.batch} samples with patches {counts}")
        return [rows * c // total for c in counts]


# ------------------------------------------------------------------------------------------- recorder
class Recorder:
    """Hooks that capture per-sample gradients of scoped parameters during one forward/backward.

    Usage::

        rec = Recorder(model, scope="linear")
        with rec.capture(layout, on_param):     # on_param(name, ParamGrad) is called as each completes
            loss_per_sample = objective(model, batch)
            rec.backward(loss_per_sample)

    Parameters keep ``requires_grad=False`` inside ``capture`` (no weight gradients are ever formed); the
    backward runs through activations only, and each site's output gradient Δ is read by a tensor hook.
    """

    def __init__(self, model: nn.Module, scope: str = "linear", dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.scope = scope
        self.params = scope_parameters(model, scope)
        self.uses = parameter_uses(model, self.params, scope)
        self.dtype = dtype  # products in this dtype (e.g. fp32 for a bf16 model); None: the model's
        missing = [n for n in self.params if n not in self.uses]
        self.unused = missing  # parameters with no module use (kept at zero gradient)
        self.fallback = [n for n, us in self.uses.items() if any(u.kind == "other" for u in us)]
        self._handles: list = []
        self._pending: dict[tuple[str, int], int] = defaultdict(int)
        self._parts: dict[tuple[str, int], list] = defaultdict(list)
        self._leaves: list[Tensor] = []
        self._reentrant = False
        self.passive = False

    @property
    def device(self) -> torch.device:
        """Where the scoped parameters, and so their per-sample gradients, live."""
        return next(iter(self.params.values())).device

    # -- sizes for the cost model -------------------------------------------------------------------
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in self.params.items()}

    # -- capture ----------------------------------------------------------------------------------------
    def capture(self, layout: Layout | None, on_param: Callable[[str, ParamGrad], None], passive: bool = False,
                on_forward: Callable[[int, dict], Layout] | None = None, temperature: float = 1.0,
                own: Iterable[str] = ()) -> Recorder:
        """Arm the hooks for a ``with`` block.

        Active (default): the caller runs one forward and :meth:`backward`; parameters are frozen meanwhile.
        Passive: someone else (a trainer) runs forwards and backwards with their own loss; every forward of the
        model with gradients enabled opens a *segment*, ``on_forward(segment, kwargs)`` returns its
        :class:`Layout`, and each parameter's per-sample gradient of that loss is emitted with ``pg.segment``.
        Forwards with TRL's fused LM head (``fused_lm_head=True``: no logits, no call of the head module) get the
        head's per-sample gradient rebuilt from the backbone's hidden states and ∂L/∂log p of each label token
        (``temperature`` is the one the trainer divides logits by).
        ``own`` (passive only): weights (single plain-linear uses, :func:`owns_weight_grad`) whose ``.grad`` the
        caller forms from the emitted per-sample gradients; autograd's backward skips their weight gradient.
        """
        self.layout = layout
        self.temperature = temperature
        self.on_param = on_param
        self.passive = passive
        self.on_forward = on_forward
        self.own = list(own)
        if self.own and not passive:
            raise AssertionError("only a passive capture leaves weight gradients to its caller")
        return self

    def __enter__(self) -> Recorder:
        self._saved_flags = {id(p): p.requires_grad for p in self.model.parameters()}
        if not self.passive:
            fallback_ids = {id(self.params[n]) for n in self.fallback}
            for p in self.model.parameters():
                p.requires_grad_(id(p) in fallback_ids)
        elif self.fallback:
            raise DynamicsError(f"parameters of unsupported modules in scope: {', '.join(self.fallback[:3])}; "
                                "choose a narrower --params", field="params")
        self._parts = defaultdict(list)
        self._pending = defaultdict(int)
        self._leaves = []
        self._segment = 0
        self._layouts = {0: self.layout}
        self._module_uses: dict[int, list[tuple[str, Use]]] = defaultdict(list)
        for name, uses in self.uses.items():
            for u in uses:
                if u.kind != "other":
                    self._module_uses[id(u.module)].append((name, u))
        hooked = {id(u.module): u.module for us in self.uses.values() for u in us if u.kind != "other"}
        for module in hooked.values():
            self._handles.append(module.register_forward_hook(self._forward_hook))
        if self.passive:
            self._handles.append(self.model.register_forward_pre_hook(self._root_hook, with_kwargs=True))
            head = output_head(self.model)
            self._head = head
            self._head_uses = self._module_uses.get(id(head), []) if head is not None else []
            self._fused: dict[int, dict] = {}
            if self._head_uses:
                hf = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
                self._handles.append(hf.base_model.register_forward_hook(self._backbone_hook))
                self._handles.append(self.model.register_forward_hook(self._root_out_hook))
        self._owned_modules = []
        for name in self.own:
            (use,) = self.uses[name]
            assert owns_weight_grad(use), name
            m = use.module
            m.forward = lambda x, m=m: _LinearWithoutWeightGrad.apply(x, m.weight, m.bias)
            self._owned_modules.append(m)
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m in self._owned_modules:
            del m.forward  # back to nn.Linear.forward
        self._owned_modules = []
        if not self.passive:
            for p in self.model.parameters():
                p.requires_grad_(self._saved_flags[id(p)])
        self._leaves = []
        self._parts = defaultdict(list)
        self._pending = defaultdict(int)
        # the caller's callbacks hold its state (an influence run's probe store, GBs): a reference kept here would
        # make a cycle that only the garbage collector frees, so repeated runs would pile stores up until it ran
        self.on_param = self.on_forward = self.layout = None
        self._layouts = {}

    def _root_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled() and not self._reentrant:
            self._segment += 1
            self._layouts[self._segment] = self.on_forward(self._segment, kwargs)
            if kwargs.get("fused_lm_head") and self._head_uses:
                self._fused[self._segment] = {"labels": kwargs.get("labels"), "shift": kwargs.get("shift_labels")}
                for name, _ in self._head_uses:
                    self._pending[(name, self._segment)] += 1

    def _backbone_hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        info = self._fused.get(self._segment)
        if info is not None and "hidden" not in info and torch.is_grad_enabled():
            info["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def _root_out_hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        seg = self._segment
        if seg in self._fused and getattr(output, "log_probs", None) is not None and output.log_probs.requires_grad:
            output.log_probs.register_hook(lambda g, seg=seg: self._fused_head_grad(seg, g))

    def _fused_head_grad(self, seg: int, g: Tensor) -> None:
        """The output head's per-sample gradient under TRL's fused head: with y = s·head(h) the head's output,
        z = f(y)/τ the logits (f a soft-cap or the identity) and g_t = ∂L/∂log π(y_t), the head output's
        gradient is δ_t = g_t (e_{y_t} − π_t) ∘ f'(y_t) s/τ."""
        info = self._fused.pop(seg)
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        scale = getattr(cfg, "logit_scale", None) or 1.0
        cap = getattr(cfg, "final_logit_softcapping", None)
        with torch.no_grad():
            h, labels = info["hidden"].detach(), info["shift"] if info["shift"] is not None else info["labels"]
            if info["shift"] is None:
                h, labels = h[:, :-1], labels[:, 1:]
            g = g.detach()
            mask = labels != -100
            width = max(int(mask.sum(1).max()), 1)
            pos = torch.zeros(mask.shape[0], width, dtype=torch.long, device=h.device)
            valid = torch.zeros(mask.shape[0], width, dtype=torch.bool, device=h.device)
            for b in range(mask.shape[0]):
                idx = mask[b].nonzero().squeeze(1)
                pos[b, : len(idx)], valid[b, : len(idx)] = idx, True
            hs = h.gather(1, pos.unsqueeze(-1).expand(-1, -1, h.shape[-1])) * valid.unsqueeze(-1)
            self._reentrant = True
            try:
                y = self._head(hs).float() * scale
            finally:
                self._reentrant = False
            fprime = torch.ones_like(y) if not cap else 1 - torch.tanh(y / cap) ** 2
            z = (cap * torch.tanh(y / cap) if cap else y) / self.temperature
            delta = -torch.softmax(z, -1)
            delta.scatter_add_(-1, labels.gather(1, pos).clamp(min=0).unsqueeze(-1), torch.ones_like(delta[..., :1]))
            gz = (g.gather(1, pos) * valid).unsqueeze(-1).float()
            d_head = self._cast((gz * delta * fprime * (scale / self.temperature)).to(hs.dtype))
            hs = self._cast(hs)
            for name, use in self._head_uses:
                key = (name, seg)
                part = d_head.sum(1) if use.kind == "bias" else LowRank(Factor(d_head), Factor(hs))
                self._parts[key].append(part)
                self._pending[key] -= 1
                if self._pending[key] == 0:
                    self._emit(key)

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        if not isinstance(output, Tensor) or self._reentrant or not torch.is_grad_enabled():
            return None
        replaced = None
        if not output.requires_grad:
            if self.passive:
                return None
            output = output.detach().requires_grad_(True)
            self._leaves.append(output)
            replaced = output
        x, seg = inputs[0], self._segment
        for name, _ in self._module_uses[id(module)]:
            self._pending[(name, seg)] += 1
        output.register_hook(lambda g, m=module, x=x, seg=seg: self._grad_hook(m, x, g, seg))
        return replaced

    def _grad_hook(self, module: nn.Module, x: Tensor, grad: Tensor, seg: int) -> None:
        with torch.no_grad():
            x, grad = x.detach(), grad.detach()  # stored factors must not keep the autograd graph alive
            for name, use in self._module_uses[id(module)]:
                key = (name, seg)
                self._parts[key].append(self._per_sample(use, x, grad, self._layouts[seg]))
                self._pending[key] -= 1
                if self._pending[key] == 0:
                    self._emit(key)

    def _cast(self, t: Tensor) -> Tensor:
        return t if self.dtype is None else t.to(self.dtype)

    def _per_sample(self, use: Use, x: Tensor, grad: Tensor, L: Layout) -> LowRank | Tensor:
        """One call's per-sample gradient for one use: a LowRank term or a dense ``(B, n)`` tensor."""
        if use.kind in ("linear", "conv1d", "patch", "bias"):
            d_out = L.to_rows(self._cast(grad.reshape(grad.shape[0], -1) if use.kind == "patch" else grad))
            if use.kind == "bias":
                return d_out.sum(1)
            a = L.to_rows(self._cast(x.reshape(x.shape[0], -1) if use.kind == "patch" else x))
            if use.kind == "conv1d":  # weight is (d_in, d_out)
                return LowRank(Factor(a), Factor(d_out))
            return LowRank(Factor(d_out), Factor(a))
        if use.kind == "embedding":
            ids = L.to_rows(x.unsqueeze(-1)).squeeze(-1).long()
            d = L.to_rows(self._cast(grad))
            pad = use.module.padding_idx
            if pad is not None:
                ids = ids.masked_fill(ids == pad, -1)
            return LowRank(Factor(ids=ids, width=use.module.num_embeddings), Factor(d))
        if use.kind == "elementwise":
            return self._elementwise(use, x, grad, L)
        raise AssertionError(use.kind)

    def _elementwise(self, use: Use, x: Tensor, grad: Tensor, L: Layout) -> Tensor:
        """Σ_t δ_t ∘ ∂y_t/∂w for a module whose output channel k depends on w_k only (a norm's scale)."""
        dy = _norm_partial(use.module, use.role, x)
        if dy is None:
            dy = self._jvp_partial(use, x)
        return (L.to_rows(self._cast(grad)) * L.to_rows(self._cast(dy))).sum(1)

    def _jvp_partial(self, use: Use, x: Tensor) -> Tensor:
        """∂y/∂w by a forward-mode JVP of the module with tangent 1 for every w_k (any element-wise scale)."""
        from torch.func import functional_call, jvp

        module = use.module
        params = {k: v.detach() for k, v in module.named_parameters(recurse=False)}
        w = params[use.role]

        def f(v: Tensor) -> Tensor:
            return functional_call(module, {**params, use.role: v}, (x.detach(),))

        self._reentrant = True  # the module runs again: our own forward hook must not record it
        try:
            _, dy = jvp(f, (w,), (torch.ones_like(w),))
        finally:
            self._reentrant = False
        return dy

    def _emit(self, key: tuple[str, int]) -> None:
        parts = self._parts.pop(key)
        self._pending.pop(key, None)
        pg = ParamGrad(segment=key[1])
        for part in parts:
            if isinstance(part, LowRank):
                pg.terms.append(part)
            else:
                pg.dense = part if pg.dense is None else pg.dense + part
        self.on_param(key[0], pg)

    def flush(self) -> None:
        """Emit what is still held: uses whose output got no gradient, or whose other calls never ran."""
        for key in list(self._parts):
            self._emit(key)
        self._pending.clear()

    # -- backward ---------------------------------------------------------------------------------------
    def backward(self, per_sample: Tensor) -> None:
        """Backpropagate Σ_b per_sample[b]; emit every scoped parameter's per-sample gradient."""
        if self.fallback:
            fb = [self.params[n] for n in self.fallback]
            rows = [torch.autograd.grad(per_sample[b], fb, retain_graph=True, allow_unused=True)
                    for b in range(per_sample.shape[0])]
            for i, n in enumerate(self.fallback):
                dense = torch.stack([
                    (r[i] if r[i] is not None else torch.zeros_like(fb[i])).reshape(-1) for r in rows])
                self._parts[(n, 0)].append(self._cast(dense))
        leaves = [t for t in self._leaves if t.requires_grad]
        if leaves:
            torch.autograd.grad(per_sample.sum(), leaves, allow_unused=True)
        self.flush()
        B = self.layout.batch
        for name in self.params:
            if name in self.unused:
                p = self.params[name]
                self.on_param(name, ParamGrad(dense=self._cast(p.new_zeros(B, p.numel()))))


def apply_delta(pg: ParamGrad, delta: Tensor) -> Tensor:
    """⟨G_b, Δ⟩ for every sample b, ``(B,)``: the first-order change of each sample's objective when the
    parameter moves by Δ (shape of the parameter), without materialising G_b:
    ⟨Σ_t u_t v_tᵀ, Δ⟩ = Σ_t u_tᵀ Δ v_t."""
    total = None if pg.dense is None else pg.dense @ delta.reshape(-1).to(pg.dense.dtype)
    for t in pg.terms:
        D = delta.reshape(delta.shape[0], -1)
        rows = t.out.dense @ D.to(t.out.dense.dtype) if t.out.dense is not None else D[t.out.ids.clamp(min=0)] * (
            t.out.ids >= 0).unsqueeze(-1)
        inp = t.inp.to_dense(rows.dtype)
        v = (rows * inp).sum((1, 2))
        total = v if total is None else total + v
    return total


def _norm_partial(module: nn.Module, role: str, x: Tensor) -> Tensor | None:
    """∂y/∂w in closed form for the usual norms: RMSNorm y = w ∘ x̂ (or (1 + w) ∘ x̂), x̂ = x / √(mean x² + ε),
    cast to the input dtype as HF does; LayerNorm y = w ∘ (x − μ)/√(σ² + ε) + b. None for anything else."""
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm):
        if role == "bias":
            return torch.ones_like(x)
        return torch.nn.functional.layer_norm(x, module.normalized_shape, eps=module.eps)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if name.endswith("RMSNorm") and role == "weight" and eps is not None and x.shape[-1] == module.weight.shape[0]:
        xf = x.to(torch.float32)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return None


# --------------------------------------------------------------------------------------------- cost model
@dataclass
class FormPlan:
    """Per parameter: keep the probe side ``dense`` (materialised) or ``lowrank`` (ghost). ``dense_only``: the
    dense ones that every training batch contracts faster materialised, so the probes' low-rank terms need not be
    kept beside the store."""

    forms: dict[str, str]
    dense_bytes: int
    dense_only: frozenset[str] = frozenset()

    def dense(self, name: str) -> bool:
        return self.forms.get(name) == "dense"


LOWRANK_KINDS = frozenset({"linear", "conv1d", "patch", "embedding"})  # uses whose gradient is Σ_t u_t v_tᵀ

Shape = tuple[float, int, int]  # (T, w_out, w_in) of one term, as LowRank.shape


# Flop-equivalents per byte moved. On the 2-core CPU this was tuned on, the materialised contraction at 8 probes
# of 64 tokens ran about 2x slower than the ghost one at nearly equal flops (SmolLM2's layers), and at 32 probes
# × 43 tokens about 2x faster (the monitor's case, 1.8-2.9x per layer); 8 puts both on the measured side.
BYTE_COST = 8.0


def ghost_cost(train: list[Shape], probes: list[Shape], n_probes: int, element_bytes: int = 4) -> float:
    """Cost per training sample of the ghost inner products against every probe plus its own norm: each pair of
    terms costs T_a·T_b·(w_out + w_in) flops, the Gram of a one-hot side against any side counting 1 per entry,
    and moves its two T_a × T_b Grams and their product."""
    def pairs(xs: list[Shape], ys: list[Shape]) -> tuple[float, float]:
        flops = sum(ta * tb * (min(oa, ob) + min(ia, ib)) for ta, oa, ia in xs for tb, ob, ib in ys)
        return flops, 3 * element_bytes * sum(ta * tb for ta, _, _ in xs for tb, _, _ in ys)
    (f_p, b_p), (f_s, b_s) = pairs(train, probes), pairs(train, train)
    return n_probes * (f_p + BYTE_COST * b_p) + f_s + BYTE_COST * b_s


def build_cost(terms: list[Shape]) -> float:
    """Flops to materialise one sample's gradient: T·w_out·w_in per term (a one-hot side scatters its T rows)."""
    return sum(t * o * i for t, o, i in terms)


def dense_cost(train: list[Shape], n: int, n_probes: int, batch: int, element_bytes: int = 4) -> float:
    """Cost per training sample of the materialised contraction: build the gradient (n numbers), one product with
    the P stored probe rows, and the bytes: the gradient written, then read by the product and by its norm, plus
    its share of one read of the probe store per batch."""
    moved = element_bytes * (3 * n + n_probes * n / batch)
    return build_cost(train) + n_probes * n + BYTE_COST * moved


def plan_forms(
    recorder: Recorder,
    n_probes: int,
    probe_len: float,
    train_len: float,
    completion_len: tuple[float, float],
    budget_bytes: int,
    element_bytes: int = 4,
    force: str | None = None,
    batch_size: int = 8,
    free_build: Iterable[str] = (),
    shortest: tuple[float, float] | None = None,
) -> FormPlan:
    """Choose, per parameter, the cheaper way to take inner products against all probes, within memory.

    Per training sample, against P probes (T_p, T_u tokens), for a single linear use: ghost costs
    P·T_p·T_u·(d_in + d_out) (plus T_u²·(d_in + d_out) for the sample's own norm); materialised costs
    T_u·d_in·d_out to build G_u, then P·d_in·d_out for the dot products, and P·d_in·d_out·bytes of memory for
    the probe side. A parameter with several uses (a tied embedding and lm_head) sums these over its pairs of
    uses (:func:`ghost_cost`, :func:`build_cost`). Both costs count the bytes they move as well as their flops
    (:data:`BYTE_COST`): the materialised path writes and re-reads n numbers per sample and reads the store once per
    batch of ``batch_size``. Parameters are switched to materialised in order of saved work per byte of store while
    the budget lasts. Uses read only at completion positions (an lm_head) see the completion
    lengths. ``force`` ("ghost" or "dense") overrides the choice for every parameter whose uses are all low-rank.
    ``free_build``: parameters whose per-sample gradients are materialised in any case (the monitor forms their
    weight gradient from them instead of autograd), so their materialised path costs no build.
    ``shortest``: the shortest training sample's length and completion length, when all training samples are known;
    a dense parameter whose materialised contraction (store built) is cheaper even that short is ``dense_only``.
    The ratio of the two costs falls as the training length grows (dense is linear in T_u, ghost adds T_u²), so it is
    then cheaper for every batch.
    """
    free_build = set(free_build)
    forms: dict[str, str] = {}
    gains: list[tuple[float, int, str]] = []
    always_dense: set[str] = set()
    head_module = output_head(recorder.model)
    for name, uses in recorder.uses.items():
        kinds = {u.kind for u in uses}
        if not kinds <= LOWRANK_KINDS:
            forms[name] = "dense" if kinds <= {"bias", "elementwise", "other"} else "lowrank"
            continue
        p = recorder.params[name]
        n = p.numel()
        train, probes = [], []
        for u in uses:
            tp, tu = completion_len if u.module is head_module else (probe_len, train_len)
            w_out, w_in = (1, p.shape[1]) if u.kind == "embedding" else (p.shape[0], p[0].numel())
            train.append((tu, w_out, w_in))
            probes.append((tp, w_out, w_in))
        ghost = ghost_cost(train, probes, n_probes, element_bytes)
        dense = dense_cost(train, n, n_probes, batch_size, element_bytes) - (build_cost(train) if name in free_build
                                                                             else 0.0)
        forms[name] = "dense" if force == "dense" else "lowrank"
        if force is None and dense < ghost:
            mem = n_probes * n * element_bytes
            gains.append(((ghost - dense) / max(mem, 1), mem, name))
            short = ([(shortest[u.module is head_module], o, i) for u, (_, o, i) in zip(uses, train, strict=True)]
                     if shortest else [])
            if short and dense_cost(short, n, n_probes, batch_size, element_bytes) < ghost_cost(
                    short, probes, n_probes, element_bytes):
                always_dense.add(name)
    used = 0
    for _, mem, name in sorted(gains, reverse=True):
        if used + mem <= budget_bytes:
            forms[name] = "dense"
            used += mem
    return FormPlan(forms, used, frozenset(n for n in always_dense if forms[n] == "dense"))


def output_head(model: nn.Module) -> nn.Module | None:
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None


# -------------------------------------------------------------------------------------------- projections
def _gaussian(shape: tuple[int, ...], seed: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """N(0, 1) entries from ``seed``, drawn by ``device``'s own generator (a CPU draw of a GPU-sized projection
    would dominate the run); drawn in float32, so every dtype sees the same matrix on a given device type."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float32, device=device).to(dtype)


@dataclass
class Projector:
    """Random projections of per-sample gradients into k-dimensional features, φ(g) with E⟨φ(g),φ(h)⟩ = ⟨g,h⟩.

    ``kind="jl"`` (TRAK-style): φ(g) = R g, R ∈ ℝ^{k×n} i.i.d. N(0, 1/k) over the whole gradient (generated
    block by block from the seed, never stored); Var⟨φ(g),φ(h)⟩ ≤ 2‖g‖²‖h‖²/k, so cosine errors have standard
    deviation ≤ √(2/k).
    ``kind="kron"`` (LoGra-style): per low-rank parameter, φ(Δᵀ A) = (Δ P_out)ᵀ (A P_in) with Gaussian
    P_out ∈ ℝ^{d_out×k_o}, P_in ∈ ℝ^{d_in×k_i}, k_o·k_i ≈ k; built inside the hooks, never materialising G; a side
    no wider than its k is kept exactly (P = I). Var_l ≤ (2/k_o + 2/k_i + 4/(k_o k_i))‖G‖²‖H‖² (projected sides only).
    Dense parts (norms, biases) are kept exactly when they have at most k entries, else JL-projected.
    """

    kind: str = "kron"
    dim: int = 1024
    seed: int = 0
    _cache: dict = field(default_factory=dict)

    def features(self, names: Iterable[str], grads: dict[str, ParamGrad], shapes: dict[str, tuple]) -> Tensor:
        """Concatenated features ``(B, D)`` of a batch's per-parameter gradients (in ``names`` order)."""
        parts = []
        for i, name in enumerate(names):
            g = grads[name]
            if self.kind == "kron" and g.terms and g.dense is None:
                parts.append(self._kron(i, g, shapes[name]))
            else:
                parts.append(self._dense(i, g.materialise()))
        return torch.cat(parts, dim=1)

    def _kron(self, i: int, g: ParamGrad, shape: tuple) -> Tensor:
        d_out, d_in = shape[0], math.prod(shape[1:])
        k_o = max(1, min(d_out, round(math.sqrt(self.dim))))
        k_i = max(1, min(d_in, self.dim // k_o))
        ref = g.terms[0].inp.dense if g.terms[0].inp.dense is not None else g.terms[0].out.dense
        dtype, dev = ref.dtype, ref.device
        key = ("kron", i, dtype, dev)
        if key not in self._cache:  # a side no wider than its k is kept exactly (identity): no error there
            seed = self.seed * 1_000_003 + 2 * i
            p_out = None if k_o >= d_out else _gaussian((d_out, k_o), seed, dtype, dev) / math.sqrt(k_o)
            p_in = None if k_i >= d_in else _gaussian((d_in, k_i), seed + 1, dtype, dev) / math.sqrt(k_i)
            self._cache[key] = (p_out, p_in)
        p_out, p_in = self._cache[key]
        total = 0
        for t in g.terms:
            po = _project_factor(t.out, p_out, dtype)
            pi = _project_factor(t.inp, p_in, dtype)
            total = total + torch.einsum("bto,bti->boi", po, pi).reshape(po.shape[0], -1)
        return total

    def _dense(self, i: int, g: Tensor) -> Tensor:
        n = g.shape[1]
        k = self.dim
        if self.kind == "kron" and n <= k:
            return g
        out = g.new_zeros(g.shape[0], k)
        block = max(1, (1 << 25) // k)  # rows of R per draw: 128 MiB of float32
        cache = n * k * g.element_size() <= (1 << 28)  # keep R when it is small (256 MiB), else regenerate it
        for j, start in enumerate(range(0, n, block)):
            key = ("jl", i, j, g.dtype, g.device)
            r = self._cache.get(key)
            if r is None:
                r = _gaussian((min(block, n - start), k), self.seed * 1_000_003 + 7919 * (i + 1) + j, g.dtype, g.device)
                if cache:
                    self._cache[key] = r
            out += g[:, start:start + block] @ r
        return out / math.sqrt(k)


def _project_factor(f: Factor, proj: Tensor | None, dtype: torch.dtype) -> Tensor:
    if proj is None:
        return f.to_dense(dtype)
    if f.dense is not None:
        return f.dense @ proj
    rows = proj[f.ids.clamp(min=0)]
    return rows * (f.ids >= 0).unsqueeze(-1)

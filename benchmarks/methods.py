"""Ways of computing the train x probe gradient-kernel matrix K[u, o] = ⟨g(u), g(o)⟩, g = ∇_θ Σ_t log π(y_t | ·)
over completion tokens, all from the same encoded samples (:func:`dynamics.influence.encode_all`).

Every method returns K as a ``(N_train, P)`` float64 CPU tensor. The ones here need only the project's own
environment (dynamics, the naive loop, torch.func); :mod:`benchmarks.peers` holds the other libraries.

Parameter sets ("scopes"), each method's error is measured against ``dynamics`` exact on the same set:
``linear`` every ``nn.Linear`` weight as used by that module (a tied output head counts only as the head);
``all`` every parameter (tied weights once, both uses); ``body`` the linear weights outside the output head
(what bergson attributes over: it hooks ``model.base_model``).
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from unittest.mock import patch

import torch
from torch import Tensor

from dynamics import influence
from dynamics.data import Encoded, collate
from dynamics.gradients import scope_parameters
from dynamics.influence import InfluenceConfig, encode_all, features
from dynamics.models import LoadedModel


# ----------------------------------------------------------------------------------------------- helpers
@dataclass
class Inputs:
    """The same samples for every method: records (for helpers that encode themselves) and their encodings."""

    train_records: list[dict]
    probe_records: list[dict]
    train: list[Encoded]
    probes: list[Encoded]

    @classmethod
    def of(cls, lm: LoadedModel, train: list[dict], probes: list[dict]) -> Inputs:
        return cls(train, probes, encode_all(lm, train), encode_all(lm, probes))


def untied(lm: LoadedModel) -> LoadedModel:
    """A copy whose output head has its own weight, so a library that differentiates with respect to
    parameters gets the head's *use* alone (the ``linear`` scope of a tied model)."""
    out = copy.copy(lm)
    out.model = copy.deepcopy(lm.model)
    head = out.model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    return out


def body_scope(model: torch.nn.Module) -> str:
    """A ``params`` regex naming exactly the linear weights outside the output head."""
    head = model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    return "^(" + "|".join(re.escape(f"{n}.weight") for n in names) + ")$"


def resolve_scope(model: torch.nn.Module, scope: str) -> str:
    return body_scope(model) if scope == "body" else scope


def completion_logp(logits: Tensor, input_ids: Tensor, completion_mask: Tensor) -> Tensor:
    """Σ_t log π(y_t | y_<t, x) over completion tokens, per sample ``(B,)`` (log-softmax in fp32 or wider)."""
    logits = logits[:, :-1]
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    logp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None])[..., 0]
    return (logp * completion_mask[:, 1:].to(logp.dtype)).sum(1)


def chunks(items: Sequence[Encoded], size: int) -> list[list[Encoded]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def device_batch(items: Sequence[Encoded], lm: LoadedModel) -> dict[str, Tensor]:
    device = next(lm.model.parameters()).device
    return {k: v.to(device) for k, v in collate(items, lm.tokenizer.pad_token_id).items()}


def stream_kernel(flat_grads: Callable[[list[Encoded]], Tensor], inputs: Inputs, batch_size: int) -> Tensor:
    """K from materialised per-sample gradients: probe gradients kept ``(P, n)``, train ones streamed."""
    G_p = torch.cat([flat_grads(c) for c in chunks(inputs.probes, batch_size)])
    return torch.cat([(flat_grads(c) @ G_p.T).double().cpu() for c in chunks(inputs.train, batch_size)])


def relative_error(K: Tensor, ref: Tensor) -> dict[str, float]:
    """‖K − K_ref‖_F / ‖K_ref‖_F and max |K − K_ref| / max |K_ref|."""
    K, ref = K.detach().double(), ref.detach().double()
    diff = K - ref
    return {"rel_fro": float(diff.norm() / ref.norm()), "rel_max": float(diff.abs().max() / ref.abs().max())}


# ---------------------------------------------------------------------------------------------- methods
def dynamics_exact(lm: LoadedModel, inputs: Inputs, *, scope: str = "linear", batch_size: int = 8,
                   device: str = "cpu", contraction: str = "auto", products: str = "float32",
                   group_bytes: int | None = None, cudnn_attention: bool = False, **_: object) -> Tensor:
    """``dynamics`` exact mode: hooks, ghost or materialised contraction per layer and batch (``contraction``
    forces one, to check the planner's choice); ``products="model"`` keeps a bf16 model's products in bf16;
    ``group_bytes=1`` contracts ghost layers one at a time instead of in same-shape groups;
    ``cudnn_attention`` lets torch pick cuDNN attention again (as before commit e87623b), to time that choice."""
    cfg = InfluenceConfig(params=resolve_scope(lm.model, scope), batch_size=batch_size, target="gold",
                          device=device, contraction=contraction, products=products)
    attention = contextlib.nullcontext if cudnn_attention else influence._attention_without_cudnn
    with patch.object(influence, "GROUP_BYTES", group_bytes or influence.GROUP_BYTES), \
            patch.object(influence, "_attention_without_cudnn", attention):
        K, _, _ = influence.exact_kernel(lm, inputs.train, inputs.probes, cfg)
    return K


def dynamics_projected(lm: LoadedModel, inputs: Inputs, *, scope: str = "body",
                       projection: str = "kron", proj_dim: int = 1024, batch_size: int = 8, device: str = "cpu",
                       proj_seed: int = 0, **_: object) -> Tensor:
    """``dynamics`` projected mode: ⟨φ(u), φ(o)⟩ with Kronecker (per layer) or JL (whole gradient) features."""
    cfg = InfluenceConfig(params=resolve_scope(lm.model, scope), batch_size=batch_size, target="gold",
                          mode="projected", projection=projection, proj_dim=proj_dim, device=device,
                          proj_seed=proj_seed)
    return (features(lm, inputs.train, cfg) @ features(lm, inputs.probes, cfg).T).double()


def naive(lm: LoadedModel, inputs: Inputs, *, scope: str = "linear", **_: object) -> Tensor:
    """One backward per sample, flatten, dot (:func:`benchmarks.influence_core.naive_loop`)."""
    from benchmarks.influence_core import naive_loop

    lm = untied(lm) if scope == "linear" else lm
    _, K = naive_loop(lm, inputs.train_records, inputs.probe_records, resolve_scope(lm.model, scope))
    return K.double().cpu()


def torch_func(lm: LoadedModel, inputs: Inputs, *, scope: str = "linear",
               batch_size: int = 8, **_: object) -> Tensor:
    """``torch.func``: ``vmap(grad(f))`` over a chunk of samples with ``functional_call``, then dots.

    Samples are right-padded and the model is causal, so no attention mask is needed (padding follows every
    real token and the objective masks it out)."""
    from torch.func import functional_call, grad, vmap

    lm = untied(lm) if scope == "linear" else lm
    model = lm.model
    params = {n: p.detach() for n, p in scope_parameters(model, resolve_scope(model, scope)).items()}
    names = list(params)

    def objective(theta: dict[str, Tensor], ids: Tensor, comp: Tensor) -> Tensor:
        logits = functional_call(model, theta, (ids[None],), {"use_cache": False}).logits
        return completion_logp(logits, ids[None], comp[None])[0]

    per_sample = vmap(grad(objective), in_dims=(None, 0, 0))

    def flat(items: list[Encoded]) -> Tensor:
        b = device_batch(items, lm)
        g = per_sample(params, b["input_ids"], b["completion_mask"])
        return torch.cat([g[n].reshape(len(items), -1) for n in names], 1)

    return stream_kernel(flat, inputs, batch_size)


def floor(lm: LoadedModel, inputs: Inputs, *, batch_size: int = 8, **_: object) -> None:
    """One standard batched forward+backward over the same samples (loss over every completion token, weight
    gradients formed): :func:`benchmarks.influence_core.standard_forward_backward`."""
    from benchmarks.influence_core import standard_forward_backward

    standard_forward_backward(lm, inputs.train_records + inputs.probe_records, batch_size)

"""Brute-force reference for influence tests: one backward per sample, flatten, dot."""

from __future__ import annotations

import copy

import torch

from dynamics.data import collate, encode_record
from dynamics.gradients import scope_parameters


def untied_copy(lm):
    """A deep copy whose output head no longer shares its weight (so the lm_head *use* has its own grad)."""
    lm2 = copy.copy(lm)
    lm2.model = copy.deepcopy(lm.model)
    head = lm2.model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    return lm2


def reference_grads(lm, records, scope: str, reduce: str = "sum", completions=None) -> torch.Tensor:
    """(N, n) flattened per-sample gradients of Σ/mean log p(completion) w.r.t. the scope's parameters."""
    model = lm.model
    params = list(scope_parameters(model, scope).values())
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    rows = []
    try:
        for i, rec in enumerate(records):
            enc = encode_record(lm.processing_class, rec, completion=None if completions is None else completions[i])
            b = collate([enc], lm.tokenizer.pad_token_id)
            kw = {k: b[k] for k in ("pixel_values", "image_grid_thw") if k in b}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **kw).logits
            logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, b["input_ids"][:, 1:, None])[..., 0]
            mask = b["completion_mask"][:, 1:].to(logp.dtype)
            obj = (logp * mask).sum() / (mask.sum() if reduce == "mean" else 1)
            grads = torch.autograd.grad(obj, params, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                                   for g, p in zip(grads, params, strict=True)]))
    finally:
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
    return torch.stack(rows)

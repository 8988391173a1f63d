"""Batched generation of completions from records' prompts (images included for VLMs).

Prompts are encoded by the project's convention (:func:`dynamics.data.encode` with no completion, i.e. the
chat template with the generation prompt), sorted by length, left-padded into batches and decoded up to the
end-of-turn token. ``temperature == 0`` is greedy decoding; otherwise each prompt gets ``num_samples``
independent samples from ``softmax(logits / temperature)`` restricted to the top-``top_p`` nucleus, seeded by
``seed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from dynamics.data import Encoded, context_length, encode_record
from dynamics.models import LoadedModel


def encode_scored(lm: LoadedModel, records: Sequence[dict], new_tokens: int = 0,
                  completions: Sequence[list[dict] | str] | None = None,
                  completion_field: str | Sequence[str] = "completion") -> list[Encoded]:
    """Each record with its completion (or ``completions[i]``, which errors name by ``completion_field``, one
    for all or one per record), checked against the model's context: the prompt leaves ``new_tokens`` of it
    free to generate in, and the whole sequence fits. Log p and gradients score the whole, generation starts
    from its :meth:`~dynamics.data.Encoded.prompt`."""
    limit = context_length(lm.model)
    fields = [completion_field] * len(records) if isinstance(completion_field, str) else completion_field
    return [encode_record(lm.processing_class, rec, limit, None if completions is None else completions[i],
                          new_tokens, fields[i]) for i, rec in enumerate(records)]


def encode_prompts(lm: LoadedModel, records: Sequence[dict], new_tokens: int) -> list[Encoded]:
    """Each record's generation prompt alone, checked to leave ``new_tokens`` of the model's context to generate."""
    return encode_scored(lm, [{**r, "completion": None} for r in records], new_tokens)


def left_pad(items: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts into ``input_ids`` / ``attention_mask`` (+ concatenated image tensors)."""
    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(items), width), dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e.input_ids)
        ids[i, width - n:] = torch.tensor(e.input_ids)
        attn[i, width - n:] = 1
    batch = {"input_ids": ids, "attention_mask": attn}
    pix = [e.pixel_values for e in items if e.pixel_values is not None]
    if pix:
        batch["pixel_values"] = torch.cat(pix)
        batch["image_grid_thw"] = torch.cat([e.image_grid_thw for e in items if e.image_grid_thw is not None])
    return batch


@torch.no_grad()
def generate(
    lm: LoadedModel,
    records: Sequence[dict],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    prompts: Sequence[Encoded] | None = None,
) -> list[list[str]]:
    """Completion texts for each record's prompt: ``out[i]`` holds ``num_samples`` strings (1 when greedy).

    ``prompts``: the records' prompts already encoded and checked to leave ``max_new_tokens`` of the context
    free (:func:`encode_prompts`, or :meth:`~dynamics.data.Encoded.prompt` of such an encoding); by default
    they are encoded here. ``batch_size`` counts sequences. When sampling several completions of a text
    prompt, the prompt is run through the model once and its key/value cache repeated for the samples (same
    result, a fraction of the prefill cost)."""
    greedy = temperature == 0
    n_samples = 1 if greedy else num_samples
    tok = lm.tokenizer
    encoded = list(prompts) if prompts is not None else encode_prompts(lm, records, max_new_tokens)
    share = n_samples > 1 and all(e.pixel_values is None and len(e.input_ids) > 1 for e in encoded)
    per_batch = max(1, batch_size // n_samples) if share else batch_size
    # long prompts first so that padding stays small within a batch; every (record, sample) pair is one sequence
    order = sorted(range(len(records)), key=lambda i: (-len(encoded[i].input_ids), i))
    jobs = [[i] for i in order] if share else [[i] for i in order for _ in range(n_samples)]
    out: list[list[str]] = [[] for _ in records]
    device = next(lm.model.parameters()).device
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=not greedy, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    if greedy:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    else:
        gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    was_training = lm.model.training
    lm.model.eval()
    bar = tqdm(total=len(records) * n_samples, desc="generate", unit="seq", disable=not progress, leave=False)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(jobs), per_batch):
                idx = [j[0] for j in jobs[start:start + per_batch]]
                batch = {k: v.to(device) for k, v in left_pad([encoded[i] for i in idx], tok.pad_token_id).items()}
                width = batch["input_ids"].shape[1]
                if share:
                    batch = _shared_prefill(lm.model, batch, n_samples)
                seqs = lm.model.generate(**batch, **gen_kwargs)
                texts = tok.batch_decode(seqs[:, width:], skip_special_tokens=True)
                rows = [i for i in idx for _ in range(n_samples)] if share else idx
                for i, text in zip(rows, texts, strict=True):
                    out[i].append(text.strip())
                bar.update(len(texts))
    finally:
        bar.close()
        lm.model.train(was_training)
    return out


def _shared_prefill(model: torch.nn.Module, batch: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor | Any]:
    """Run all but the last prompt token once, then repeat each row (and its key/value cache) ``n`` times; the
    positions follow the left padding exactly as ``generate`` computes them."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    cache = model(input_ids=ids[:, :-1], attention_mask=attn[:, :-1], position_ids=positions[:, :-1],
                  use_cache=True).cache
    cache.batch_repeat_interleave(n)
    return {"input_ids": ids.repeat_interleave(n, 0), "attention_mask": attn.repeat_interleave(n, 0),
            "cache": cache}

"""The libraries people would use instead, each run the way its documentation shows, on our loaded model and
the same encoded samples (:class:`benchmarks.methods.Inputs`). Installed only in the benchmark environment
(``bash benchmarks/setup_peers.sh``); never project dependencies.

Each returns K ``(N_train, P)`` float64 on the CPU (sign as ⟨g(u), g(o)⟩: the libraries differentiate the
negative log-likelihood, whose gradients are −g on both sides, so their products equal K).
"""

from __future__ import annotations

import tempfile

import torch
from torch import Tensor

from benchmarks.methods import Inputs, completion_logp, device_batch, resolve_scope, stream_kernel, untied
from dynamics.data import Encoded, collate
from dynamics.gradients import scope_parameters
from dynamics.models import LoadedModel


# ------------------------------------------------------------------------------------------------ opacus
def opacus(lm: LoadedModel, inputs: Inputs, *, scope: str = "linear", batch_size: int = 8, **_: object) -> Tensor:
    """Opacus ``GradSampleModule`` (hooks mode): per-sample gradients in ``p.grad_sample``, then dot products."""
    from opacus import GradSampleModule

    lm = untied(lm) if scope == "linear" else lm
    model = lm.model
    params = list(scope_parameters(model, resolve_scope(model, scope)).values())
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    gsm.train()  # opacus records activations only in training mode (these models have no active dropout)

    def flat(items: list[Encoded]) -> Tensor:
        b = device_batch(items, lm)
        logits = gsm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        (-completion_logp(logits, b["input_ids"], b["completion_mask"]).sum()).backward()
        rows = torch.cat([p.grad_sample.reshape(len(items), -1) for p in params], 1)
        gsm.zero_grad(set_to_none=True)
        return rows

    return stream_kernel(flat, inputs, batch_size)


# ------------------------------------------------------------------------------------------- kronfluence
def kronfluence(lm: LoadedModel, inputs: Inputs, *, batch_size: int = 8, device: str = "cpu",
                **_: object) -> Tensor:
    """kronfluence ``compute_pairwise_scores`` with identity curvature (``strategy="identity"``): the score of
    a query o and a training sample u is ⟨∇ measurement(o), ∇ loss(u)⟩ over every tracked ``nn.Linear``
    (the output head as a head: the ``linear`` scope)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    class CompletionNLL(Task):
        def compute_train_loss(self, batch, model, sample=False):  # noqa: ANN001
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits
            return -completion_logp(logits, batch["input_ids"], batch["completion_mask"]).sum()

        def compute_measurement(self, batch, model):  # noqa: ANN001
            return self.compute_train_loss(batch, model)

        def get_attention_mask(self, batch):  # noqa: ANN001
            return batch["attention_mask"]

    task = CompletionNLL()
    model = prepare_model(lm.model, task)
    pad = lm.tokenizer.pad_token_id
    loader = DataLoaderKwargs(collate_fn=lambda items: collate(items, pad))
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer("bench", model, task, cpu=device == "cpu", disable_tqdm=True, output_dir=out)
        factor_args = FactorArguments(strategy="identity")
        analyzer.fit_all_factors("identity", dataset=inputs.train, factor_args=factor_args,
                                 per_device_batch_size=batch_size, dataloader_kwargs=loader)
        analyzer.compute_pairwise_scores("scores", "identity", query_dataset=inputs.probes,
                                         train_dataset=inputs.train, per_device_query_batch_size=batch_size,
                                         per_device_train_batch_size=batch_size, dataloader_kwargs=loader,
                                         score_args=ScoreArguments())
        scores = analyzer.load_pairwise_scores("scores")["all_modules"]
    return scores.T.double().cpu()


# ---------------------------------------------------------------------------------------------- bergson
def _bergson_data(items: list[Encoded]):  # noqa: ANN202
    """A bergson dataset: token ids with labels -100 outside the completion (its causal-LM convention)."""
    from datasets import Dataset

    return Dataset.from_dict({
        "input_ids": [e.input_ids for e in items],
        "labels": [[t if m else -100 for t, m in zip(e.input_ids, e.completion_mask, strict=True)] for e in items],
        "length": [len(e.input_ids) for e in items],
    })


def bergson(lm: LoadedModel, inputs: Inputs, *, projection_dim: int = 0, projection_target: str = "per_module",
            batch_size: int = 8, projection_seed: int = 0, **_: object) -> Tensor:
    """bergson's in-memory pipeline with on-the-fly queries, as in its own benchmark: collect the queries'
    gradients with an ``InMemoryCollector``, then score the training set with a ``Scorer`` while its gradients
    are collected (no index on disk, no preconditioner). ``projection_dim=0`` keeps gradients uncompressed;
    otherwise they are randomly projected (``per_module``: p x p per module; ``global``: p in all).
    Gradients are those of the linear layers of ``model.base_model`` (the ``body`` scope)."""
    from bergson import CollectorComputer, GradientProcessor, IndexConfig, InMemoryCollector, Scorer
    from bergson.data import allocate_batches
    from bergson.score.score_writer import InMemorySequenceScoreWriter

    model = lm.model
    model.requires_grad_(False)  # what bergson's setup_model_and_peft does to a loaded model
    model.get_input_embeddings().requires_grad_(True)
    queries, train = _bergson_data(inputs.probes), _bergson_data(inputs.train)
    tokens = batch_size * max(len(e.input_ids) for e in inputs.train + inputs.probes)

    def processor() -> GradientProcessor:
        return GradientProcessor(projection_dim=projection_dim or None, projection_target=projection_target,
                                 projection_seed=projection_seed)

    with tempfile.TemporaryDirectory() as out:
        cfg = IndexConfig(run_path=f"{out}/run", loss_reduction="sum", token_batch_size=tokens,
                          projection_dim=projection_dim)
        cfg.partial_run_path.mkdir(parents=True)
        query_collector = InMemoryCollector(model=model.base_model, processor=processor(), data=queries, cfg=cfg)
        CollectorComputer(model=model, data=queries, collector=query_collector, cfg=cfg,
                          batches=allocate_batches(queries["length"][:], tokens)).run_with_collector_hooks("query")
        grads = query_collector.gradients
        writer = InMemorySequenceScoreWriter(len(train), len(queries), dtype=torch.float32)
        scorer = Scorer(query_grads=grads, modules=list(grads), writer=writer, device=model.device,
                        dtype=torch.float32)
        collector = InMemoryCollector(model=model.base_model, processor=processor(), data=train, cfg=cfg,
                                      scorer=scorer)
        CollectorComputer(model=model, data=train, collector=collector, cfg=cfg,
                          batches=allocate_batches(train["length"][:], tokens)).run_with_collector_hooks("train")
    return writer.scores.double()

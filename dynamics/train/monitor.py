"""Live interference monitor: forecast forgetting of prior knowledge while training.

At the current weights the probes' per-sample gradients g(o) = ∇log π(y_o|x_o) are stored in compact form (the
influence engine's probe store; refreshed every ``refresh`` steps). During each training step the monitor listens
to the trainer's own forward and backward (no second pass over training data): for every training sample u of
the step it reads the per-sample gradient of the trainer's loss, ∇L_u, and contracts it with every probe:

    push(o, u) = ⟨g(o), −∇L_u⟩

the first-order change of the probe's log-likelihood per unit learning rate that sample u asks for. For SFT
L = Σ_tokens NLL / N (N tokens in the optimizer step), so push = K(o, u)/N with K the kernel of
:mod:`dynamics.influence`, and the monitor reports K itself. For GRPO the per-sample gradient is the
advantage-weighted policy-gradient term, so push has the sign of the sample's advantage times K.

After the optimizer step the parameters moved by Δθ (SGD, Adam with its moments, clipping: whatever ran), and

    predicted Δ log π(y_o|x_o) = ⟨g(o), Δθ⟩             (first order, exact for the step that was taken)

is computed from the same compact probe store without materialising g(o). Where the store is materialised this
product rides on the next step's contraction (Δθ is one more row of that step's product with the store, so the
store is read once per step, not twice): a step's row is written when the next step has run, or at once at
refresh steps and at the end of training. Rows go to ``RUN/monitor.jsonl``:
``step, predicted_dlogp, mean_abs_kernel, mean_cosine, top_harmful`` (+ per-probe predictions, and at refresh
steps the measured probe log-likelihood, so predictions can be checked against measurements).
"""

from __future__ import annotations

import gc
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from dynamics.errors import DynamicsError
from dynamics.gradients import FormPlan, Layout, ParamGrad, output_head, owns_weight_grad, scope_parameters
from dynamics.influence import (
    Batches,
    InfluenceConfig,
    Lengths,
    ProbeStore,
    _GradientPass,
    _memory_budget,
    _probe_pass,
    contract,
    encode_probes,
    plan_forms,
    predicted_change,
    stacked_gradients,
)
from dynamics.models import LoadedModel
from dynamics.store import append_jsonl


@dataclass
class MonitorConfig:
    """``dynamics train ... --monitor probes.jsonl``."""

    probes: str
    refresh: int = 10  # recompute the probes' gradients (and measure their log p) every N optimizer steps
    params: str = "linear"
    target: str = "base"
    tokens: str = "all"
    top: int = 3
    batch_size: int = 8
    # the probe store's materialised part (the rest stays in ghost form, 2-3x slower to contract):
    # 32 probes of the default model need 6.3 GiB in bf16 (12.7 in fp32) to be materialised in full
    max_memory_gb: float | None = 8.0
    # the materialised store's dtype: float32 | bfloat16 | auto (the gradients' own, unless in it the budget
    # would leave layers in ghost form that the planner wants materialised: then bfloat16)
    dtype: str = "auto"

    def __post_init__(self) -> None:
        """Checked when built, before any work (a run config builds its monitor's: :func:`monitor_config`)."""
        if self.refresh < 1:
            raise DynamicsError(f"monitor_refresh must be >= 1, got {self.refresh}", field="monitor_refresh")
        if self.max_memory_gb is not None and not self.max_memory_gb >= 0:
            raise DynamicsError(f"monitor_max_memory must be >= 0 GiB, got {self.max_memory_gb}",
                                field="monitor_max_memory")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise DynamicsError(f"monitor_dtype must be auto, float32 or bfloat16, got {self.dtype!r}",
                                field="monitor_dtype")
        self.influence_config()

    def influence_config(self) -> InfluenceConfig:
        cfg = InfluenceConfig(params=self.params, target=self.target, tokens=self.tokens,
                              batch_size=self.batch_size, max_memory_gb=self.max_memory_gb)
        cfg.validate()
        return cfg


def _row_key(ids: torch.Tensor) -> str:
    return hashlib.sha1(ids.cpu().numpy().tobytes()).hexdigest()


class InterferenceMonitor(TrainerCallback):
    """A ``TrainerCallback`` (attach it with :meth:`attach` so it sees the trainer's batches)."""

    def __init__(self, config: MonitorConfig, lm: LoadedModel, run_dir: str | Path,
                 records: list[dict] | None = None) -> None:
        from dynamics.data import naming_records, read_records

        self.config = config
        self.icfg = config.influence_config()
        self.lm = lm
        self.path = Path(run_dir) / "monitor.jsonl"
        self.probes = read_records(config.probes)
        self.probe_ids = [p["id"] for p in self.probes]
        with naming_records(config.probes):  # checked (context, tokens to score) before the run trains
            self.encoded = encode_probes(lm, self.probes, self.icfg)
        self.ids_by_row: dict[str, str] = {}
        self.tokens_by_id: dict[str, tuple[list[int], int]] = {}  # GRPO rollouts: token ids, prompt length
        self.train_lens: list[tuple[int, int]] = []  # SFT rows' (tokens, completion tokens), for the plan
        if records is not None:  # SFT: a training row is known by its token ids
            from dynamics.data import encode_record

            for r in records:
                enc = encode_record(lm.processing_class, r)
                self.ids_by_row[_row_key(torch.tensor(enc.input_ids))] = r["id"]
                self.train_lens.append((len(enc.input_ids), sum(enc.completion_mask)))
        self.trainer: Any = None
        self.store: ProbeStore | None = None
        self._capture = None
        self._held: dict | None = None  # the last step's row, waiting for its prediction from the next step
        self._before: dict[str, torch.Tensor] = {}

    # -- wiring ---------------------------------------------------------------------------------------------
    def attach(self, trainer: Any) -> InterferenceMonitor:
        """Wrap the trainer's ``compute_loss`` (to learn each micro-batch's loss scale and, for GRPO, the
        rollout ids) and ``training_step`` (to emit every gradient of a micro-batch when its backward is done),
        and register as its callback."""
        try:  # the scope must name parameters of the model trained (with the adapter the trainer may have added)
            scope_parameters(trainer.model, self.icfg.params)
        except DynamicsError as e:
            raise DynamicsError(e.message, field="monitor_params") from None
        self.trainer = trainer
        original = trainer.compute_loss

        def compute_loss(model: Any, inputs: dict, *args: Any, **kwargs: Any) -> Any:
            self._micro = {"inputs": inputs, "num_items": kwargs.get("num_items_in_batch"), "offset": 0}
            return original(model, inputs, *args, **kwargs)

        trainer.compute_loss = compute_loss
        step = trainer.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            loss = step(*args, **kwargs)
            if self._capture is not None:  # what the backward left held (a use whose output got no gradient)
                self._capture.flush()      # is emitted now, so owned weight gradients are whole before clipping
            return loss

        trainer.training_step = training_step
        if hasattr(trainer, "_generate_and_score_completions"):
            generate = trainer._generate_and_score_completions

            def generate_and_log(inputs: list[dict]) -> dict:
                out = generate(inputs)
                step = trainer.state.global_step + 1
                for j, x in enumerate(inputs):
                    prompt = out["prompt_ids"][j][out["prompt_mask"][j].bool()]
                    row = torch.cat([prompt, out["completion_ids"][j][out["completion_mask"][j].bool()]])
                    rid = f"{x['id']}:s{step}:{j}"
                    self.ids_by_row[_row_key(row)] = rid
                    self.tokens_by_id[rid] = (row.tolist(), len(prompt))
                return out

            trainer._generate_and_score_completions = generate_and_log
        trainer.add_callback(self)
        return self

    # -- probe store -------------------------------------------------------------------------------------------
    def _refresh(self, step: int) -> dict:
        """Recompute the probes' gradients at the current weights; return their measured log p."""
        self.store = None  # the old probe store goes before the new one is built (two would not fit in memory)
        gc.collect()
        model = self.trainer.model if self.trainer is not None else self.lm.model
        lm = LoadedModel(model=model, tokenizer=self.lm.tokenizer, kind=self.lm.kind, name=self.lm.name,
                         processor=self.lm.processor)
        self.engine = _GradientPass(lm, self.icfg)
        self.engine.recorder.dtype = product_dtype(self.trainer.args if self.trainer else None, model)
        was_training = model.training
        model.eval()
        try:
            enc = self.encoded
            batches, own = Batches(enc, self.icfg.batch_size), Lengths.of(enc)
            self.budget = _memory_budget(self.icfg)
            self.ownable = self._ownable(model)
            # the training rows' lengths where known (SFT), else the probes' (GRPO: rollouts come later; a layer
            # the plan leaves in ghost form is materialised by the first batch it pays off for, and owned from then)
            train_len, train_completion = (np.mean(self.train_lens, axis=0) if self.train_lens
                                           else (own.mean, own.completion))
            def plan(dtype: torch.dtype, budget: float) -> FormPlan:
                return plan_forms(self.engine.recorder, len(enc), own.mean, float(train_len),
                                  (own.completion, float(train_completion)), budget,
                                  element_bytes=dtype.itemsize, free_build=self.ownable,
                                  batch_size=self.trainer.args.per_device_train_batch_size if self.trainer is not None
                                  else self.icfg.batch_size)

            dtype, forms = self._store_plan(self.engine.recorder.dtype, plan)
            # an owned layer is contracted by the gradients the monitor builds anyway: its ghost terms go unread
            forms = replace(forms, dense_only=forms.dense_only | {n for n in self.ownable if forms.dense(n)})
            logp = torch.zeros(len(enc), dtype=torch.float64)
            self.store = _probe_pass(self.engine, batches, forms, None, logp_out=logp, dtype=dtype)
        finally:
            model.train(was_training)
        self.used = [self.store.dense_bytes()]
        return {"measured_logp": float(logp.mean()), "measured_logp_per_probe": logp.tolist(),
                "refreshed": True, "materialised_gib": round(self.used[0] / 2**30, 4),
                "store_dtype": str(self.store.dtype).removeprefix("torch.")}

    def _store_plan(self, grads: torch.dtype, plan: Callable[[torch.dtype, float], FormPlan]
                    ) -> tuple[torch.dtype, FormPlan]:
        """The materialised store's dtype and plan. ``auto``: the gradients' dtype, unless in it the memory budget
        leaves in ghost form layers the planner would materialise: then bf16, which holds twice as many. Its products
        carry bf16's rounding (0.3% relative kernel error, docs/numerics.md), where the ghost form is exact but
        contracts 2-3x slower; the weight gradients the monitor forms stay in the gradients' dtype."""
        dtype = grads if self.config.dtype == "auto" else getattr(torch, self.config.dtype)
        forms = plan(dtype, self.budget)
        if self.config.dtype == "auto" and dtype.itemsize > 2 and plan(dtype, math.inf).dense_bytes > forms.dense_bytes:
            half = plan(torch.bfloat16, self.budget)
            if half.dense_bytes / 2 > forms.dense_bytes / dtype.itemsize:  # more of the store held materialised
                return torch.bfloat16, half
        return dtype, forms

    def _ownable(self, model: torch.nn.Module) -> set[str]:
        """Weights whose gradient the monitor forms itself, as Σ_u ∇L_u of the per-sample gradients it
        materialises for the contraction anyway, so that autograd skips their weight GEMM: plain linear layers
        used once (not the output head, which TRL may fuse); none when gradients are reduced across processes or
        recomputed (gradient checkpointing). Those the store holds materialised are owned."""
        args = getattr(self.trainer, "args", None)
        if args is None or args.world_size > 1 or args.gradient_checkpointing:
            return set()
        uses, head = self.engine.recorder.uses, output_head(model)
        return {n for n, us in uses.items() if len(us) == 1 and owns_weight_grad(us[0]) and us[0].module is not head}

    # -- callback events -----------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is None:
            raise DynamicsError("the monitor must be attached to its trainer (InterferenceMonitor.attach)")
        measured = self._refresh(state.global_step)
        # the measurement at the starting step, unless a resumed run's log already holds it
        logged = {r.get("step") for r in monitor_from_run(self.path.parent) if "measured_logp" in r}
        self._pending_measure = None if state.global_step in logged else {**measured, "step": state.global_step}

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        rec = self.engine.recorder
        # the held row's update Δθ = θ_now − θ_before is contracted in this step's pass over the store; each
        # θ_before buffer then takes θ_now, this step's θ_before (the weights until its optimizer step): one copy held
        if self._held is not None:
            self._prev, self._before = self._before, {}
        else:
            self._prev, self._before = {}, {n: p.detach().clone() for n, p in rec.params.items()}
        self._ahead = torch.zeros(self.store.n, dtype=torch.float64, device=rec.device)  # sums stay on the device
        self._rows: list[str] = []
        self._push: list[torch.Tensor] = []
        self._norms: list[torch.Tensor] = []
        self._scales: list[float | None] = []
        self._advantages: list[float] = []
        self._segments: dict[int, tuple[int, int]] = {}
        self._t0 = time.perf_counter()
        self.owned = self.ownable & set(self.store.dense)  # with the layers a batch has since materialised
        for name in self.owned:  # (whose ghost terms go unread from now on)
            self.store.lowrank.pop(name, None)
        self._capture = rec.capture(None, self._on_param, passive=True, on_forward=self._on_forward,
                                    temperature=float(getattr(self.trainer, "temperature", 1.0) or 1.0),
                                    own=self.owned)
        self._capture.__enter__()

    def _on_forward(self, segment: int, kwargs: dict) -> Layout:
        ids = kwargs.get("input_ids")
        mask = kwargs.get("attention_mask")
        micro = getattr(self, "_micro", {})
        start = len(self._rows)
        for b in range(ids.shape[0]):
            row = ids[b][mask[b].bool()] if mask is not None else ids[b]
            self._rows.append(self.ids_by_row.get(_row_key(row), f"row{start + b}"))
        self._segments[segment] = (start, ids.shape[0])
        n = ids.shape[0]
        dev = self.engine.recorder.device
        self._push.append(torch.zeros(n, self.store.n, dtype=torch.float64, device=dev))
        self._norms.append(torch.zeros(n, dtype=torch.float64, device=dev))
        scale = None
        if "advantages" not in micro.get("inputs", {}):  # SFT: token-mean NLL over the optimizer step
            labels = kwargs.get("labels")
            n_items = micro.get("num_items")
            if n_items is None and labels is not None:
                n_items = int((labels[:, 1:] != -100).sum()) * self.trainer.args.gradient_accumulation_steps
            scale = 1.0 / float(n_items) if n_items else None
        self._scales.extend([scale] * n)
        adv = micro.get("inputs", {}).get("advantages")
        if adv is not None:  # GRPO: this forward's rows are the next n of the micro-batch
            off = micro["offset"]
            self._advantages.extend(adv[off:off + n].reshape(-1).tolist())
            micro["offset"] = off + n
        grid = kwargs.get("image_grid_thw")
        return Layout(n, None if grid is None else _patch_counts(ids, grid, self.lm))

    def _on_param(self, name: str, pg: ParamGrad) -> None:
        start, n = self._segments[pg.segment]
        prev = self._prev.pop(name, None)
        delta = None
        if prev is not None:
            now = self.engine.recorder.params[name].detach()
            delta = now - prev
            self._before[name] = prev.copy_(now)
        g = None
        if name in self.owned:  # this micro-batch's share of the weight gradient, which autograd skipped
            g = stacked_gradients(pg, delta, self.store.dense[name])
            p = self.engine.recorder.params[name]
            total = g[: g.shape[0] - (delta is not None)].sum(0).view_as(p).to(p.dtype)  # (rounded as autograd's)
            p.grad = total if p.grad is None else p.grad.add_(total)
        rows, sq, ahead = contract(self.engine.recorder, self.store, name, pg, self.budget, self.used, delta, g)
        if ahead is not None:
            self._ahead += ahead
        seg = list(self._segments).index(pg.segment)
        self._push[seg] -= rows  # the captured gradient is ∇L_u; the push is along −∇L_u
        self._norms[seg] += sq

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._capture is None:
            return
        self._capture.flush()
        self._capture.__exit__(None, None, None)
        self._capture = None
        overhead = time.perf_counter() - self._t0
        rec = self.engine.recorder
        if self._held is not None:  # the previous step's prediction, mostly taken in this step's contraction
            with torch.no_grad():
                for n, prev in self._prev.items():  # parameters this step's backward did not reach (so the
                    now = rec.params[n].detach()      # optimizer left them where they were)
                    self._ahead += predicted_change(self.store, n, now - prev)
                    self._before[n] = prev.copy_(now)
                self._prev = {}
            self._write(state, self._predicted(self._held, self._ahead))
            self._held = None
        row = self._row(state.global_step)
        row["seconds"] = round(overhead, 3)
        refresh = state.global_step % self.config.refresh == 0
        if refresh or state.global_step >= state.max_steps or not self.store.dense:
            row = self._predicted(row, self._update_prediction())
            if refresh:  # after the prediction, which needs this step's probe gradients
                row.update(self._refresh(state.global_step))
            self._write(state, row)
        else:
            self._held = row

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._flush(state)  # a run resumed from this checkpoint starts after this step: its row must be on disk

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._flush(state)  # training stopped early

    def _flush(self, state: Any) -> None:
        """Write the held row now, with its prediction by a pass of its own over the store."""
        if self._held is not None:
            self._write(state, self._predicted(self._held, self._update_prediction()))
            self._held = None

    def _update_prediction(self) -> torch.Tensor:
        """⟨g(o), Δθ⟩ for the update since the last step began, by a pass over the store."""
        rec = self.engine.recorder
        with torch.no_grad():
            return sum(predicted_change(self.store, n, p.detach() - self._before[n]) for n, p in rec.params.items())

    @staticmethod
    def _predicted(row: dict, predicted: torch.Tensor) -> dict:
        predicted = predicted.cpu()
        return {**row, "predicted_dlogp": float(predicted.mean()), "predicted_dlogp_per_probe": predicted.tolist()}

    def _write(self, state: Any, row: dict) -> None:
        if not state.is_world_process_zero:
            return
        if getattr(self, "_pending_measure", None):  # the base measurement, before the first step
            append_jsonl(self.path, self._pending_measure)
            self._pending_measure = None
        append_jsonl(self.path, row)

    def _row(self, step: int) -> dict:
        push = torch.cat(self._push).cpu() if self._push else torch.zeros(0, self.store.n, dtype=torch.float64)
        norms = torch.cat(self._norms).cpu().clamp(min=0).sqrt() if self._norms else torch.zeros(0)
        probe_norms = self.store.norms_sq.clamp(min=0).sqrt()
        cos = push / (norms[:, None] * probe_norms[None, :]).clamp(min=1e-300)
        scales = torch.tensor([s if s is not None else float("nan") for s in self._scales], dtype=torch.float64)
        kernel = push / scales[:, None]
        mean_push = push.mean(1)
        order = torch.argsort(mean_push)[: self.config.top].tolist()
        return {
            "step": step,
            "predicted_dlogp": None,  # filled in by _predicted
            "predicted_dlogp_per_probe": None,
            "mean_abs_kernel": float(kernel.abs().mean()) if torch.isfinite(scales).all() else None,
            "mean_abs_push": float(push.abs().mean()),
            "mean_cosine": float(cos.mean()),
            "top_harmful": [{"id": self._rows[i], "mean_push": float(mean_push[i])} for i in order],
            "samples": self._rows,
            "kernel": kernel.tolist() if torch.isfinite(scales).all() else None,
            "push_mean_per_sample": mean_push.tolist(),
            "advantages": list(self._advantages) or None,
        }


def product_dtype(args: Any, model: torch.nn.Module) -> torch.dtype:
    """The dtype the monitor takes per-sample gradients in (and, unless its memory budget asks for bf16, stores
    probe gradients and contracts in): the trainer's compute precision (bf16 under ``--bf16``, as the trainer's own
    weight gradients are; otherwise the weights' dtype, at least fp32). bf16 halves the store and doubles the speed
    of the contraction, at a kernel error (0.3% relative on the test model, docs/numerics.md) below that of the
    bf16 training step it forecasts."""
    if getattr(args, "bf16", False):
        return torch.bfloat16
    dtype = next(model.parameters()).dtype
    return dtype if dtype.itemsize >= 4 else torch.float32


def _patch_counts(ids: torch.Tensor, grid: torch.Tensor, lm: LoadedModel) -> list[int]:
    """Per-sample vision patch counts from the image-pad tokens each row holds."""
    image_token = lm.model.config.image_token_id
    merge = lm.processor.image_processor.merge_size ** 2 if lm.processor is not None else 4
    return [int((row == image_token).sum()) * merge for row in ids]


def monitor_config(config: Any, lora: bool = False) -> MonitorConfig:
    """The monitor a run config asks for (``config.monitor``, a probes file). A LoRA run (``lora_r``, or a model
    that is an adapter: ``lora``) only has gradients of its adapter, so its monitor contracts those unless
    ``monitor_params`` says otherwise."""
    params = config.monitor_params or ("lora" if (config.lora_r or lora) else "linear")
    memory = {} if config.monitor_max_memory is None else {"max_memory_gb": config.monitor_max_memory}
    return MonitorConfig(probes=config.monitor, refresh=config.monitor_refresh, params=params,
                         dtype=config.monitor_dtype, **memory)


def attach_monitor(trainer: Any, config: Any, lm: LoadedModel, records: list[dict] | None = None) -> None:
    """Attach the monitor a run config asks for to ``trainer``; ``records`` are SFT's training records (GRPO
    rollouts are named as they are generated)."""
    if config.monitor:
        InterferenceMonitor(monitor_config(config, lm.is_peft), lm, config.output_dir, records=records).attach(trainer)


def monitor_from_run(run: str | Path) -> list[dict]:
    """The rows a run's monitor wrote."""
    from dynamics.store import read_jsonl_rows

    return read_jsonl_rows(Path(run) / "monitor.jsonl")

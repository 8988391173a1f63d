"""``TrainerCallback``s that write a run folder's logs: metrics per step, checkpoints on a schedule, and the
in-run evaluation of the novel task and the prior-knowledge probes (learning and forgetting in one run).

Only the main process writes; in a multi-process run the others wait at a barrier while it evaluates.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from dynamics.data import image_digests
from dynamics.errors import DynamicsError
from dynamics.models import LoadedModel, fingerprint
from dynamics.store import append_jsonl, atomic_path, read_jsonl_rows, read_parquet, text_hash, write_json
from dynamics.train.schedules import checkpoint_steps

# TRL's log keys -> the run folder's column names (DESIGN.md: metrics.jsonl)
METRIC_NAMES = {"loss": "loss", "learning_rate": "lr", "grad_norm": "grad_norm", "reward": "reward_mean",
                "reward_std": "reward_std", "kl": "kl", "accuracy": "accuracy"}


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class MetricsCallback(TrainerCallback):
    """Append one row per logging step to ``metrics.jsonl``: ``step, loss, lr, grad_norm`` (+ ``reward_mean,
    reward_std, kl, accuracy`` for RFT), then every other metric TRL logged under its own name, and ``time``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        row: dict[str, Any] = {"step": state.global_step}
        row.update({new: logs[old] for old, new in METRIC_NAMES.items() if old in logs})
        row.update({k: v for k, v in logs.items() if k not in METRIC_NAMES})
        row["time"] = round(time.time(), 3)
        append_jsonl(self.path, row)


class CompactProgressCallback(ProgressCallback):
    """transformers' progress bar, with the last loss (and mean reward) on the bar instead of a printed dict per
    logging step (every logged value is in ``metrics.jsonl``)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {new: f"{logs[old]:.4g}" for old, new in (("loss", "loss"), ("reward", "reward"))
                     if isinstance(logs.get(old), (int, float))}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)


def compact_progress(trainer: Any) -> None:
    """Replace transformers' log printing (a dict per logging step: :class:`PrinterCallback`, or written under the
    bar by :class:`ProgressCallback`) with :class:`CompactProgressCallback`, or with nothing if ``disable_tqdm``."""
    trainer.pop_callback(PrinterCallback)
    trainer.pop_callback(ProgressCallback)
    if not trainer.args.disable_tqdm:
        trainer.add_callback(CompactProgressCallback())


class FiniteCheckCallback(TrainerCallback):
    """Stop at the first step whose gradients, loss or gradient norm are NaN/inf, with an error naming the step
    and the samples of its batch whose logits (or per-token log-probabilities) are not finite (or, when none is
    singled out, the whole batch).

    A forward hook notes, for each training micro-batch, its token ids and whether each row's logits are
    finite (one reduction per row); gradients are checked before the optimizer step, so the weights (and the
    last checkpoint) stay finite. Rows are matched back to record ids through the training set's
    ``input_ids`` (SFT); RFT batches are the model's own samples and are reported by position.
    """

    def __init__(self) -> None:
        self.rows: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        self.handle: Any = None

    def _record(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        ids = kwargs.get("input_ids")
        # per-token outputs: logits, or what TRL's fused LM head returns instead of them
        logits = next((v for v in (getattr(output, k, None) for k in ("logits", "log_probs", "entropy"))
                       if isinstance(v, torch.Tensor) and v.dim() >= 2), None)
        if not (module.training and torch.is_grad_enabled()) or logits is None or ids is None:
            return
        finite = torch.isfinite(logits.detach().sum(dim=tuple(range(1, logits.dim())), dtype=torch.float32))
        mask = kwargs.get("attention_mask")
        self.rows.append((ids.detach().cpu(), None if mask is None else mask.detach().cpu(), finite.cpu()))

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None and self.handle is None:
            self.handle = model.register_forward_hook(self._record, with_kwargs=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def _samples(self, dataset: Any) -> str:
        """The ids of the batch's samples with non-finite logits (else of all its samples)."""
        keys = []  # (token ids without padding, logits finite)
        for ids, mask, finite in self.rows:
            for r in range(ids.shape[0]):
                row = ids[r] if mask is None else ids[r][mask[r].bool()]
                keys.append((tuple(row.tolist()), bool(finite[r])))
        bad = [k for k, ok in keys if not ok]
        chosen, which = (bad, "with non-finite logits") if bad else ([k for k, _ in keys], "of the batch")
        if not chosen:
            return ""
        known = {}
        if dataset is not None and {"id", "input_ids"} <= set(getattr(dataset, "column_names", ())):
            known = {tuple(t): i for t, i in zip(dataset["input_ids"], dataset["id"], strict=True)}
        if known and all(k in known for k in chosen):
            return f"; samples {which}: {', '.join(sorted({known[k] for k in chosen}))}"
        return f"; {len(chosen)} of {len(keys)} sequences {which}"

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None,
                              train_dataloader: Any = None, **kwargs: Any) -> None:
        grads = [p.grad for p in (model.parameters() if model is not None else ()) if p.grad is not None]
        if grads and not all(bool(torch.isfinite(g).all()) for g in grads):
            dataset = getattr(train_dataloader, "dataset", None)
            raise DynamicsError(f"non-finite gradient (NaN/inf) at step {state.global_step + 1}"
                                f"{self._samples(dataset)}", field="grad_norm")
        self.rows.clear()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise DynamicsError(f"non-finite {key} ({value}) at step {state.global_step}", field=key)


class CheckpointScheduleCallback(TrainerCallback):
    """Ask the trainer to save at the schedule's steps (see :mod:`dynamics.train.schedules`)."""

    def __init__(self, schedule: str | None, every: int = 0) -> None:
        self.schedule, self.every = schedule, every
        self.steps: set[int] = set()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps = set(checkpoint_steps(self.schedule, state.max_steps, self.every))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step in self.steps:
            control.should_save = True


class EvalCallback(TrainerCallback):
    """Evaluate the model being trained with :func:`dynamics.evaluate.evaluate_model` at step 0 (the base
    model, so learning curves start there), every ``every`` steps and at the last step.

    Writes one :func:`dynamics.evaluate.summarise` row per evaluation to ``eval.jsonl`` (``step,
    task_accuracy, probe_accuracy, probe_logp, ...``) and the per-item rows to ``eval.parquet``.
    """

    def __init__(self, lm: LoadedModel, task_records: list[dict], probes: list[dict], config: Any, every: int,
                 run_dir: str | Path, name: str = "", model_spec: str = "", base_from: str | None = None) -> None:
        self.lm, self.task_records, self.probes, self.config = lm, task_records, probes, config
        self.every = every
        self.run = Path(run_dir)
        self.name = name or self.run.name
        self.base_from = Path(base_from) if base_from else None
        settings = {k: v for k, v in asdict(config).items() if k not in ("progress", "task_data", "probes")}
        # what a run's step-0 evaluation depends on, for runs from one base to share it (``base_from``): the
        # base model's weights, the inputs (images' bytes too) and the settings
        weights = fingerprint(model_spec) if model_spec else ""
        self.inputs_key = text_hash(json.dumps([weights, task_records, probes, settings,
                                                image_digests([*task_records, *probes])], sort_keys=True, default=str))

    def evaluate(self, model: torch.nn.Module, step: int) -> dict | None:
        """Evaluate ``model`` now and log it as ``step`` (main process; the others wait)."""
        row = None
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            from dynamics.evaluate import evaluate_model, summarise

            was_training = model.training
            lm = replace(self.lm, model=model, name=self.name)
            try:
                df = evaluate_model(lm, self.task_records, self.probes, self.config, step=step, model_name=self.name)
            finally:
                model.train(was_training)
            row = {"step": step, **summarise(df)}
            append_jsonl(self.run / "eval.jsonl", row)
            self._append_items(df)
        _barrier()
        return row

    def _append_items(self, df: Any) -> None:
        import pandas as pd

        path = self.run / "eval.parquet"
        if path.exists():
            df = pd.concat([pd.read_parquet(path), df], ignore_index=True)
        with atomic_path(path) as tmp:
            df.to_parquet(tmp, index=False)

    def reuse_base(self) -> bool:
        """Copy the step-0 evaluation of ``base_from`` (same model and inputs, by ``eval.inputs.json``)."""
        src = self.base_from
        if src is None or not (src / "eval.inputs.json").is_file() or not (src / "eval.parquet").is_file():
            return False
        if json.loads((src / "eval.inputs.json").read_text()).get("key") != self.inputs_key:
            return False
        rows = [r for r in read_jsonl_rows(src / "eval.jsonl") if r.get("step") == 0]
        items = read_parquet(src / "eval.parquet")  # that run may still be writing it
        items = items[items["step"] == 0].assign(model=self.name)
        if not rows or items.empty:
            return False
        append_jsonl(self.run / "eval.jsonl", {**rows[0], "reused_from": str(src)})
        self._append_items(items)
        return True

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step == 0:  # a fresh start, not a resumed run
            if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
                _barrier()
                return
            write_json(self.run / "eval.inputs.json", {"key": self.inputs_key})
            if not self.reuse_base():
                self.evaluate(model, 0)
            elif torch.distributed.is_initialized():
                _barrier()

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        step = state.global_step
        if (self.every and step % self.every == 0) or step == state.max_steps:
            self.evaluate(model, step)


def eval_callback(config: Any, lm: LoadedModel, run_dir: str | Path, task: str | None = None,
                  task_args: str = "") -> EvalCallback | None:
    """The in-run evaluation a run config asks for (``eval_every`` > 0), or None.

    Inputs are made by :func:`dynamics.evaluate.load_inputs`: task prompts from ``eval_data`` (a record without
    ``meta.task`` is scored by the task below) or built by ``eval_task`` (default: the training task, with its
    ``task_args``) with ``eval_n`` prompts and ``eval_seed``; probes from ``probes`` (a records file or a
    built-in suite; default: the suite for the model's kind). Images are drawn into the run folder. Only the
    main process builds and evaluates them.
    """
    if config.eval_every <= 0:
        return None
    from dynamics.evaluate import EvalConfig, load_inputs

    name = config.eval_task or task
    args = config.eval_task_args if config.eval_task else (config.eval_task_args or task_args)
    ec = EvalConfig(task=name, task_args=args or "", task_data=config.eval_data,  # scores records without meta.task
                    n_task=config.eval_n, task_seed=config.eval_seed, probes=config.probes,
                    batch_size=config.eval_batch_size, probe_max_new_tokens=config.eval_probe_tokens, progress=False)
    task_records, probes = load_inputs(ec, run_dir, kind=lm.kind) if config.should_save else ([], [])
    return EvalCallback(lm, task_records, probes, ec, config.eval_every, run_dir, model_spec=config.model,
                        base_from=config.eval_base_from)


def run_callbacks(config: Any, lm: LoadedModel, extra: Any = (), task: str | None = None,
                  task_args: str = "") -> list[TrainerCallback]:
    """The callbacks every run gets (metrics, checkpoint schedule, in-run evaluation if asked) + ``extra``."""
    run = Path(config.output_dir)
    ev = eval_callback(config, lm, run, task, task_args)
    return [FiniteCheckCallback(), MetricsCallback(run / "metrics.jsonl"),
            CheckpointScheduleCallback(config.checkpoint_schedule, config.checkpoint_every),
            *([ev] if ev else []), *extra]

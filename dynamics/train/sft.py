"""Supervised fine-tuning on prompt/completion records, through TRL's ``SFTTrainer``.

Records are tokenized once by the project's convention (:func:`dynamics.data.encode_record`), so the loss is
the mean negative log-likelihood of exactly the completion tokens that probes and influence score::

    L(θ) = - Σ_i Σ_{t ∈ completion(i)} log p_θ(x_{i,t} | x_{i,<t}) / Σ_i |completion(i)|

TRL is handed the pre-tokenized rows with ``skip_prepare_dataset`` and :class:`CompletionCollator`, which pads
them with :func:`dynamics.data.collate` and sets ``labels = -100`` outside the completion (image tensors of VLM
records travel along). Everything else -- optimizer, schedule, bf16 autocast, LoRA, multi-process -- is TRL's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from trl import SFTConfig, SFTTrainer

from dynamics.data import Encoded, collate, context_length, encode_record, naming_records, read_records
from dynamics.errors import DynamicsError
from dynamics.train.run import (
    RunOptions,
    RunTrainerMixin,
    TrainResult,
    lora_config,
    run_options_post_init,
    run_trainer,
    setup_guard,
    start_run,
)


@dataclass
class SFTRunConfig(RunOptions, SFTConfig):
    """Every ``trl.SFTConfig`` option, plus the run options of :class:`dynamics.train.run.RunOptions` and the
    training data."""

    data: str | None = field(default=None, metadata={"help": "Training records (.jsonl or .parquet)."})
    per_device_train_batch_size: int = 8
    num_train_epochs: float = 1.0
    dataset_kwargs: dict | None = field(default_factory=lambda: {"skip_prepare_dataset": True})
    remove_unused_columns: bool = False

    def __post_init__(self) -> None:
        run_options_post_init(self)
        super().__post_init__()


def sft_dataset(processing_class: Any, records: Sequence[dict], max_length: int | None = None) -> Any:
    """Pre-tokenized rows ``id, input_ids, completion_mask`` (+ ``pixel_values, image_grid_thw``); an error names
    the record (:func:`dynamics.data.naming_records` adds its file and line)."""
    from datasets import Dataset

    rows = []
    for rec in records:
        if not rec.get("completion"):
            raise DynamicsError("SFT needs a completion in every record", field=f"completion (record {rec['id']})")
        enc = encode_record(processing_class, rec, max_length)
        row = {"id": rec["id"], "input_ids": enc.input_ids, "completion_mask": enc.completion_mask}
        if enc.pixel_values is not None:
            row["pixel_values"] = enc.pixel_values.tolist()
            row["image_grid_thw"] = enc.image_grid_thw.tolist()
        rows.append(row)
    return Dataset.from_list(rows)


@dataclass
class CompletionCollator:
    """Pad rows of :func:`sft_dataset` with :func:`dynamics.data.collate`; labels are the completion tokens."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        items = [Encoded(r["input_ids"], r["completion_mask"],
                         torch.tensor(r["pixel_values"]) if r.get("pixel_values") is not None else None,
                         torch.tensor(r["image_grid_thw"]) if r.get("image_grid_thw") is not None else None)
                 for r in rows]
        batch = collate(items, self.pad_token_id)
        mask = batch.pop("completion_mask")
        batch["labels"] = batch["input_ids"].masked_fill(mask == 0, -100)
        return batch


class DynamicsSFTTrainer(RunTrainerMixin, SFTTrainer):
    """``SFTTrainer`` with the run folder's atomic checkpoints."""


def build_sft_trainer(config: SFTRunConfig, records: Sequence[dict] | None = None,
                      callbacks: Sequence[Any] = ()) -> tuple[DynamicsSFTTrainer, Path | None]:
    """Load the model and data, prepare the run folder, and return ``(trainer, checkpoint to resume from)``."""
    from dynamics.train.callbacks import run_callbacks
    from dynamics.train.monitor import attach_monitor

    if records is None:
        if not config.data:
            raise DynamicsError("no training data: give --data FILE", field="data")
        records = read_records(config.data)
    lm, info, resume_from = start_run(config, "sft", records)
    with naming_records(config.data):
        dataset = sft_dataset(lm.processing_class, records, context_length(lm.model))
    trainer = DynamicsSFTTrainer(model=lm.model, args=config, train_dataset=dataset, processing_class=lm.tokenizer,
                                 data_collator=CompletionCollator(lm.tokenizer.pad_token_id),
                                 callbacks=run_callbacks(config, lm, callbacks),
                                 peft_config=lora_config(config) if config.lora_r else None)
    trainer.run_processing_class = lm.processing_class
    trainer.run_info = info
    attach_monitor(trainer, config, lm, records)  # reads its probes file
    return trainer, resume_from


def train_sft(config: SFTRunConfig, records: Sequence[dict] | None = None,
              callbacks: Sequence[Any] = ()) -> TrainResult:
    """Fine-tune ``config.model`` on ``config.data`` (or ``records``) into the run folder ``config.output_dir``.

    ``callbacks`` are extra ``TrainerCallback``s (e.g. a live monitor).
    """
    with setup_guard(config):
        trainer, resume_from = build_sft_trainer(config, records, callbacks)
        return run_trainer(trainer, config, resume_from, trainer.run_info)

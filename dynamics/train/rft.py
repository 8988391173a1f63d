"""Reinforcement fine-tuning with GRPO on a task's rewards, through TRL's ``GRPOTrainer``.

Each step samples G completions for each of its prompts (default 2 x 8), scores them with the task's reward
functions (jigsaw: hit + accuracy + format), and maximises the clipped surrogate with group-normalised
advantages (TRL's ``loss_type``, default DAPO token averaging)::

    A_{i,k} = (r_{i,k} - mean_k r_{i,k}) / (std_k r_{i,k} + 1e-4)
    L(θ) = - Σ_{i,k,t} min(ρ_{i,k,t} A_{i,k}, clip(ρ_{i,k,t}, 1-ε, 1+ε) A_{i,k}) / #tokens  + β KL(π_θ || π_ref)

with ``ρ = π_θ / π_θ_old`` per token. β = 0 by default (no reference model: the study compares the training
*data* of SFT and RFT, and SFT has no KL term either). Every rollout is appended to ``RUN/rollouts.jsonl`` as a
record with its step, reward and advantage (see :mod:`dynamics.train.rollouts`).

VLMs: TRL's GRPO expects a transformers ``ProcessorMixin``; :class:`TRLVisionProcessor` presents the project's
:class:`dynamics.models.VLProcessor` as one, tokenizing prompts with :func:`dynamics.data.encode`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import BatchFeature, ProcessorMixin
from trl import GRPOConfig, GRPOTrainer

from dynamics.data import encode, load_images, naming_records, text_of
from dynamics.errors import DynamicsError, check_bounds
from dynamics.generation import encode_prompts
from dynamics.store import append_jsonl
from dynamics.train.rollouts import prompt_records, rollout_record
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
class RFTRunConfig(RunOptions, GRPOConfig):
    """Every ``trl.GRPOConfig`` option (``beta``, ``epsilon``, ``temperature``, ``num_generations``, ``loss_type``,
    ...), plus the run options of :class:`dynamics.train.run.RunOptions` and the task.

    ``prompts_per_step`` (default 2) sets ``per_device_train_batch_size = prompts_per_step * num_generations /
    processes``, overriding it; set ``prompts_per_step`` to 0 to give ``per_device_train_batch_size`` (completions
    per step and process) yourself.
    """

    task: str = field(default="jigsaw", metadata={"help": "Task whose rewards are optimised."})
    task_args: str = field(default="", metadata={"help": "Task options, e.g. grid=2x2,form=text."})
    data: str | None = field(default=None, metadata={"help": "Prompt records with answers (else built)."})
    n_prompts: int = field(default=128, metadata={"help": "Training prompts built by the task."})
    prompts_seed: int = 0
    prompts_per_step: int = field(default=2, metadata={"help": "Prompts per step over all processes (0: use "
                                                                "per_device_train_batch_size)."})
    num_generations: int | None = 8
    max_completion_length: int | None = field(default=None, metadata={"help": "Default: the task's budget."})
    learning_rate: float = 1e-5
    num_train_epochs: float = 1.0
    log_rollouts: bool = True

    def __post_init__(self) -> None:
        run_options_post_init(self)
        check_bounds(self, {"n_prompts": 1, "prompts_per_step": 0, "num_generations": 2, "max_completion_length": 1,
                            "beta": 0}, above={"temperature": 0, "epsilon": 0})
        if self.prompts_per_step:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            total = self.prompts_per_step * self.num_generations
            if total % world:
                raise DynamicsError(f"prompts_per_step x num_generations = {total} does not split over {world} "
                                    "processes", field="prompts_per_step")
            self.per_device_train_batch_size = total // world
        super().__post_init__()


# -------------------------------------------------------------------------------------------------- VLM bridge
def _split_images(messages: list[dict]) -> tuple[list[dict], list]:
    """TRL's multimodal messages (image parts carrying the image) -> our messages and the images in order."""
    images, out = [], []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for p in content:
                if p.get("type") == "image":
                    images.append(p.get("image"))
                    parts.append({"type": "image"})
                else:
                    parts.append({"type": "text", "text": p.get("text", "")})
            m = {**m, "content": parts}
        out.append(m)
    return out, images


class TRLVisionProcessor(ProcessorMixin):
    """A :class:`dynamics.models.VLProcessor` as TRL's ``GRPOTrainer`` wants a processor: batched
    ``apply_chat_template(..., tokenize=True)`` for generation prompts, and ``__call__(images=...)`` for the image
    inputs of the training forward -- both by :func:`dynamics.data.encode`'s rules."""

    def __init__(self, processor: Any) -> None:  # no ProcessorMixin.__init__: nothing to load or check
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer.chat_template

    def apply_chat_template(self, conversation: list, tokenize: bool = False, add_generation_prompt: bool = False,
                            return_dict: bool = False, **kwargs: Any) -> Any:
        batched = bool(conversation) and isinstance(conversation[0], list)
        convs = conversation if batched else [conversation]
        if not tokenize:
            texts = [self.tokenizer.apply_chat_template(_split_images(c)[0], tokenize=False,
                                                        add_generation_prompt=add_generation_prompt) for c in convs]
            return texts if batched else texts[0]
        if not add_generation_prompt:
            raise NotImplementedError("only generation prompts are tokenized here")
        encs = []
        for c in convs:
            messages, images = _split_images(c)
            encs.append(encode(self.processor, messages, None, images or None))
        out: dict[str, Any] = {"input_ids": [e.input_ids for e in encs]}
        pix = [e.pixel_values for e in encs if e.pixel_values is not None]
        if pix:
            out["pixel_values"] = torch.cat(pix)
            out["image_grid_thw"] = torch.cat([e.image_grid_thw for e in encs if e.image_grid_thw is not None])
        return out

    def __call__(self, images: list | None = None, text: Any = None, **kwargs: Any) -> BatchFeature:
        flat = [img for imgs in images or [] for img in imgs or []]
        pil = load_images(flat) if flat and isinstance(flat[0], (str, os.PathLike)) else flat
        return BatchFeature(self.processor.images_to_inputs(pil) if pil else {})

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def save_pretrained(self, folder: str | os.PathLike, **kwargs: Any) -> None:
        self.processor.save_pretrained(folder)

    def __repr__(self) -> str:
        return f"TRLVisionProcessor({type(self.processor).__name__})"


# ------------------------------------------------------------------------------------------------ the trainer
def rft_dataset(records: Sequence[dict]) -> Any:
    """Rows TRL's GRPO reads: ``prompt`` (messages), ``answer`` and ``id`` (passed to the reward functions), and
    ``images`` (paths) for image records."""
    from datasets import Dataset

    rows = []
    for rec in records:
        row = {"id": rec["id"], "prompt": rec["prompt"], "answer": str(rec["answer"])}
        if rec.get("images"):
            row["images"] = rec["images"]
        rows.append(row)
    if len({"images" in r for r in rows}) > 1:
        raise DynamicsError("mixing records with and without images in one RFT run is not supported",
                            field="images")
    return Dataset.from_list(rows)


class DynamicsGRPOTrainer(RunTrainerMixin, GRPOTrainer):
    """``GRPOTrainer`` with atomic checkpoints that logs every rollout and the task accuracy of each step."""

    task: Any = None
    records_by_id: dict[str, dict] = {}
    rollouts_path: Path | None = None

    def _generate_single_turn(self, *args: Any, **kwargs: Any) -> Any:
        # TRL samples outside the autocast region of the training forward; under bf16 sample in it too, so the
        # rollouts come from the same (autocast) policy the loss scores -- and CPU sampling runs ~5x faster
        with self.accelerator.autocast():
            return super()._generate_single_turn(*args, **kwargs)

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict:
        out = super()._generate_and_score_completions(inputs)
        if self.model.training:
            self._log_rollouts([x["id"] for x in inputs])
        return out

    def _log_rollouts(self, ids: list[str]) -> None:
        """Pair TRL's logged completions, rewards and advantages of this generation batch (all processes,
        in group order) with their prompt records; log the step's accuracy; append them to rollouts.jsonl."""
        from accelerate.utils import gather_object

        ids = gather_object(ids)
        n = len(ids)
        texts = [text_of(c) for c in list(self._logs["completion"])[-n:]]
        per_func = {name: list(self._logs["rewards"][name])[-n:] for name in self.reward_func_names}
        weights = self.reward_weights.tolist()
        rewards = [sum(w * v for w, v in zip(weights, vals, strict=True) if not math.isnan(v))
                   for vals in zip(*per_func.values(), strict=True)]
        advantages = list(self._logs["advantages"])[-n:]
        sources = [self.records_by_id[i] for i in ids]
        scores = [self.task.score(t, src["answer"]) for t, src in zip(texts, sources, strict=True)]
        self._metrics["train"]["accuracy"].append(sum(s["accuracy"] for s in scores) / n)
        if not (self.accelerator.is_main_process and self.rollouts_path):
            return
        step = self.state.global_step + 1  # the optimizer step these rollouts are trained on
        for j in range(n):
            rec = rollout_record(sources[j], texts[j], scores[j], rewards[j], rid=f"{ids[j]}:s{step}:{j}",
                                 sample=j % self.num_generations, advantage=advantages[j], step=step,
                                 meta={"rewards": {k: v[j] for k, v in per_func.items()}})
            append_jsonl(self.rollouts_path, rec)


def build_rft_trainer(config: RFTRunConfig, task: Any = None, records: Sequence[dict] | None = None,
                      callbacks: Sequence[Any] = ()) -> tuple[DynamicsGRPOTrainer, Path | None]:
    """Load the model, task and prompts, prepare the run folder; return ``(trainer, checkpoint to resume)``.

    ``task`` defaults to ``get_task(config.task, **parse_task_args(config.task_args))``; it provides
    ``reward_funcs``, ``score``, ``build`` and ``max_new_tokens``.
    """
    from dynamics.train.callbacks import run_callbacks
    from dynamics.train.monitor import attach_monitor

    if task is None:
        from dynamics.tasks import get_task, parse_task_args

        task = get_task(config.task, **parse_task_args(config.task_args))
    if records is None:
        records = prompt_records(task, config.data, config.n_prompts, config.prompts_seed)
    if config.max_completion_length is None:
        config.max_completion_length = task.max_new_tokens
    lm, info, resume_from = start_run(config, "rft", records, task=getattr(task, "name", config.task),
                                      task_args=config.task_args)
    with naming_records(config.data):  # every prompt leaves the completion length of the context free
        encode_prompts(lm, records, config.max_completion_length)
    if config.beta and not lm.is_peft and not config.lora_r:
        _reference_on_disk(lm, config)
    processing = TRLVisionProcessor(lm.processor) if lm.processor is not None else lm.tokenizer
    trainer = DynamicsGRPOTrainer(model=lm.model, reward_funcs=list(task.reward_funcs), args=config,
                                  train_dataset=rft_dataset(records), processing_class=processing,
                                  callbacks=run_callbacks(config, lm, callbacks, config.task, config.task_args),
                                  peft_config=lora_config(config) if config.lora_r else None)
    trainer.run_processing_class = lm.processing_class
    trainer.run_info = info
    attach_monitor(trainer, config, lm, None)  # reads its probes file
    trainer.task = task
    trainer.records_by_id = {r["id"]: r for r in records}
    trainer.rollouts_path = Path(config.output_dir) / "rollouts.jsonl" if config.log_rollouts else None
    return trainer, resume_from


def _reference_on_disk(lm: Any, config: RFTRunConfig) -> None:
    """TRL loads the KL reference model from ``config._name_or_path``; a model built in memory (the tiny test
    models) is saved once into ``RUN/reference`` so that path exists."""
    name = lm.model.config._name_or_path
    if name and Path(name).is_dir():
        return
    folder = Path(config.output_dir) / "reference"
    if config.should_save and not (folder / "config.json").exists():
        lm.model.save_pretrained(folder)
    config.distributed_state.wait_for_everyone()
    lm.model.config._name_or_path = str(folder)


def train_rft(config: RFTRunConfig, task: Any = None, records: Sequence[dict] | None = None,
              callbacks: Sequence[Any] = ()) -> TrainResult:
    """GRPO-train ``config.model`` on ``config.task`` into the run folder ``config.output_dir``.

    ``task`` / ``records`` override the task and the prompts built from the config; ``callbacks`` are extra
    ``TrainerCallback``s (e.g. a live monitor).
    """
    with setup_guard(config):
        trainer, resume_from = build_rft_trainer(config, task, records, callbacks)
        return run_trainer(trainer, config, resume_from, trainer.run_info)

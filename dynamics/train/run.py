"""Run folders, shared by SFT and RFT: the options both add to TRL's configs, config files, the run manifest
and logs, atomic checkpoints with their manifests, and resuming.

A run folder (``RUN``) holds::

    manifest.json        command, config, base model, data hash, versions, start/end times, status
    metrics.jsonl        one row per logging step (see callbacks.MetricsCallback)
    eval.jsonl           in-run evaluation summaries (callbacks.EvalCallback); eval.parquet per item
    rollouts.jsonl       RFT rollouts as records with step, reward, advantage
    monitor.jsonl        the live interference monitor's rows (train.monitor), with ``monitor``
    checkpoint-STEP/     model or peft adapter, tokenizer/processor, trainer_state.json, rng state,
                         optimizer.pt + scheduler.pt (per ``optimizer_state``), manifest.json

A checkpoint is written into ``RUN/.staging/`` and renamed into place once complete (``manifest.json`` is its
last file), so ``RUN/checkpoint-*`` folders are always whole. ``resume`` restarts from the newest one with the
optimizer, scheduler, RNG and data-order state that transformers' ``Trainer`` saved, and drops log rows past it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from dynamics.data import content_hash, data_hash
from dynamics.errors import DynamicsError, check_bounds
from dynamics.store import (
    check_folder,
    input_file,
    read_jsonl_rows,
    removed_on_error,
    versions,
    write_json,
    write_jsonl,
)

RUN_FORMAT = 1
STAGING = ".staging"
RUN_LOGS = ("metrics.jsonl", "eval.jsonl", "rollouts.jsonl", "monitor.jsonl")
OPTIMIZER_FILES = ("optimizer.pt", "scheduler.pt")


@dataclass
class RunOptions:
    """Options ``dynamics`` adds to TRL's ``SFTConfig`` / ``GRPOConfig`` (mixed in before them), and the TRL
    defaults it changes to suit CPU runs (no gradient checkpointing, fp32 unless ``bf16``, log every step,
    checkpoints only on the ``checkpoint_schedule``, no external loggers)."""

    model: str = field(default="default", metadata={"help": "Spec of the model to train (see dynamics models)."})
    model_dtype: str = field(default="float32", metadata={"help": "dtype the weights are loaded and kept in."})
    lora_r: int = field(default=0, metadata={"help": "Train a LoRA adapter of this rank (0: full fine-tuning)."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default 2 * lora_r)."})
    lora_dropout: float = 0.0
    lora_target_modules: str = field(default="all-linear", metadata={"help": "Comma-separated module names."})
    checkpoint_every: int = field(default=0, metadata={"help": "Save a checkpoint every N optimizer steps."})
    checkpoint_schedule: str | None = field(
        default=None, metadata={"help": "every:N | log:K | steps:A,B,C | none (the last step is always saved)."})
    optimizer_state: str = field(
        default="last", metadata={"help": "Keep optimizer.pt in all checkpoints, the last one only, or none."})
    eval_every: int = field(default=0, metadata={"help": "Evaluate task and probes every N steps (and at 0 and the end)."})
    eval_task: str | None = field(default=None, metadata={"help": "Task whose held-out prompts are evaluated."})
    eval_task_args: str = ""
    eval_data: str | None = field(default=None, metadata={"help": "Task evaluation records (instead of building)."})
    eval_n: int = field(default=50, metadata={"help": "Number of task prompts built for evaluation."})
    eval_seed: int = field(default=1234, metadata={"help": "Seed of the built evaluation prompts (unseen ones)."})
    probes: str | None = field(default=None, metadata={"help": "Probes evaluated during training: a records "
                                                                "file or a built-in suite (default: text / visual)."})
    eval_batch_size: int = 16
    eval_probe_tokens: int = field(default=48, metadata={"help": "Answer budget of probes evaluated in the run."})
    eval_base_from: str | None = field(default=None, metadata={
        "help": "A run folder whose step-0 (base model) evaluation is copied instead of recomputed, when its "
                "model and evaluation inputs are the same as this run's (runs from one base share it)."})
    monitor: str | None = field(default=None, metadata={"help": "Probe records the live interference monitor "
                                                                "forecasts (writes monitor.jsonl)."})
    monitor_refresh: int = field(default=10, metadata={"help": "Recompute the probes' gradients every N steps."})
    monitor_params: str | None = field(default=None, metadata={"help": "Parameters the monitor contracts (linear "
                                                                    "| all | lora | a pattern; default: lora for "
                                                                    "LoRA runs, else linear)."})
    monitor_max_memory: float | None = field(default=None, metadata={
        "help": "GiB the monitor may hold its probe gradients materialised in (default 8; the rest stay in the "
                "slower ghost form). 32 probes of the default model take 6.3 GiB in bf16, 12.7 in fp32."})
    monitor_dtype: str = field(default="auto", metadata={
        "help": "The monitor's probe store: float32 | bfloat16 | auto (the gradients' dtype, or bfloat16 where that "
                "would not fit --monitor-max-memory: 0.3% kernel error, 2-3x faster than the ghost form)."})
    resume: bool = field(default=False, metadata={"help": "Continue the run in output_dir from its newest checkpoint."})
    overwrite: bool = field(default=False, metadata={"help": "Delete an existing run in output_dir first."})

    # TRL / transformers defaults changed (for CPU runs, and for the CLI)
    activation_checkpointing: bool | None = False
    gradient_checkpointing: bool | None = None  # deprecated alias of activation_checkpointing in transformers 5
    bf16: bool | None = False
    logging_steps: float = 1
    save_strategy: str = "no"
    report_to: str | list[str] | None = "none"
    dataloader_pin_memory: bool = False
    disable_tqdm: bool | None = False  # the progress bar whatever transformers' log level (the CLI sets error)


def run_options_post_init(config: Any) -> None:
    """Checks shared by the run configs (called from their ``__post_init__``)."""
    from dynamics.train.schedules import parse_schedule

    if config.optimizer_state not in ("all", "last", "none"):
        raise DynamicsError("optimizer_state must be all, last or none", field="optimizer_state")
    if config.checkpoint_every and config.checkpoint_schedule:
        raise DynamicsError("give checkpoint_every or checkpoint_schedule, not both", field="checkpoint_schedule")
    parse_schedule(config.checkpoint_schedule, config.checkpoint_every)
    if config.lora_r < 0:
        raise DynamicsError("lora_r must be >= 0", field="lora_r")
    check_bounds(config, {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "eval_batch_size": 1,
                          "eval_probe_tokens": 1, "checkpoint_every": 0, "eval_every": 0, "eval_n": 0,
                          "learning_rate": 0})
    if config.max_steps == 0 or config.max_steps < -1:
        raise DynamicsError(f"max_steps must be >= 1 (or -1: num_train_epochs decides), got {config.max_steps}",
                            field="max_steps")
    if config.max_steps == -1 and not config.num_train_epochs > 0:
        raise DynamicsError(f"num_train_epochs must be > 0, got {config.num_train_epochs}", field="num_train_epochs")
    if config.monitor:  # the monitor's options are checked before any work
        from dynamics.train.monitor import monitor_config

        monitor_config(config)
    if not torch.cuda.is_available():
        config.use_cpu = True  # CPU bf16 autocast, and gloo DDP under `accelerate launch --multi_gpu` / torchrun


# ------------------------------------------------------------------------------------------------ config files
def read_config_file(path: str | os.PathLike) -> dict:
    """A YAML or JSON mapping of option names (``-`` or ``_``) to values."""
    import yaml

    class Loader(yaml.SafeLoader):
        """PyYAML's YAML 1.1 reads ``1e-4`` (no dot) as a string; YAML 1.2 and JSON read a number."""

    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                 list("-+0123456789."))
    path = input_file(path, "config file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # YAML is a superset of JSON
    except yaml.YAMLError as e:
        raise DynamicsError(f"not valid YAML/JSON: {str(e).splitlines()[0]}", file=path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DynamicsError(f"expected a mapping of option names to values, got {type(data).__name__}", file=path)
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def load_config(cls: type, path: str | os.PathLike | None = None, **overrides: Any) -> Any:
    """Build a run config from an optional config file, then ``overrides`` that are not None (CLI flags).

    Every field of ``cls`` -- all of TRL's and transformers' training options -- can be set in the file. A bad
    value is reported where it came from: the file and its field, or the override's field without the file (the
    CLI names the flag that set it)."""
    values = read_config_file(path) if path else {}
    names = {f.name for f in fields(cls) if f.init}
    for key in values:
        if key not in names:
            raise DynamicsError(f"unknown option {key!r} for {cls.__name__}", file=path, field=key)
    given = {k: v for k, v in overrides.items() if v is not None}
    values.update(given)
    try:
        return cls(**values)
    except DynamicsError as e:
        if e.field in given:  # set by an override, not by the file
            raise DynamicsError(e.message, field=e.field) from None
        raise DynamicsError(e.message, file=path, field=e.field) from None
    except (ValueError, TypeError) as e:
        raise DynamicsError(str(e).splitlines()[0], file=path) from None


# -------------------------------------------------------------------------------------------------- run folder
def complete_checkpoints(run: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the run's whole checkpoints (with manifest and trainer state), in step order."""
    run = Path(run)
    out = []
    for p in run.glob("checkpoint-*") if run.is_dir() else []:
        suffix = p.name.split("-", 1)[1]
        if suffix.isdigit() and (p / "manifest.json").is_file() and (p / "trainer_state.json").is_file():
            out.append((int(suffix), p))
    return sorted(out)


def _truncate_log(path: Path, last_step: int) -> None:
    """Keep the rows up to ``last_step`` (a torn last line of a killed writer goes too)."""
    write_jsonl(path, [r for r in read_jsonl_rows(path) if r.get("step", 0) <= last_step])


def _truncate_eval_items(path: Path, last_step: int) -> None:
    if path.exists():
        import pandas as pd

        df = pd.read_parquet(path)
        df[df["step"] <= last_step].to_parquet(path, index=False)


def prepare_run(config: Any) -> Path | None:
    """Make ``config.output_dir`` ready to train into; return the checkpoint to resume from, if any.

    A folder that already holds a run needs ``resume`` (continue from its newest complete checkpoint; log rows
    past that step are dropped, as are leftovers of an interrupted checkpoint write) or ``overwrite``.
    """
    if not config.output_dir:
        raise DynamicsError("no run folder given", field="output_dir")
    run = Path(config.output_dir)
    ckpts = complete_checkpoints(run)
    resume_from = ckpts[-1][1] if (config.resume and ckpts) else None
    if config.should_save:  # the main process prepares the folder, the others wait
        check_folder(run)
        nonempty = run.is_dir() and any(run.iterdir())
        if nonempty and not ((run / "manifest.json").exists() or ckpts):
            raise DynamicsError("the folder is not empty and holds no run: choose another run folder", file=run)
        if nonempty and not config.resume:
            if not config.overwrite:
                raise DynamicsError("the run folder already holds a run: pass --resume to continue it or "
                                    "--overwrite to start over", file=run)
            shutil.rmtree(run)
        run.mkdir(parents=True, exist_ok=True)
        if not (run / "manifest.json").exists():  # marks the folder as a run from the start
            write_json(run / "manifest.json", {"format": RUN_FORMAT, "status": "preparing", "started": now()})
        shutil.rmtree(run / STAGING, ignore_errors=True)
        last = ckpts[-1][0] if resume_from else -1  # a fresh start keeps no log rows
        for name in RUN_LOGS:
            if (run / name).exists():
                _truncate_log(run / name, last)
        _truncate_eval_items(run / "eval.parquet", last)
        if config.resume:  # checkpoints past the resume point cannot exist, but half-written ones may
            for p in run.glob("checkpoint-*"):
                if p not in {c for _, c in ckpts}:
                    shutil.rmtree(p)
    config.distributed_state.wait_for_everyone()
    return resume_from


def data_fingerprint(path: str | os.PathLike | None, records: Sequence[dict] | None = None) -> str:
    """:func:`dynamics.data.data_hash` of a data file, or :func:`dynamics.data.content_hash` of records built in
    memory (SHA-256 of their canonical JSON and of the images they name)."""
    return data_hash(path) if path is not None else content_hash(records or [])


def base_model_spec(spec: str, lm: Any) -> str:
    """The spec that :func:`dynamics.models.load_model` needs to rebuild what a checkpoint's weights sit on:
    folders as absolute paths; for a peft adapter being trained further, the adapter's own base model."""
    if lm.is_peft:
        manifest = Path(spec) / "manifest.json"
        if manifest.exists():
            return json.loads(manifest.read_text())["base_model"]
        return lm.model.peft_config["default"].base_model_name_or_path
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def config_dict(config: Any) -> dict:
    """The config as plain JSON values (transformers' ``to_dict`` hides tokens and flattens enums)."""
    return json.loads(json.dumps(config.to_dict(), default=str))


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class RunInfo:
    """What the run folder and every checkpoint manifest record about the run."""

    kind: str
    base_model: str
    init_model: str
    data: dict
    config: dict
    lora: bool

    def manifest(self, **extra: Any) -> dict:
        return {"format": RUN_FORMAT, "kind": self.kind, "base_model": self.base_model,
                "init_model": self.init_model, "lora": self.lora, "data": self.data,
                "data_hash": self.data.get("sha256"), "config": self.config, "versions": versions(), **extra}


def start_run(config: Any, kind: str, records: Sequence[dict], **data: Any) -> tuple[Any, RunInfo, Path | None]:
    """Prepare the run folder, load the model to train and describe the run: ``(lm, info, resume_from)``.

    ``records`` are the training data (read from ``config.data`` or built in memory); ``data`` adds fields to
    the manifest's ``data`` entry (e.g. the task)."""
    from dynamics.models import load_model

    resume_from = prepare_run(config)
    lm = load_model(config.model, dtype=config.model_dtype, trainable=True)
    if config.lora_r and lm.is_peft:
        raise DynamicsError("the model is already a LoRA adapter; drop --lora to train it further", field="lora_r")
    info = RunInfo(
        kind=kind, base_model=base_model_spec(config.model, lm), init_model=config.model,
        data={"path": str(Path(config.data).resolve()) if config.data else None, "n": len(records), **data,
              "sha256": data_fingerprint(config.data, None) if config.data else data_fingerprint(None, records)},
        config=config_dict(config), lora=bool(config.lora_r) or lm.is_peft)
    return lm, info, resume_from


def setup_guard(config: Any) -> contextlib.AbstractContextManager:
    """A run that fails on the user's input before it produced anything (in its set-up: model, data, trainer,
    monitor; or as training starts: the step-0 evaluation) leaves no run folder behind, if it made it. A run that
    wrote a checkpoint or a log row is kept; only the main process removes."""
    def produced(run: Path) -> bool:
        logged = any((run / name).is_file() and (run / name).stat().st_size for name in RUN_LOGS)
        return not config.should_save or logged or bool(complete_checkpoints(run))

    return removed_on_error(config.output_dir, produced)


def lora_config(config: Any) -> Any:
    """A peft ``LoraConfig`` from ``lora_r``/``lora_alpha``/``lora_dropout``/``lora_target_modules``."""
    from peft import LoraConfig

    targets = config.lora_target_modules
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha or 2 * config.lora_r,
                      lora_dropout=config.lora_dropout, task_type="CAUSAL_LM",
                      target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")])


# ------------------------------------------------------------------------------------------------ the trainer
class RunTrainerMixin:
    """Atomic, manifest-carrying checkpoints for a TRL trainer (listed before ``SFTTrainer``/``GRPOTrainer``).

    ``Trainer._save_checkpoint`` writes into ``RUN/.staging/checkpoint-STEP`` (redirected through
    ``_get_output_dir``); the main process then adds the full processor (image processor included) and
    ``manifest.json`` and renames the folder to ``RUN/checkpoint-STEP``.
    """

    run_info: RunInfo
    run_processing_class: Any
    _staging: bool = False

    def _get_output_dir(self, trial: Any) -> str:
        out = super()._get_output_dir(trial)
        return os.path.join(out, STAGING) if self._staging else out

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        step = self.state.global_step
        run = Path(self.args.output_dir)
        staged, final = run / STAGING / f"checkpoint-{step}", run / f"checkpoint-{step}"
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self.run_processing_class.save_pretrained(staged)
            policy = self.args.optimizer_state
            if policy == "none":
                for name in OPTIMIZER_FILES:
                    (staged / name).unlink(missing_ok=True)
            write_json(staged / "manifest.json", self.run_info.manifest(step=step, time=now()))
            if final.exists():
                shutil.rmtree(final)
            os.replace(staged, final)
            with contextlib.suppress(OSError):
                staged.parent.rmdir()
            if policy == "last":  # only the newest checkpoint keeps the (large) optimizer state
                for s, folder in complete_checkpoints(run):
                    if s != step:
                        for name in OPTIMIZER_FILES:
                            (folder / name).unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()


@dataclass
class TrainResult:
    """What a training call produced: the run folder, its checkpoints, timing and the last logged rows."""

    run: Path
    steps: int
    seconds: float
    checkpoints: list[int]
    metrics: dict
    eval: dict | None
    main_process: bool = True

    @property
    def s_per_step(self) -> float:
        return self.seconds / max(self.steps, 1)


def changed_options(before: dict, after: dict) -> dict[str, list]:
    """``{option: [before, after]}`` for the run options a resume changes (``resume`` / ``overwrite`` aside): the
    manifest keeps only the latest config, so each resume entry records what it changed."""
    return {k: [before.get(k), v] for k, v in after.items()
            if k not in ("resume", "overwrite") and before.get(k) != v}


def run_trainer(trainer: Any, config: Any, resume_from: Path | None, info: RunInfo) -> TrainResult:
    """Train with the run folder's manifest kept up to date (status running / completed / interrupted)."""
    run = Path(config.output_dir)
    manifest_path = run / "manifest.json"
    previous = json.loads(manifest_path.read_text()) if (resume_from and manifest_path.exists()) else {}
    current = {"kind": info.kind, "base_model": info.base_model, "data_hash": info.data.get("sha256")}
    for key, value in current.items():  # resuming with another model or data would not continue the same run
        if key in previous and previous[key] != value:
            raise DynamicsError(f"cannot resume: the run's {key} was {previous[key]!r}, now it is {value!r}",
                                file=manifest_path, field=key)
    resumes = previous.get("resumes", [])
    if resume_from:
        changed = changed_options(previous.get("config", {}), info.config)
        resumes = resumes + [{"from": resume_from.name, "time": now(), "changed": changed}]
        if changed and config.should_save:  # one line, from the main process
            print(f"{run}: resuming from {resume_from.name} with changed options: "
                  + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()), file=sys.stderr)
    if config.bf16 and config.use_cpu and config.should_save:
        from dynamics.models import BF16_EMULATED, native_bf16

        if not native_bf16("cpu"):
            print(f"{run}: {BF16_EMULATED}: --no-bf16 trains faster", file=sys.stderr)
    manifest = info.manifest(command=sys.argv, started=previous.get("started", now()), status="running",
                             resumes=resumes)
    if config.should_save:
        write_json(manifest_path, manifest)
    start_step = int(resume_from.name.split("-")[1]) if resume_from else 0
    from dynamics.train.callbacks import compact_progress

    compact_progress(trainer)
    t0 = time.perf_counter()
    try:
        out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except BaseException:
        if config.should_save:
            write_json(manifest_path, {**manifest, "status": "interrupted", "ended": now(),
                                       "last_checkpoint": (complete_checkpoints(run) or [(0, Path(""))])[-1][0]})
        raise
    seconds = time.perf_counter() - t0
    steps = trainer.state.global_step - start_step
    if config.should_save:
        write_json(manifest_path, {**manifest, "status": "completed", "ended": now(),
                                   "steps": trainer.state.global_step,
                                   "timings": {"train_s": round(seconds, 3),
                                               "s_per_step": round(seconds / max(steps, 1), 4)},
                                   "train_metrics": out.metrics})
    metrics = read_jsonl_rows(run / "metrics.jsonl")
    evals = read_jsonl_rows(run / "eval.jsonl")
    return TrainResult(run=run, steps=steps, seconds=seconds, checkpoints=[s for s, _ in complete_checkpoints(run)],
                       metrics=metrics[-1] if metrics else {}, eval=evals[-1] if evals else None,
                       main_process=config.should_save)

"""``dynamics select``: choose training data that preserves prior knowledge.

Every training sample u is scored by its predicted interference with the probes o, from the kernel
K(o, u) = ⟨∇log π(y_o|x_o), ∇log π(y_u|x_u)⟩ (:mod:`dynamics.influence`): one SGD step of size η on u changes
the probes' mean log-likelihood by η·mean_o K(o, u), so

* ``drop-harmful`` drops the samples with the most negative mean kernel (largest predicted loss of prior
  knowledge, which grows with both the gradient's magnitude and its misalignment) until the budget is met;
* ``keep-aligned`` keeps the samples whose gradients point most along the probes' (highest mean cosine),
  whatever their magnitude;
* ``simulate-rollouts`` does what the study suggests: replaces each gold completion by one of the model's own
  correct samples for the same prompt (scored by the task's reward), so the data sit where the model already
  puts probability; prompts without a correct sample keep their gold answer; then, if the budget is smaller
  than the set, drops the most harmful as above.

The kernels are computed at ``model``, or read from a stored ``dynamics influence`` table (``from_influence``: its
checkpoint at training step ``step``, by default the earliest), so that a large set is scored once -- sharded,
resumable, on several processes -- and selected from many times. The kept records are written to ``out``; a table next to it
(``<out>.decisions.parquet``) explains each decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dynamics.analyses.loader import InfluenceSet, per_train_sample
from dynamics.errors import DynamicsError, check_bounds
from dynamics.influence import InfluenceConfig, Probes, encode_probes, encode_train
from dynamics.store import atomic_path, check_file

STRATEGIES = ("drop-harmful", "keep-aligned", "simulate-rollouts")


@dataclass
class SelectConfig:
    """Options of ``dynamics select`` (and :func:`select`)."""

    data: str
    out: str
    probes: str | None = None  # needed unless from_influence (then checked against the table's probes if given)
    budget: str = "0.5"  # number of samples to keep, or a fraction of the set
    strategy: str = "drop-harmful"
    model: str = "default"
    # the answer's own tokens: the end-of-turn that every sample shares would otherwise weigh in every score
    influence: InfluenceConfig = field(default_factory=lambda: InfluenceConfig(tokens="content"))
    task: str = "jigsaw"  # simulate-rollouts: the task whose reward judges a sample correct
    task_args: str = ""
    samples: int = 8
    temperature: float = 1.0
    seed: int = 0
    from_influence: str | None = None  # a `dynamics influence` output (folder or influence.parquet) to rank by
    step: int | None = None  # with from_influence: the training step of the table's checkpoint (default: earliest)

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise DynamicsError(f"strategy must be one of {', '.join(STRATEGIES)}", field="strategy")
        if self.from_influence and self.strategy == "simulate-rollouts":
            raise DynamicsError("simulate-rollouts replaces the samples, so their kernels are not in a stored table",
                                field="from_influence")
        if not (self.probes or self.from_influence):
            raise DynamicsError("needs probes, or from_influence (a stored `dynamics influence` table)",
                                field="probes")
        if self.step is not None and not self.from_influence:
            raise DynamicsError("step picks a checkpoint of from_influence's table, which is not given", field="step")
        check_bounds(self, {"samples": 1, "temperature": 0, "step": 0})  # temperature 0: greedy
        self.influence.validate()


def parse_budget(budget: str | float | int, n: int) -> int:
    """``"200"`` keeps 200 samples, ``"0.25"`` a quarter of ``n``."""
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise DynamicsError(f"budget must be a count or a fraction, got {budget!r}", field="budget") from None
    if value <= 0 or (value > 1 and value != int(value)):
        raise DynamicsError(f"budget must be a positive count or a fraction in (0, 1], got {budget!r}",
                            field="budget")
    keep = round(value * n) if value <= 1 and "." in str(budget) else int(value)
    return max(1, min(n, keep))


def stored_scores(config: SelectConfig, records: list[dict]) -> pd.DataFrame:
    """:func:`per_train_sample` rows of ``config.from_influence``'s table at the checkpoint of step ``config.step``
    (default the earliest), reduced as the table is read (a table larger than memory is fine), checked to hold
    every training record, as the sample it was computed on, and, if ``config.probes`` is given, to be of those
    probes."""
    from dynamics.data import data_hash, record_line

    path = Path(config.from_influence)
    stored = InfluenceSet(path.name, path.parent if path.suffix == ".parquet" else path)
    if config.probes and stored.manifest.get("probes_sha256") != data_hash(config.probes):
        raise DynamicsError(f"the table at {stored.path} was computed on other probes than these", file=config.probes)
    scores = stored.per_sample_at(config.step)
    ckpt = scores["ckpt"].iloc[0]
    have = set(scores["train_id"])
    stored.check_samples(records, config.data)  # the table's file, or the same samples (a subset of it, say)
    missing = [r["id"] for r in records if r["id"] not in have]
    if missing:
        raise DynamicsError(f"sample {missing[0]!r} has no kernels in {stored.path} at {ckpt}", file=config.data,
                            line=record_line(config.data, missing[0]), field="id")
    return scores


def _simulate(lm, records: list[dict], config: SelectConfig) -> tuple[list[dict], dict[str, str]]:
    """Replace gold completions by the model's own correct samples; returns records and a reason per id."""
    from dynamics.tasks import get_task, parse_task_args
    from dynamics.train.rollouts import keep_rollouts, sample_rollouts

    task = get_task(config.task, **parse_task_args(config.task_args))
    rollouts = sample_rollouts(lm, task, records, samples=config.samples, temperature=config.temperature,
                               seed=config.seed)
    correct: dict[str, dict] = {}
    for r in keep_rollouts(rollouts, "correct"):
        correct.setdefault(r["meta"]["prompt_id"], r)
    out, reasons = [], {}
    for rec in records:
        if rec["id"] in correct:
            out.append({**rec, "completion": correct[rec["id"]]["completion"],
                        "meta": {**rec.get("meta", {}), "gold_completion": rec["completion"], "source": "self"}})
            reasons[rec["id"]] = "gold answer replaced by the model's own correct sample"
        else:
            out.append(rec)
            reasons[rec["id"]] = f"no correct sample in {config.samples}: gold answer kept"
    return out, reasons


def select(config: SelectConfig, lm=None) -> tuple[Path, pd.DataFrame]:
    """Score, rank and keep training samples; write the kept records and the decision table."""
    from dynamics.data import naming_records, read_records, write_records
    from dynamics.models import load_model

    config.validate()
    out = check_file(config.out)
    records = read_records(config.data)
    keep_n = parse_budget(config.budget, len(records))
    reasons: dict[str, str] = {}
    if config.from_influence:
        scores = stored_scores(config, records)
    else:
        probes = read_records(config.probes)
        lm = lm or load_model(config.model, dtype=config.influence.dtype, device=config.influence.device)
        if config.strategy == "simulate-rollouts":
            # the probes, and the samples with their gold answers (kept where no sample is correct), are checked
            # before any rollout is sampled
            with naming_records(config.probes):
                encode_probes(lm, probes, config.influence)
            with naming_records(config.data):
                encode_train(lm, records, config.influence)
                records, reasons = _simulate(lm, records, config)
        with naming_records(config.probes):  # an error while encoding the probes names the probe file
            side = Probes(lm, probes, config.influence, records)
        with naming_records(config.data):
            scores = per_train_sample(side.table(records, lm.name, 0))
    # per sample: mean kernel, mean |kernel| and mean cosine over probes, and its gradient norm
    table = scores.set_index("train_id").loc[
        [r["id"] for r in records], ["mean_kernel", "mean_abs_kernel", "mean_cosine", "train_norm"]]
    if config.strategy == "keep-aligned":
        order = table.sort_values("mean_cosine", ascending=False).index
        why_drop = "gradient less aligned with the probes' (lower mean cosine)"
    else:
        order = table.sort_values("mean_kernel", ascending=False).index
        why_drop = "largest predicted loss of probe log-likelihood (most negative mean kernel)"
    kept = set(order[:keep_n])
    table["rank"] = pd.Series(range(1, len(order) + 1), index=order)
    table["decision"] = ["kept" if i in kept else "dropped" for i in table.index]
    table["reason"] = [reasons.get(i, "within budget") if i in kept else why_drop for i in table.index]
    table["ckpt"] = scores["ckpt"].iloc[0]  # the model whose kernels ranked the samples
    table = table.reset_index(names="train_id")
    write_records(out, [r for r in records if r["id"] in kept])
    with atomic_path(decisions_path(out)) as tmp:
        table.to_parquet(tmp, index=False)
    return out, table


def decisions_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".decisions.parquet")

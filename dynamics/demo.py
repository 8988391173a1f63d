"""``dynamics demo``: the study of arXiv 2506.23508 end to end on the embedded model, in minutes on 2 CPU cores.

Every stage calls the library function its command calls, and writes what that command writes, under ``OUT``::

    probes.jsonl                 probes the base model answers correctly (its own responses stored)   probes build
    data/train.jsonl, heldout.jsonl  jigsaw puzzles (gold answers) for training and held-out evaluation    data jigsaw
    runs/sft, runs/rft           SFT on gold answers; RFT (GRPO) on the task's rewards, same prompts    train sft|rft
    data/rollouts.jsonl          the RFT-trained model's own samples on the training prompts,          rollouts
                                 correct ones kept (the study's simulated rollouts)
    runs/sft-rollouts            SFT on those rollouts                                                  train sft
    variants/...                 (full) SFT on rollouts of the base model; SFT on a select-ed gold set  rollouts, select
    influence/<label>            each training set's kernel on the probes, at the base model and at     influence
                                 its run's checkpoints
    compare/                     the training sets compared under the base model (log p, influence)    compare
    figures/                     every figure and findings.json                                         figures
    report.md, report.html       each claim of the study: what this run measured, and whether it held

Every run starts from the same base model with the same optimiser, batch size, number of steps, checkpoints and
evaluation, so the runs differ only in their data (and, for RFT, the algorithm that makes it). A stage is skipped
when ``OUT/demo.json`` records it as done with the same plan and inputs (``force`` reruns everything); a run that
was interrupted resumes from its newest checkpoint.
"""

from __future__ import annotations

import gc
import hashlib
import json
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from dynamics.errors import DynamicsError
from dynamics.store import make_folder, versions, write_json

DEMO_FORMAT = 1
INFLUENCE_MEMORY_GB = 3.0  # probe-store budget of each influence computation (the rest stays in ghost form)


@dataclass
class DemoPlan:
    """Sizes and hyperparameters of one demo configuration (see :data:`PLANS` and :data:`WHY`)."""

    model: str = "default"
    task_args: str = "preset=text"
    probe_suite: str = "text"  # built-in suite (text, or visual for VLMs) or a probes file
    probe_pool: int | None = 48  # built-in probes scored by the base model (an even sample; None: all)
    keep_correct: bool = True  # probes: keep what the base model answers correctly
    n_probes: int = 12  # probes used by the study (an even sample per category of those kept)
    n_train: int = 32  # training prompts: gold answers for SFT, the same prompts for RFT and rollouts
    n_eval: int = 8  # held-out prompts evaluated during training
    steps: int = 4  # optimizer steps of every run
    batch: int = 8  # samples per SFT step (RFT: rft_prompts x group completions)
    sft_lr: float = 2e-4
    rft_lr: float = 2e-5
    rft_prompts: int = 1  # prompts per GRPO step
    group: int = 8  # GRPO group size
    temperature: float = 0.7  # sampling temperature of GRPO and of the simulated rollouts
    eval_every: int = 4
    checkpoints: str = "none"  # extra checkpoints of every run (the last step is always saved)
    rollout_samples: int = 4  # simulated rollouts: samples per training prompt
    rollout_keep: str = "correct"
    influence_n: int = 4  # training samples per set in the influence analysis
    seeds: int = 1
    base_rollouts: bool = False  # variant: SFT on rollouts sampled from the base model
    select: bool = False  # variant: SFT on the gold set pruned by `dynamics select` (drop-harmful, half)
    monitor: bool = False  # the live interference monitor on the SFT run
    bf16: bool | None = None  # bf16 autocast; None: where the machine computes bf16 natively (models.native_bf16)
    max_new_tokens: int = 24  # probe answers (building the probes and evaluating them)


PLANS: dict[str, DemoPlan] = {
    "quick": DemoPlan(),
    "full": DemoPlan(probe_pool=120, n_probes=32, n_train=48, n_eval=16, steps=12, eval_every=6,
                     rollout_samples=8, influence_n=12, select=True, monitor=True),
    "vlm": DemoPlan(model="tiny-qwen2.5-vl", task_args="preset=image-direct,patch_size=28", probe_suite="visual",
                    probe_pool=None,
                    keep_correct=False, n_probes=8, n_train=16, n_eval=8, steps=4, batch=4, sft_lr=1e-3,
                    rft_lr=1e-3, group=4, eval_every=2, rollout_samples=2, rollout_keep="all", influence_n=4,
                    bf16=False, max_new_tokens=8),
}

# why the defaults are what they are (printed in the report)
WHY = [
    "The text jigsaw with three pieces (preset `text`): the base model is near chance (greedy about 25%, chance "
    "20%) and samples at temperature 0.7 are right about 10% of the time (5% at temperature 1), with a correct "
    "sample for about a third of the prompts in 8, so GRPO has a reward signal and the simulated rollouts exist; "
    "with four pieces, or without the worked example, the base model finds almost no correct sample.",
    "Probes are those the base model answers correctly, so any drop is forgetting; their continuous measure is "
    "the per-token log p of the base model's own responses, which tracks forgetting when short gold answers do not.",
    "Every run has the same steps, samples per step (SFT batch 8; GRPO 1 prompt x 8 completions), optimiser "
    "(AdamW, constant learning rate), checkpoints and evaluation. Learning rates are per method as in practice: "
    "GRPO's policy-gradient steps take a smaller one (SFT's is high enough to move the model within a few "
    "steps). Training and sampling run under bf16 autocast where the machine computes bf16 natively (a GPU, or a "
    "CPU with AVX512-BF16 or AMX), in fp32 elsewhere, where emulated bf16 is slower than fp32 (the `bf16` row "
    "below). On 2 CPU cores a bf16 step costs 7-14 s (SFT) and 10-15 s (GRPO) on these 190-token prompts, so runs "
    "are short: shorter than SFT needs to learn the jigsaw well (about 75 steps on a 4-piece variant), long "
    "enough for forgetting and for the influence measures.",
    "Simulated rollouts are sampled from the RFT-trained model (as in the study) on the training prompts and "
    "filtered to the correct ones (`--base-rollouts` adds SFT on the base model's own correct samples as a "
    "variant). With this direct-answer preset a correct rollout is mostly the gold answer "
    "string itself, so SFT on rollouts differs from SFT on gold answers in which prompts it trains on (those the "
    "model already solves) rather than in wording; the `text-think` preset gives rollouts their own wording at "
    "several times the cost.",
    "Influence uses the summed completion log-likelihood over all completion tokens (the study's measure), at "
    "the base model and at each run's last checkpoint, on an even sample of each training set; RFT's samples are "
    "the rollouts its first steps trained on that carry a gradient (non-zero advantage).",
    "`--quick` is a smoke run of the whole pipeline (4 steps, a few dozen probes and prompts): its intervals are "
    "wide and most claims come out inconclusive. The full plan adds the `select` variant and the live monitor.",
    "The full plan fits its 20-minute budget on 2 cores with 12 steps and an evaluation every 6 (at 0, 6 and 12): "
    "an evaluation of 16 prompts and 32 probes costs about 22 s in fp32, as much as two SFT steps, and every run "
    "after the first copies the base evaluation (all start from the same weights). At 16 steps with an "
    "evaluation every 4 (26 minutes) the forgetting claims came out the same: SFT's probe log p fell 0.28 "
    "nats/token by step 12 and 0.31 by step 16, RFT's did not move.",
]


@dataclass
class DemoConfig:
    """``dynamics demo``: where, which plan (``quick``, ``vlm`` or full), and overrides of the plan."""

    out: str = "demo-out"
    quick: bool = False
    vlm: bool = False
    force: bool = False
    seeds: int | None = None
    base_rollouts: bool = False  # add the variant: SFT on rollouts sampled from the base model
    progress: bool = True
    plan: DemoPlan | None = None  # overrides the named plan (tests)

    def resolved(self) -> tuple[str, DemoPlan]:
        name = "vlm" if self.vlm else "quick" if self.quick else "full"
        plan = self.plan or PLANS[name]
        if self.seeds is not None:
            if self.seeds < 1:
                raise DynamicsError("seeds must be >= 1", field="seeds")
            plan = replace(plan, seeds=self.seeds)
        if self.base_rollouts:
            plan = replace(plan, base_rollouts=True)
        if plan.bf16 is None:
            from dynamics.models import native_bf16

            plan = replace(plan, bf16=native_bf16())
        return name, plan


@dataclass
class Demo:
    """State of one demo folder: its plan, stage records (``demo.json``) and timings."""

    out: Path
    name: str
    plan: DemoPlan
    force: bool
    progress: bool
    state: dict = field(default_factory=dict)
    log: Callable[[str], None] = print
    fresh: bool = False  # the running stage must start over (its inputs changed, or force)

    @property
    def state_path(self) -> Path:
        return self.out / "demo.json"

    def key(self, stage: str, *inputs: Path) -> str:
        """What a stage's result depends on: the plan, the stage and its input files' contents."""
        h = hashlib.sha256(json.dumps([asdict(self.plan), stage], sort_keys=True).encode())
        for p in inputs:
            h.update(p.read_bytes() if p.is_file() else str(p).encode())
        return h.hexdigest()[:16]

    def stage(self, name: str, fn: Callable[[], Any], *inputs: Path, outputs: Sequence[Path] = ()) -> None:
        """Run ``fn`` unless ``demo.json`` records ``name`` as done with the same key and its ``outputs`` are all
        still there (a result deleted since is made again, and the stages that read it follow: their inputs are
        its files, or its run's last manifest, :meth:`final`); record its time."""
        key = self.key(name, *inputs)
        done = self.state.setdefault("stages", {}).get(name)
        if done and done.get("key") == key and not self.force and all(p.exists() for p in outputs):
            self.log(f"[dim]{name}: cached ({done['seconds']:.0f} s when run)[/dim]")
            done["cached"] = True
            return
        self.log(f"[bold]{name}[/bold] ...")
        self.fresh = self.force or bool(done)  # no record: a first or interrupted attempt, which resumes
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        self.state["stages"][name] = {"key": key, "seconds": round(seconds, 1), "cached": False,
                                      "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json(self.state_path, self.state)
        self.log(f"{name}: {seconds:.0f} s")

    def final(self, run: Path) -> Path:
        """The manifest of a run's last checkpoint (written last: the run is complete when it is there)."""
        return run / f"checkpoint-{self.plan.steps}" / "manifest.json"


# --------------------------------------------------------------------------------------------------- stages
def _even_sample(records: list[dict], n: int | None) -> list[dict]:
    """At most ``n`` records, spread evenly over categories (round robin, each category in file order)."""
    if n is None or n >= len(records):
        return list(records)
    by_cat: dict[str, list[dict]] = {}
    for r in records:
        by_cat.setdefault(str((r.get("meta") or {}).get("category", "")), []).append(r)
    out: list[dict] = []
    queues = [list(v) for v in by_cat.values()]
    while len(out) < n:
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def build_probes(demo: Demo) -> None:
    """Score an even sample of the built-in suite with the base model; keep an even sample of what it knows."""
    from dynamics.data import read_records, write_records
    from dynamics.probes import ProbeBuildConfig, build_probes, load_probes

    p = demo.plan
    pool_path = demo.out / "work" / "probe_pool.jsonl"
    pool = load_probes(p.probe_suite, image_dir=demo.out / "work" / "probe_images")
    write_records(pool_path, _even_sample(pool, p.probe_pool), relative_images=True)
    built = demo.out / "work" / "probes_built.jsonl"
    summary = build_probes(ProbeBuildConfig(model=p.model, suite=str(pool_path), keep_correct=p.keep_correct,
                                            max_new_tokens=p.max_new_tokens, progress=demo.progress), built)
    kept = read_records(built)
    if len(kept) < 4:
        raise DynamicsError(f"only {len(kept)} probes kept; the study needs more", field="probes")
    write_records(demo.out / "probes.jsonl", _even_sample(kept, p.n_probes), relative_images=True)
    write_json(demo.out / "probes.summary.json", summary)


def build_data(demo: Demo) -> None:
    """Training prompts with gold answers (seed 0) and unseen evaluation prompts (seed 1234)."""
    from dynamics.data import write_records
    from dynamics.tasks import get_task, parse_task_args

    args = parse_task_args(demo.plan.task_args)
    if "image" in str(args.get("preset", "")) and "image_dir" not in args:
        args["image_dir"] = str(demo.out / "data" / "images")
    task = get_task("jigsaw", **args)
    write_records(demo.out / "data" / "train.jsonl", task.build(demo.plan.n_train, 0), relative_images=True)
    write_records(demo.out / "data" / "heldout.jsonl", task.build(demo.plan.n_eval, 1234), relative_images=True)


def _run_options(demo: Demo, out: Path, seed: int) -> dict[str, Any]:
    """What every run shares: steps, checkpoints, in-run evaluation, bf16, seed; resumes an interrupted run.
    Every run starts from the same base model, so all but the first copy its step-0 evaluation."""
    p = demo.plan
    if demo.fresh and out.exists():
        shutil.rmtree(out)
    first = run_dir(demo, "sft", 0)
    return dict(output_dir=str(out), model=p.model, max_steps=p.steps, seed=seed, bf16=p.bf16,
                eval_base_from=None if out == first else str(first),
                checkpoint_schedule=p.checkpoints, optimizer_state="last", eval_every=p.eval_every,
                eval_data=str(demo.out / "data" / "heldout.jsonl"), probes=str(demo.out / "probes.jsonl"),
                eval_batch_size=16, eval_probe_tokens=p.max_new_tokens, resume=True, lr_scheduler_type="constant", warmup_steps=0,
                disable_tqdm=not demo.progress)


def train_sft(demo: Demo, out: Path, data: Path, seed: int, monitor: bool = False) -> None:
    from dynamics.train.sft import SFTRunConfig, train_sft

    p = demo.plan
    opts = _run_options(demo, out, seed)
    if monitor:
        opts.update(monitor=str(demo.out / "probes.jsonl"), monitor_refresh=p.eval_every)
    train_sft(SFTRunConfig(data=str(data), learning_rate=p.sft_lr, per_device_train_batch_size=p.batch, **opts))


def train_rft(demo: Demo, out: Path, seed: int) -> None:
    from dynamics.train.rft import RFTRunConfig, train_rft

    p = demo.plan
    train_rft(RFTRunConfig(task="jigsaw", task_args=p.task_args, data=str(demo.out / "data" / "train.jsonl"),
                           learning_rate=p.rft_lr, prompts_per_step=p.rft_prompts, num_generations=p.group,
                           temperature=p.temperature, beta=0.0, **_run_options(demo, out, seed)))


def make_rollouts(demo: Demo, model: str, out: Path) -> None:
    """The simulated rollouts: ``rollout_samples`` samples per training prompt from ``model``, correct kept."""
    from dynamics.train.rollouts import RolloutsConfig, make_rollouts

    p = demo.plan
    path, summary = make_rollouts(RolloutsConfig(
        out=str(out), model=model, task="jigsaw", task_args=p.task_args, data=str(demo.out / "data" / "train.jsonl"),
        samples=p.rollout_samples, temperature=p.temperature, seed=0, bf16=p.bf16, keep=p.rollout_keep))
    write_json(out.with_suffix(".summary.json"), {**summary, "model": model})


def select_gold(demo: Demo) -> None:
    """The gold set pruned to half by ``dynamics select`` (drop the samples most harmful to the probes)."""
    from dynamics.influence import InfluenceConfig
    from dynamics.select import SelectConfig, select

    select(SelectConfig(data=str(demo.out / "data" / "train.jsonl"), probes=str(demo.out / "probes.jsonl"),
                        out=str(demo.out / "data" / "train-select.jsonl"), budget="0.5",
                        strategy="drop-harmful", model=demo.plan.model,
                        influence=InfluenceConfig(tokens="content", max_memory_gb=INFLUENCE_MEMORY_GB)))


def influence_sets(demo: Demo) -> dict[str, list[dict]]:
    """Training samples of each source (an even, seeded sample), analysed at the checkpoints of its own run.

    RFT's data are the rollouts its first steps trained on that carry a gradient (non-zero advantage), taken in
    order of generation; SFT's the gold answers; SFT-on-rollouts' the kept simulated rollouts."""
    from dynamics.data import read_records
    from dynamics.train.rollouts import rollouts_from_run

    p = demo.plan
    n = p.influence_n
    rng = random.Random(0)

    def sample(records: list[dict]) -> list[dict]:
        return [records[i] for i in sorted(rng.sample(range(len(records)), min(n, len(records))))]

    logged = rollouts_from_run(run_dir(demo, "rft", 0))
    rft_rollouts = [r for r in logged if abs(r.get("advantage") or 0) > 1e-6] or logged  # (all equal rewards)
    return {"sft": sample(read_records(demo.out / "data" / "train.jsonl")), "rft": rft_rollouts[:n],
            "sft-rollouts": sample(read_records(demo.out / "data" / "rollouts.jsonl"))}


def run_influence(demo: Demo) -> None:
    from dynamics.data import write_records
    from dynamics.influence import InfluenceConfig, InfluenceRun, run

    for label, records in influence_sets(demo).items():
        out = demo.out / "influence" / label
        if demo.fresh and out.exists():
            shutil.rmtree(out)
        train = write_records(out / "train.jsonl", records, relative_images=True)
        ckpts = [demo.plan.model, str(run_dir(demo, label, 0))]
        run(InfluenceRun(ckpts=ckpts, train=str(train), probes=str(demo.out / "probes.jsonl"), out=str(out),
                         config=InfluenceConfig(max_memory_gb=INFLUENCE_MEMORY_GB), resume=True))
        gc.collect()  # the model and probe store of this set go before the next set's are built


def compare_sets(demo: Demo) -> dict[str, Path]:
    """The whole training sets: gold answers, every rollout the RFT run trained on, the simulated rollouts (and
    the base model's rollouts in full mode)."""
    sets = {"sft": demo.out / "data" / "train.jsonl", "rft": run_dir(demo, "rft", 0) / "rollouts.jsonl",
            "sft-rollouts": demo.out / "data" / "rollouts.jsonl"}
    if demo.plan.base_rollouts:
        sets["sft-rollouts-base"] = demo.out / "data" / "rollouts-base.jsonl"
    return sets


def run_compare(demo: Demo) -> None:
    """Base-model log p of every set (paired by prompt where they share prompts) and the influence samples."""
    from dynamics.analyses.compare import CompareConfig, compare

    sets = compare_sets(demo)
    compare(CompareConfig(data=list(sets.values()), labels=list(sets), out=demo.out / "compare",
                          model=demo.plan.model, influence=influence_folders(demo), step=0))


def influence_folders(demo: Demo) -> list[Path]:
    return [demo.out / "influence" / lab for lab in ("sft", "rft", "sft-rollouts")]


def run_figures(demo: Demo) -> None:
    from dynamics.analyses.figures import FiguresConfig, make_figures

    make_figures(FiguresConfig(runs=demo.out, out=demo.out / "figures"))


def run_dir(demo: Demo, label: str, seed: int) -> Path:
    """``OUT/runs/<label>`` (``-seedN`` when the plan has several seeds)."""
    return demo.out / "runs" / (label if demo.plan.seeds == 1 else f"{label}-seed{seed}")


# ------------------------------------------------------------------------------------------------- pipeline
def run_demo(config: DemoConfig, log: Callable[[str], None] = print) -> Path:
    """Run (or reuse) every stage into ``config.out``; return the path of ``report.md``."""
    name, plan = config.resolved()
    out = Path(config.out)
    make_folder(out)
    demo = Demo(out, name, plan, config.force, config.progress, log=log)
    if demo.state_path.is_file() and not config.force:
        demo.state = json.loads(demo.state_path.read_text())
    demo.state.update(format=DEMO_FORMAT, plan_name=name, plan=asdict(plan), versions=versions())
    t0 = time.perf_counter()
    probes, train = out / "probes.jsonl", out / "data" / "train.jsonl"
    heldout, final = out / "data" / "heldout.jsonl", demo.final
    demo.stage("probes", lambda: build_probes(demo), outputs=[probes])
    demo.stage("data", lambda: build_data(demo), outputs=[train, heldout])
    for seed in range(plan.seeds):
        sft, rft = run_dir(demo, "sft", seed), run_dir(demo, "rft", seed)
        demo.stage(f"sft{_seed(plan, seed)}", lambda r=sft, s=seed: train_sft(demo, r, train, s,
                                                                              monitor=plan.monitor and s == 0),
                   probes, train, outputs=[final(sft)])
        demo.stage(f"rft{_seed(plan, seed)}", lambda r=rft, s=seed: train_rft(demo, r, s),
                   probes, train, outputs=[final(rft), rft / "rollouts.jsonl"])
    rft_final = _last_checkpoint(run_dir(demo, "rft", 0))
    rollouts = out / "data" / "rollouts.jsonl"
    demo.stage("rollouts", lambda: make_rollouts(demo, str(rft_final), rollouts), train, rft_final / "manifest.json",
               outputs=[rollouts])
    for seed in range(plan.seeds):
        run = run_dir(demo, "sft-rollouts", seed)
        demo.stage(f"sft-rollouts{_seed(plan, seed)}",
                   lambda r=run, s=seed: train_sft(demo, r, rollouts, s), probes, rollouts, outputs=[final(run)])
    if plan.base_rollouts:
        base_rollouts, run = out / "data" / "rollouts-base.jsonl", out / "variants" / "sft-rollouts-base"
        demo.stage("rollouts-base", lambda: make_rollouts(demo, plan.model, base_rollouts), train,
                   outputs=[base_rollouts])
        demo.stage("sft-rollouts-base", lambda: train_sft(demo, run, base_rollouts, 0), probes, base_rollouts,
                   outputs=[final(run)])
    if plan.select:
        selected, run = out / "data" / "train-select.jsonl", out / "variants" / "sft-select"
        demo.stage("select", lambda: select_gold(demo), probes, train, outputs=[selected])
        demo.stage("sft-select", lambda: train_sft(demo, run, selected, 0), probes, selected,
                   outputs=[final(run)])
    influence = [p / "influence.parquet" for p in influence_folders(demo)]
    demo.stage("influence", lambda: run_influence(demo), probes, train, rollouts,
               run_dir(demo, "rft", 0) / "rollouts.jsonl",
               *(final(run_dir(demo, label, 0)) for label in ("sft", "rft", "sft-rollouts")), outputs=influence)
    samples = out / "compare" / "samples.parquet"
    demo.stage("compare", lambda: run_compare(demo), *compare_sets(demo).values(), *influence, outputs=[samples])
    demo.stage("figures", lambda: run_figures(demo), *sorted(out.glob("runs/*/eval.jsonl")),
               *sorted(out.glob("variants/*/eval.jsonl")), samples, *influence,
               outputs=[out / "figures" / "findings.json"])
    demo.state["total_seconds"] = round(time.perf_counter() - t0, 1)
    write_json(demo.state_path, demo.state)
    from dynamics.analyses.report import write_report

    return write_report(out, demo.state, WHY)


def _seed(plan: DemoPlan, seed: int) -> str:
    return "" if plan.seeds == 1 else f"-seed{seed}"


def _last_checkpoint(run: Path) -> Path:
    from dynamics.train.run import complete_checkpoints

    ckpts = complete_checkpoints(run)
    if not ckpts:
        raise DynamicsError("the RFT run has no checkpoint", file=run)
    return ckpts[-1][1]


"""``dynamics influence``: per-sample gradient influence of training samples on probes."""

from __future__ import annotations

from pathlib import Path

import typer

from dynamics.cli.app import app, console


@app.command("influence")
def influence(
    ckpt: list[str] = typer.Option(..., "--ckpt", help="Model spec, checkpoint folder or run folder (repeatable)."),
    train: Path = typer.Option(..., "--train", help="Training records (.jsonl/.parquet)."),
    probes: Path = typer.Option(..., "--probes", help="Probe records (.jsonl/.parquet)."),
    out: Path = typer.Option(..., "--out", help="Output folder (influence.parquet, manifest.json)."),
    params: str = typer.Option("linear", "--params", help="Scope: linear | all | lora | a regex over names."),
    reduce: str = typer.Option("sum", "--reduce", help="Log-likelihood over completion tokens: sum | mean."),
    batch_size: int = typer.Option(8, "--batch-size", help="Samples per forward/backward."),
    mode: str = typer.Option("exact", "--mode", help="exact | projected."),
    proj_dim: int = typer.Option(1024, "--proj-dim", help="Projected mode: feature dimension (per layer for kron)."),
    projection: str = typer.Option("kron", "--projection", help="Projected mode: kron (LoGra) | jl (TRAK)."),
    features: Path | None = typer.Option(None, "--features", help="Projected mode: feature store to reuse."),
    contraction: str = typer.Option("auto", "--contraction", help="Exact mode: auto | ghost | dense."),
    target: str = typer.Option("base", "--target", help="Probe completion: base (model's own response) | gold."),
    tokens: str = typer.Option("all", "--tokens", help="Completion tokens: all | content (cut at end-of-turn)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | float64 | bfloat16."),
    products: str = typer.Option("float32", "--products",
                                 help="A bf16 model's products: float32 | model (its own dtype: faster, half the store)."),
    max_memory_gb: float | None = typer.Option(None, "--max-memory", help="Probe-store memory budget in GiB."),
    per_token: bool = typer.Option(False, "--per-token", help="Also write influence_tokens.parquet."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda."),
    shard_size: int = typer.Option(256, "--shard-size", help="Training samples per resumable shard."),
    resume: bool = typer.Option(False, "--resume", help="Keep the finished shards of an earlier run into --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the results of an earlier run in --out first."),
    predict_check: int = typer.Option(0, "--predict-check", help="One-step check on this many training samples."),
    lr: float = typer.Option(1e-4, "--lr", help="Step size of the one-step check."),
    launcher: str = typer.Option("none", "--launcher", help="none | torchrun (re-launch on N processes)."),
    nproc: int = typer.Option(2, "--nproc", help="Processes for --launcher torchrun."),
) -> None:
    """Kernel K = <grad log p(probe), grad log p(train)>, its cosine and norms, for every checkpoint x train x probe."""
    from dynamics.influence import InfluenceConfig, InfluenceRun, report, run_job

    job = InfluenceRun(
        ckpts=list(ckpt), train=str(train), probes=str(probes), out=str(out),
        config=InfluenceConfig(params=params, reduce=reduce, batch_size=batch_size, mode=mode, proj_dim=proj_dim,
                               projection=projection, contraction=contraction, target=target, tokens=tokens, dtype=dtype,
                               products=products, max_memory_gb=max_memory_gb, per_token=per_token, device=device),
        shard_size=shard_size, resume=resume, overwrite=overwrite, features_dir=None if features is None else str(features),
        predict_check=predict_check, lr=lr,
    )
    path = run_job(job, launcher=launcher, nproc=nproc)
    if path is not None:
        console.print(report(path))

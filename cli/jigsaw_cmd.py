"""``dynamics data jigsaw``: build jigsaw puzzle records (text or image form)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer

from dynamics.cli.app import console, data_app


@data_app.command("jigsaw")
def jigsaw(
    out: Path = typer.Option(..., "--out", "-o", help="Output records file (.jsonl or .parquet)."),
    n: int = typer.Option(500, "--n", help="Number of puzzles."),
    seed: int = typer.Option(0, "--seed", help="Random seed (the same seed gives the same puzzles)."),
    preset: str | None = typer.Option(None, "--preset", help="Named configuration (default: text, or image with "
                                      "--form image); the options below override it."),
    form: str | None = typer.Option(None, "--form", help="text | image."),
    grid: str | None = typer.Option(None, "--grid", help="ROWSxCOLS, e.g. 2x2."),
    question: str | None = typer.Option(None, "--question", help="full | pair."),
    variant: str | None = typer.Option(None, "--variant", help="direct | think."),
    shots: int | None = typer.Option(None, "--shots", help="Worked examples before each puzzle."),
    source: str | None = typer.Option(None, "--source",
                                      help="Image folder (image form) or text file, one sentence per line."),
    patches: str | None = typer.Option(None, "--patches", help="Image form: composite | separate."),
    patch_size: int | None = typer.Option(None, "--patch-size", help="Image form: pixels per patch side."),
    image_dir: str | None = typer.Option(None, "--image-dir", help="Image form: where PNGs go "
                                         "(default: <out stem>_images/ beside the output)."),
) -> None:
    """Write N jigsaw puzzles with gold answers and completions; print a summary."""
    from dynamics.tasks.jigsaw import config_from, write_dataset

    given = dict(form=form, grid=grid, question=question, variant=variant, shots=shots, source=source,
                 patches=patches, patch_size=patch_size, image_dir=image_dir)
    cfg = config_from(preset, **{k: v for k, v in given.items() if v is not None})
    records = write_dataset(cfg, n, seed, out)
    images = sum(len(r.get("images", [])) for r in records)
    answers = Counter(r["answer"] for r in records)
    console.print(f"{out}: {len(records)} {cfg.form} puzzles ({cfg.grid}, {cfg.question}, {cfg.variant}, "
                  f"{cfg.shots} shots), {images} images, {len(answers)} distinct answers; "
                  f"e.g. answer {records[0]['answer']}")

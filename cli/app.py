"""The Typer application object that every command module registers on."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    name="dynamics",
    help="Learning dynamics of (vision-)language models during post-training: which data makes a model forget, "
    "and why.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Build training and evaluation data sets.", no_args_is_help=True)
probes_app = typer.Typer(help="Prior-knowledge probe suites.", no_args_is_help=True)
train_app = typer.Typer(help="Fine-tune a model: SFT, RFT (GRPO).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(probes_app, name="probes")
app.add_typer(train_app, name="train")


def make_console(stderr: bool = False) -> Console:
    """A rich console that does not wrap long lines when output goes to a file or pipe."""
    console = Console(stderr=stderr, soft_wrap=True)
    if not console.is_terminal:
        console = Console(stderr=stderr, soft_wrap=True, width=160)
    return console


console = make_console()

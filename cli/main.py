"""Entry point of the ``dynamics`` command: registers every command module and turns user mistakes
(:class:`dynamics.errors.DynamicsError`) into one line on stderr and exit status 2."""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import warnings

import typer
from typer.core import TyperGroup

import dynamics.cli
from dynamics.cli.app import app
from dynamics.errors import DynamicsError
from dynamics.runtime import tune_cpu_allocator

# every ``*_cmd`` module of this package registers its commands on ``app`` when imported
for _mod in pkgutil.iter_modules(dynamics.cli.__path__):
    if _mod.name.endswith("_cmd"):
        importlib.import_module(f"dynamics.cli.{_mod.name}")


def from_the_command_line(error: DynamicsError, argv: list[str]) -> DynamicsError:
    """``error`` about a config field that an option of the invoked command set on the command line, reported
    against that option (``option --max-memory: ...``); any other error (about a file, or a value that came from a
    default or a config file) as it is. The commands' parameters are named as the config fields they set."""
    if error.file is not None or not error.field:
        return error
    command, args = typer.main.get_command(app), list(argv)
    while isinstance(command, TyperGroup) and args:  # the groups (data, probes, train) take no options
        command, args = command.get_command(typer.Context(command), args[0]), args[1:]
    if command is None or isinstance(command, TyperGroup):
        return error
    ctx = command.make_context("dynamics", args, resilient_parsing=True)
    for param in command.params:
        if param.name == error.field and ctx.get_parameter_source(param.name).name == "COMMANDLINE":
            return DynamicsError(error.message, field=next(o for o in param.opts if o.startswith("--")))
    return error


def main() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # TRL reads this deprecated property at every GRPO generation; nothing a user of the CLI can act on
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    tune_cpu_allocator()
    try:
        app()
    except DynamicsError as e:
        print(f"error: {from_the_command_line(e, sys.argv[1:])}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

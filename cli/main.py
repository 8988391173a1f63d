"""Entry point of the ``dynamics`` command: registers every command module and turns user mistakes
(:class:`dynamics.errors.DynamicsError`) into one line on stderr and exit status 2."""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import warnings

import dynamics.cli
from dynamics.cli.app import app
from dynamics.errors import DynamicsError
from dynamics.runtime import tune_cpu_allocator

# every ``*_cmd`` module of this package registers its commands on ``app`` when imported
for _mod in pkgutil.iter_modules(dynamics.cli.__path__):
    if _mod.name.endswith("_cmd"):
        importlib.import_module(f"dynamics.cli.{_mod.name}")


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
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

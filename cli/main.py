"""Entry point of the ``dynamics`` command: registers every command module and turns user mistakes
(:class:`dynamics.errors.DynamicsError`) into one line on stderr and exit status 2."""

from __future__ import annotations

import os
import sys

from dynamics.cli import data_cmd, models_cmd  # noqa: F401  (registers commands)
from dynamics.cli.app import app

from dynamics.errors import DynamicsError


def main() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        app()
    except DynamicsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

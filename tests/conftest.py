"""Shared fixtures: real models (tiny random ones for speed, the embedded SmolLM2 for realism)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a hub

ROOT = Path(__file__).resolve().parents[1]

# The two longest files start first. `make test` hands files to two workers in collection order
# (--no-loadscope-reorder; pytest-xdist's own order, most tests first, started test_demo.py near the end), and
# test_demo.py alone is over a third of the suite: 486 s of 1,330 on one worker each, test_train.py 175 s.
FIRST = ("test_demo.py", "test_train.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def default_lm():
    """The embedded default model (SmolLM2-135M-Instruct), loaded once per session; do not mutate it."""
    from dynamics.models import load_model

    return load_model("default")


@pytest.fixture(scope="session")
def tiny_lm():
    from dynamics.models import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_vl():
    from dynamics.models import load_model

    return load_model("tiny-qwen2.5-vl")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 900):
    """Run the installed ``dynamics`` command in a subprocess and return the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "dynamics.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def cli_params():
    """``cli_params("train", "sft")``: the parameters of a `dynamics` command by name, read without running it."""
    import typer

    from dynamics.cli.main import app

    def params(*path: str) -> dict:
        command = typer.main.get_command(app)
        for name in path:
            command = command.commands[name]
        return {p.name: p for p in command.params}

    return params

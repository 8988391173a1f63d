"""Files on disk: atomic writes, content hashes, manifests and library versions.

Every output is written to a temporary name in the same folder and renamed into place when complete, so a
reader never sees a half-written file and an interrupted command leaves nothing partial behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynamics.errors import DynamicsError

if TYPE_CHECKING:
    import pandas as pd
    import PIL.Image


def _check_parents(path: Path) -> None:
    """A :class:`DynamicsError` naming the nearest existing parent of ``path`` if it is a file."""
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise DynamicsError(f"is a file, expected a folder to hold {path}", file=parent)


def check_folder(path: str | os.PathLike) -> Path:
    """``path`` as a folder that exists or can be made: a file where it or one of its parents should be is the
    user's mistake, a :class:`DynamicsError` naming that file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DynamicsError("is a file, expected a folder", file=path)
    _check_parents(path)
    return path


def check_file(path: str | os.PathLike) -> Path:
    """``path`` as a file that can be written: not a folder, and no file where one of its folders should be."""
    path = Path(path)
    if path.is_dir():
        raise DynamicsError("is a folder, expected a file", file=path)
    _check_parents(path)
    return path


def input_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` if it is a file to read; otherwise a :class:`DynamicsError`: not found, or a folder."""
    path = Path(path)
    try:
        if path.is_file():
            return path
        folder = path.is_dir()
    except (OSError, ValueError):  # a name the OS refuses (too long, NUL bytes) names no file
        folder = False
    raise DynamicsError(f"is a folder, expected a {what}" if folder else f"{what} not found", file=path)


def make_folder(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` and its parents (see :func:`check_folder` for a file in the way)."""
    path = check_folder(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = check_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def removed_on_error(folder: str | os.PathLike, produced: Callable[[Path], bool]) -> Iterator[None]:
    """A command that fails on the user's input (a :class:`DynamicsError`) before it ``produced`` anything in
    ``folder`` leaves no folder behind, if it made the folder."""
    folder = Path(folder)
    fresh = not folder.exists()
    try:
        yield
    except DynamicsError:
        if fresh and folder.is_dir() and not produced(folder):
            shutil.rmtree(folder, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write ``text`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_image(path: str | os.PathLike, image: PIL.Image.Image) -> None:
    """Atomically write a PIL image (format from the suffix): processes building the same puzzles or probe images
    into one shared folder never read each other's half-written files."""
    with atomic_path(path) as tmp:
        image.save(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Atomically write ``rows`` as JSON lines."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one JSON line with a single write and fsync (a line is either all there or not at all)."""
    data = (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_parquet(path: str | os.PathLike) -> pd.DataFrame:
    """Read a parquet table that a running command may replace at any moment, from one read of its bytes.

    ``pd.read_parquet(path)`` opens the file twice (schema, then data), so a rename in between pairs one
    file's footer with the other's pages ("Invalid column metadata", "Page was smaller than expected")."""
    import pandas as pd

    return pd.read_parquet(io.BytesIO(Path(path).read_bytes()))


def unreadable_parquet(path: str | os.PathLike, error: Exception) -> DynamicsError:
    """The one-line error for a parquet file pyarrow cannot read (a bad footer, a corrupt page), naming it."""
    return DynamicsError(f"not a readable parquet file: {str(error).splitlines()[0]}", file=path)


def concat_parquet(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> None:
    """Write the rows of the parquet files ``paths``, in order, to ``out`` (atomically), holding one file's
    table in memory at a time: the merged table may be far larger than memory."""
    import pyarrow.parquet as pq

    with atomic_path(out) as tmp:
        writer = None
        try:
            for path in paths:
                try:
                    table = pq.read_table(path)
                except Exception as e:  # pyarrow raises several types for corrupt files
                    raise unreadable_parquet(path, e) from None
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                elif not table.schema.equals(writer.schema, check_metadata=False):
                    table = table.cast(writer.schema)  # e.g. a column all null in one file
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()


def read_jsonl_rows(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines log written by :func:`append_jsonl`, skipping a torn last line (a killed writer)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
    return rows


def text_hash(text: str, n: int = 64) -> str:
    """The first ``n`` hex digits of the SHA-256 of ``text`` (UTF-8): the key of content-addressed names."""
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def file_hash(path: str | os.PathLike, algo: str = "sha256") -> str:
    """Hex digest of a file's bytes (folders: of every file inside, by relative path)."""
    path = Path(path)
    h = hashlib.new(algo)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions of Python and of the libraries whose behaviour shapes the results."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("dynamics", "torch", "transformers", "trl", "peft", "accelerate", "numpy", "pandas"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out

"""Records, their validation, and the project's one tokenization convention.

A record is a dict in TRL's conversational prompt/completion format::

    {"id": "q1", "prompt": [{"role": "user", "content": "2+2?"}],
     "completion": [{"role": "assistant", "content": "4"}],
     "images": ["cat.png"], "answer": "4", "meta": {"category": "arithmetic"}}

``prompt`` and ``completion`` may also be plain strings (read as one user / one assistant message).
Rollout records add ``reward``, ``advantage`` and ``step``. Any other field is kept as is.

Tokenization (used by training, probes, influence and the monitor alike, as TRL does it)::

    prompt_ids = apply_chat_template(prompt, add_generation_prompt=True)
    full_ids   = apply_chat_template(prompt + completion)
    completion tokens = full_ids[len(prompt_ids):]       # prompt_ids must be a prefix of full_ids

Without a chat template: prompt ids + completion ids + eos.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dynamics.errors import DynamicsError
from dynamics.store import atomic_path, file_hash, input_file, text_hash, unreadable_parquet

ROLES = ("system", "user", "assistant", "tool")
KNOWN_FIELDS = {
    "id": (str, int),
    "images": (list,),
    "meta": (dict,),
    "reward": (int, float),
    "advantage": (int, float),
    "step": (int,),
}


# ------------------------------------------------------------------------------------------------- records
def _messages(value: Any, role: str, file: Path | str, line: int, field: str) -> list[dict]:
    """Normalise a prompt/completion value to a list of chat messages, or raise naming the field."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise DynamicsError(f"expected a string or a non-empty list of messages, got {type(value).__name__}",
                            file=file, line=line, field=field)
    out = []
    for i, msg in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise DynamicsError(f"expected a message object, got {type(msg).__name__}", file=file, line=line,
                                field=where)
        if msg.get("role") not in ROLES:
            raise DynamicsError(f"role must be one of {', '.join(ROLES)}, got {msg.get('role')!r}", file=file,
                                line=line, field=f"{where}.role")
        content = msg.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
                    raise DynamicsError("content parts must be {'type': 'text'|'image', ...}", file=file, line=line,
                                        field=f"{where}.content[{j}]")
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    raise DynamicsError("a text part needs a string 'text'", file=file, line=line,
                                        field=f"{where}.content[{j}].text")
        elif not isinstance(content, str):
            raise DynamicsError(f"content must be a string or a list of parts, got {type(content).__name__}",
                                file=file, line=line, field=f"{where}.content")
        out.append({k: v for k, v in msg.items() if v is not None})
    return out


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False for names the OS refuses (too long, NUL bytes) instead of raising."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def record_id(record: dict) -> str:
    """A stable id from the record's content (prompt, completion, images): 16 hex digits of SHA-256."""
    key = json.dumps([record.get("prompt"), record.get("completion"), record.get("images")], sort_keys=True,
                     ensure_ascii=False)
    return text_hash(key, 16)


def validate_record(
    raw: Any, file: Path | str = "<records>", line: int = 1, require_completion: bool = True
) -> dict:
    """Check one raw record and return it normalised (messages lists, string id, absolute image paths)."""
    if not isinstance(raw, dict):
        raise DynamicsError(f"expected a JSON object, got {type(raw).__name__}", file=file, line=line)
    rec = dict(raw)
    if "prompt" not in rec or rec["prompt"] is None:
        raise DynamicsError("missing required field", file=file, line=line, field="prompt")
    rec["prompt"] = _messages(rec["prompt"], "user", file, line, "prompt")
    if rec.get("completion") is None:
        if require_completion:
            raise DynamicsError("missing required field", file=file, line=line, field="completion")
        rec.pop("completion", None)
    else:
        rec["completion"] = _messages(rec["completion"], "assistant", file, line, "completion")
    for field, types in KNOWN_FIELDS.items():
        if rec.get(field) is not None and (not isinstance(rec[field], types) or isinstance(rec[field], bool)):
            names = " or ".join(t.__name__ for t in types)
            raise DynamicsError(f"expected {names}, got {type(rec[field]).__name__}", file=file, line=line,
                                field=field)
    for key in ("task", "task_args"):  # what evaluation rebuilds a record's task from (tasks.task_of_record)
        value = (rec.get("meta") or {}).get(key)
        if value is not None and not isinstance(value, str):
            raise DynamicsError(f"expected str, got {type(value).__name__}", file=file, line=line,
                                field=f"meta.{key}")
    if rec.get("images") is not None:
        base = Path(file).parent if file != "<records>" else Path.cwd()
        images = []
        for i, img in enumerate(rec["images"]):
            if not isinstance(img, str):
                raise DynamicsError("image paths must be strings", file=file, line=line, field=f"images[{i}]")
            path = (base / img) if not os.path.isabs(img) else Path(img)
            if not _is_file(path):
                raise DynamicsError(f"image not found: {img}", file=file, line=line, field=f"images[{i}]")
            images.append(str(path.resolve()))
        rec["images"] = images
    else:
        rec.pop("images", None)
    rec["id"] = str(rec["id"]) if rec.get("id") is not None else record_id(rec)
    return rec


def _raw_rows(path: Path) -> Iterable[tuple[int, Any]]:
    """(line number, parsed row) for a JSONL or parquet file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise unreadable_parquet(path, e) from None
        for i, row in enumerate(table.to_pylist(), start=1):
            yield i, {k: v for k, v in row.items() if v is not None}
        return
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DynamicsError(f"not UTF-8 text (byte {e.start + 1})", file=path, line=i) from None
            if not text.strip():
                continue
            try:
                yield i, json.loads(text)
            except json.JSONDecodeError as e:
                raise DynamicsError(f"invalid JSON: {e.msg} (column {e.colno})", file=path, line=i) from None
            except (ValueError, RecursionError) as e:  # an integer past Python's digit limit, too deep nesting
                raise DynamicsError(f"invalid JSON: {str(e).split(':')[0]}", file=path, line=i) from None


def read_records(path: str | os.PathLike, require_completion: bool = True) -> list[dict]:
    """Read and validate every record of a JSONL or parquet file; ids must be unique."""
    path = input_file(path)
    if path.suffix not in (".jsonl", ".json", ".parquet"):
        raise DynamicsError("expected a .jsonl or .parquet file", file=path)
    records, seen = [], {}
    for line, raw in _raw_rows(path):
        rec = validate_record(raw, path, line, require_completion=require_completion)
        if rec["id"] in seen:
            raise DynamicsError(f"duplicate id {rec['id']!r} (first on line {seen[rec['id']]})", file=path,
                                line=line, field="id")
        seen[rec["id"]] = line
        records.append(rec)
    if not records:
        raise DynamicsError("no records: the file is empty", file=path)
    return records


def record_line(path: str | os.PathLike, record_id: str) -> int | None:
    """The line (parquet: row) of the record ``record_id`` in a records file, or None."""
    try:
        for line, raw in _raw_rows(Path(path)):
            if isinstance(raw, dict) and validate_record(raw, path, line, require_completion=False)["id"] == record_id:
                return line
    except DynamicsError:  # not a records file
        pass
    return None


def image_digests(records: Iterable[dict]) -> dict[str, str]:
    """The SHA-256 of every image file that records name, by path: records hold paths, so what is computed on
    them depends on these too (an image edited in place keeps its path)."""
    paths = sorted({p for r in records for p in r.get("images") or ()})
    return {p: file_hash(p) for p in paths}


def content_hash(records: Sequence[dict], n: int = 64) -> str:
    """A hash of records (every field, in canonical JSON) and of the bytes of every image they name: the key of
    results computed on them. Records without images: the hash of their JSON alone."""
    blob = json.dumps(list(records), sort_keys=True, ensure_ascii=False, default=str)
    images = image_digests(records)
    return text_hash(blob + json.dumps(images, sort_keys=True) if images else blob, n)


def data_hash(path: str | os.PathLike) -> str:
    """A records file's SHA-256, combined with its images' in the order it names them if it names any (so an
    image edited in place changes it, and a folder moved with its images does not); for a file without images,
    the file's own SHA-256."""
    digest = file_hash(input_file(path))
    records = read_records(path, require_completion=False)
    images = image_digests(records)
    ordered = [images[p] for r in records for p in r.get("images") or ()]
    return text_hash(digest + json.dumps(ordered)) if ordered else digest


@contextlib.contextmanager
def naming_records(*paths: str | os.PathLike | None) -> Iterator[None]:
    """Give an error about one record (field ``... (record ID)``) that names no file the file and line of that
    record: in the first of ``paths`` (records files; others are skipped) that holds it."""
    try:
        yield
    except DynamicsError as e:
        named = re.search(r"\(record (.+)\)$", e.field or "")
        if e.file is not None or not named:
            raise
        for path in paths:
            line = record_line(path, named.group(1)) if path and Path(path).is_file() else None
            if line is not None:
                raise DynamicsError(e.message, file=path, line=line, field=e.field) from None
        raise


def write_records(path: str | os.PathLike, records: Sequence[dict], relative_images: bool = False) -> Path:
    """Write records atomically as JSONL (or parquet, by suffix); ``relative_images`` writes image paths
    relative to the file's folder (so that the file and its images can move together)."""
    path = Path(path)
    if relative_images:
        base = path.parent.resolve()
        records = [{**r, "images": [os.path.relpath(Path(p).resolve(), base) for p in r["images"]]}
                   if r.get("images") else r for r in records]
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(list(records)), tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as fh:
                for rec in records:
                    fh.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
    return path


def text_of(messages: list[dict] | str) -> str:
    """The plain text of a message list (text parts joined), e.g. a completion's answer text."""
    if isinstance(messages, str):
        return messages
    parts = []
    for msg in messages:
        content = msg["content"]
        parts.append(content if isinstance(content, str) else "".join(p.get("text", "") for p in content))
    return "\n".join(parts)


def with_image_parts(messages: list[dict], n_images: int) -> list[dict]:
    """Put ``n_images`` image parts at the start of the first user message unless it already has them."""
    if not n_images:
        return messages
    have = sum(1 for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image")
    if have == n_images:
        return messages
    if have:
        raise DynamicsError(f"the prompt has {have} image parts but the record lists {n_images} images",
                            field="images")
    out = [dict(m) for m in messages]
    for m in out:
        if m["role"] == "user":
            text = m["content"] if isinstance(m["content"], str) else None
            parts = [{"type": "image"}] * n_images
            m["content"] = parts + ([{"type": "text", "text": text}] if text is not None else list(m["content"]))
            return out
    raise DynamicsError("a record with images needs a user message", field="prompt")


def load_images(paths: Sequence[str]) -> list:
    """Open image files as RGB PIL images, naming the file that does not decode."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise DynamicsError(f"image does not decode: {e}", file=p, field="images") from None
    return images


# ---------------------------------------------------------------------------------------------- tokenization
@dataclass
class Encoded:
    """One record as model inputs: token ids, which of them are completion tokens, and image tensors."""

    input_ids: list[int]
    completion_mask: list[int]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None

    @property
    def prompt_len(self) -> int:
        """The tokens before the first completion token (the whole sequence if it has none)."""
        return self.completion_mask.index(1) if 1 in self.completion_mask else len(self.input_ids)

    def prompt(self) -> Encoded:
        """The generation prompt alone: the tokens before the completion (:func:`encode` checks that the chat
        template renders the prompt alone as this prefix), with the same image tensors."""
        n = self.prompt_len
        return Encoded(self.input_ids[:n], [0] * n, self.pixel_values, self.image_grid_thw)

    def content_only(self, special_ids: set[int]) -> Encoded:
        """The same sample with the completion cut at its first special token (the chat template's
        end-of-turn and what follows), so only the answer's own tokens count."""
        mask, ended = list(self.completion_mask), False
        for i, (tok, m) in enumerate(zip(self.input_ids, mask, strict=True)):
            if m and (ended or tok in special_ids):
                ended = True
                mask[i] = 0
        return Encoded(self.input_ids, mask, self.pixel_values, self.image_grid_thw)


def _chat_ids(processing_class: Any, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    ids = processing_class.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def encode(
    processing_class: Any,
    prompt: list[dict] | str,
    completion: list[dict] | str | None = None,
    images: Sequence[str] | Sequence[Any] | None = None,
    max_length: int | None = None,
    new_tokens: int = 0,
) -> Encoded:
    """Tokenize prompt (+ completion) by the project's convention; see the module docstring.

    ``processing_class`` is a tokenizer or a :class:`dynamics.models.VLProcessor`; ``images`` are paths or
    PIL images. With ``completion=None`` the result is the generation prompt alone. The prompt with the
    ``new_tokens`` a generation may add after it, and the prompt with its completion, must each fit in
    ``max_length`` (the model's context).
    """
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    tok = getattr(processing_class, "tokenizer", processing_class)
    vision = hasattr(processing_class, "images_to_inputs")
    pixel_values = grid = None
    if images:
        if not vision:
            raise DynamicsError("this record has images but the model is text-only", field="images")
        pil = load_images(images) if isinstance(images[0], (str, os.PathLike)) else list(images)
        inputs = processing_class.images_to_inputs(pil)
        pixel_values, grid = inputs["pixel_values"], inputs["image_grid_thw"]
        prompt = with_image_parts(prompt, len(pil))

    if tok.chat_template:
        if vision:
            def ids_of(msgs: list[dict], gen: bool) -> list[int]:
                text = processing_class.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
                text = processing_class.expand_image_tokens(text, grid)
                return tok(text, add_special_tokens=False)["input_ids"]
        else:
            def ids_of(msgs: list[dict], gen: bool) -> list[int]:
                return _chat_ids(processing_class, msgs, gen)

        prompt_ids = ids_of(prompt, True)
        if completion is None:
            full_ids = prompt_ids
        else:
            full_ids = ids_of(prompt + completion, False)
            if full_ids[: len(prompt_ids)] != prompt_ids:
                raise DynamicsError(
                    "the chat template renders the prompt differently alone and before its completion, so the "
                    "completion tokens are ill-defined", field="completion")
    else:
        prompt_ids = tok(text_of(prompt))["input_ids"]
        full_ids = prompt_ids if completion is None else (
            prompt_ids + tok(text_of(completion), add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    if max_length is not None and len(prompt_ids) + new_tokens > max_length:
        n = f"{len(prompt_ids)} tokens and the {new_tokens} to generate" if new_tokens else f"{len(full_ids)} tokens"
        raise DynamicsError(f"{n} exceed the model's context of {max_length}", field="prompt")
    if max_length is not None and len(full_ids) > max_length:
        raise DynamicsError(f"{len(full_ids)} tokens ({len(prompt_ids)} of them the prompt's) exceed the model's "
                            f"context of {max_length}", field="completion")
    mask = [0] * len(prompt_ids) + [1] * (len(full_ids) - len(prompt_ids))
    return Encoded(list(full_ids), mask, pixel_values, grid)


def encode_record(processing_class: Any, record: dict, max_length: int | None = None,
                  completion: list[dict] | str | None = None, new_tokens: int = 0,
                  completion_field: str = "completion") -> Encoded:
    """:func:`encode` a record; ``completion`` overrides the record's own (e.g. a probe's base response, which
    errors then name by ``completion_field``). An error names the record in its field (``prompt (record ID)``),
    which :func:`naming_records` turns into the record's file and line."""
    try:
        return encode(processing_class, record["prompt"],
                      completion if completion is not None else record.get("completion"),
                      record.get("images"), max_length, new_tokens)
    except DynamicsError as e:
        field = completion_field if e.field == "completion" else e.field
        raise DynamicsError(e.message, file=e.file, line=e.line, field=f"{field} (record {record['id']})") from None


def collate(items: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask``, ``completion_mask`` (+ image tensors)."""
    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(items), width), dtype=torch.long)
    comp = torch.zeros((len(items), width), dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        attn[i, :n] = 1
        comp[i, :n] = torch.tensor(e.completion_mask)
    batch = {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}
    pix = [e.pixel_values for e in items if e.pixel_values is not None]
    if pix:
        batch["pixel_values"] = torch.cat(pix)
        batch["image_grid_thw"] = torch.cat([e.image_grid_thw for e in items if e.image_grid_thw is not None])
    return batch


def context_length(model: torch.nn.Module) -> int | None:
    """The model's maximum sequence length from its config, if it states one."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", cfg)
    return getattr(cfg, "max_position_embeddings", None)

"""Prior-knowledge probes: suites, answer matching, log-probabilities, and building a model's kept suite.

A probe is a record with a question (``prompt``), a short gold ``answer``, a gold ``completion`` and
``meta.category`` (optionally ``meta.aliases``). Suites:

* ``text`` -- built in (``dynamics/resources/probes_text.jsonl``): world facts, arithmetic, units and dates,
  common sense, short reading comprehension;
* ``visual`` -- drawn on the fly for VLMs (colours, shapes, counts, positions; :func:`visual_suite`);
* any records file of the user's.

Scoring a model on a probe (:func:`score_probes`):

* ``correct`` -- its greedy response matches the answer after normalisation (:func:`answer_matches`);
* ``logp_sum`` / ``logp_mean`` -- ``sum_t log p(y_t | x, y_<t)`` (and its mean over tokens) of the gold
  completion under the project's tokenization (:func:`completion_logprobs`);
* ``logp_base_sum`` / ``logp_base_mean`` -- the same for the base model's own response, stored by
  :func:`build_probes` in ``meta.base_response``: the primary continuous measure of retained knowledge, and the
  default target of influence (:func:`probe_target`).
"""

from __future__ import annotations

import math
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import pandas as pd
import torch

from dynamics.data import (
    Encoded,
    collate,
    naming_records,
    read_records,
    record_line,
    write_records,
)
from dynamics.errors import DynamicsError, check_bounds
from dynamics.generation import encode_scored, generate
from dynamics.models import LoadedModel
from dynamics.store import check_file, make_folder, write_image, write_json

TEXT_SUITE = "probes_text.jsonl"
SUITES = ("text", "visual")
TARGETS = ("base", "gold")


# ------------------------------------------------------------------------------------------------- suites
def text_suite() -> list[dict]:
    """The built-in text suite (package data), validated like any records file."""
    with resources.as_file(resources.files("dynamics") / "resources" / TEXT_SUITE) as path:
        return read_records(path)


def visual_suite(image_dir: str | Path, n_per_category: int = 12, seed: int = 0) -> list[dict]:
    """Questions about drawn images (colour, shape, count, position), PNGs written under ``image_dir``."""
    from dynamics.tasks.images import draw_probe_image

    image_dir = Path(image_dir)
    make_folder(image_dir)
    rng = random.Random(seed)
    records = []
    for category in ("colour", "shape", "count", "position"):
        for i in range(n_per_category):
            image, question, answer = draw_probe_image(category, rng)
            rid = f"visual-{category}-{i:03d}"
            path = image_dir / f"{rid}.png"
            write_image(path, image)
            records.append({
                "id": rid, "prompt": [{"role": "user", "content": question}],
                "completion": [{"role": "assistant", "content": answer[0].upper() + answer[1:]}],
                "images": [str(path.resolve())], "answer": answer, "meta": {"category": category},
            })
    return records


def check_probes(records: Sequence[dict], file: str | Path) -> list[dict]:
    """Probes (read from ``file``) need a string ``answer`` and a gold ``completion``; raise naming the record's
    line otherwise."""
    for rec in records:
        aliases = (rec.get("meta") or {}).get("aliases", [])
        if not isinstance(rec.get("answer"), str) or not rec["answer"].strip():
            why, field = "a probe needs a non-empty string 'answer'", "answer"
        elif "completion" not in rec:
            why, field = "a probe needs a gold completion", "completion"
        elif not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            why, field = "aliases must be a list of strings", "meta.aliases"
        else:
            continue
        raise DynamicsError(why, file=file, line=record_line(file, rec["id"]), field=field)
    return list(records)


def load_probes(spec: str | Path, image_dir: str | Path | None = None) -> list[dict]:
    """``text`` / ``visual`` (built in; the visual suite draws into ``image_dir``) or a records file."""
    if str(spec) == "text":
        return text_suite()
    if str(spec) == "visual":
        if image_dir is None:
            raise DynamicsError("the visual suite needs a folder to draw its images into", field="probes")
        return visual_suite(image_dir)
    path = Path(spec)
    if not path.exists():
        raise DynamicsError(f"no probe suite {str(spec)!r}: use {' or '.join(SUITES)} or a records file",
                            file=path, field="probes")
    return check_probes(read_records(path), file=path)


# ----------------------------------------------------------------------------------------- answer matching
_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
          "sixteen seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
NUMBER_WORDS = {w: i for i, w in enumerate(_UNITS)} | {w: 20 + 10 * i for i, w in enumerate(_TENS)}
SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000}
ARTICLES = {"a", "an", "the"}
NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")


def _words_to_numbers(words: list[str]) -> list[str]:
    """Replace runs of number words by digits: ``twenty one`` -> ``21``, ``two hundred`` -> ``200``."""
    out: list[str] = []
    total = current = None
    for w in [*words, None]:
        if w is not None and (w in NUMBER_WORDS or (w in SCALES and current is not None)):
            if w in SCALES:
                current *= SCALES[w]
                if SCALES[w] >= 1000:
                    total, current = (total or 0) + current, 0
            else:
                current = (current or 0) + NUMBER_WORDS[w]
            continue
        if current is not None or total is not None:
            out.append(str((total or 0) + (current or 0)))
            total = current = None
        if w is not None:
            out.append(w)
    return out


def normalize_answer(text: str) -> str:
    """Lower case, no accents, punctuation or articles; number words and ordinals as digits (``1,000`` -> ``1000``)."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)
    text = re.sub(r"(?<=\d)(st|nd|rd|th)\b", "", text)
    text = re.sub(r"(?<=\d)\.(?!\d)|(?<!\d)\.|[^\w\s.]|_", " ", text.replace("-", " "))
    words = [w for w in text.split() if w not in ARTICLES]
    return " ".join(_words_to_numbers(words))


def _numbers(text: str) -> list[str]:
    return [w for w in text.split() if NUMBER.match(w)]


def _same_number(a: str, b: str) -> bool:
    return math.isclose(float(a), float(b))


def _alternatives(question: str) -> set[str]:
    """The two words of an ``X or Y`` choice in a (normalised) question."""
    left, sep, right = question.partition(" or ")
    return {left.split()[-1], right.split()[0]} if sep and left.split() and right.split() else set()


def answer_matches(response: str, answer: str, aliases: Sequence[str] = (), question: str = "") -> bool:
    """Does a free-form response state the answer? Compared after :func:`normalize_answer`:

    * numbers: the first number of the response not in the question is the answer, or the answer is there and
      the response introduces no other number (so ``6 - 3 = 2`` is wrong for 3, ``7 + 5 = 12`` right for 12);
    * yes / no: the response starts with it;
    * ``X or Y`` questions: the first of X, Y that the response mentions is the answer;
    * otherwise the answer (or an alias) occurs as whole words.
    """
    resp = normalize_answer(response)
    q = normalize_answer(question)
    words = resp.split()
    for gold in {normalize_answer(a) for a in (answer, *aliases)} - {""}:
        if NUMBER.match(gold):
            q_nums = set(_numbers(q))
            nums = _numbers(resp)
            new = [n for n in nums if n not in q_nums]
            if (new and _same_number(new[0], gold)) or (
                any(_same_number(n, gold) for n in nums) and all(_same_number(n, gold) for n in new)):
                return True
        elif gold in ("yes", "no"):
            if words and words[0] == gold:
                return True
        elif gold in _alternatives(q):
            mentioned = [w for w in words if w in _alternatives(q)]
            if mentioned and mentioned[0] == gold:
                return True
        elif f" {gold} " in f" {resp} ":
            return True
    return False


def probe_correct(record: dict, response: str) -> bool:
    """:func:`answer_matches` for a probe record (its answer, ``meta.aliases`` and question)."""
    from dynamics.data import text_of

    aliases = (record.get("meta") or {}).get("aliases", [])
    return answer_matches(response, record["answer"], aliases, text_of(record["prompt"]))


# ------------------------------------------------------------------------------------------- log-probabilities
def probe_target_field(record: dict, target: str = "base") -> str:
    """Where a probe's target completion is: ``meta.base_response`` (``target="base"``, stored by
    :func:`build_probes`), or ``completion`` (the gold one, also for a probe without a stored response)."""
    if target not in TARGETS:
        raise DynamicsError(f"unknown probe target {target!r}; choose one of {', '.join(TARGETS)}", field="target")
    response = (record.get("meta") or {}).get("base_response")
    return "meta.base_response" if target == "base" and isinstance(response, str) else "completion"


def probe_target(record: dict, target: str = "base") -> list[dict]:
    """The completion whose log p measures a probe: the base model's own response or the gold one (see
    :func:`probe_target_field`)."""
    if probe_target_field(record, target) == "completion":
        return record["completion"]
    return [{"role": "assistant", "content": record["meta"]["base_response"]}]


@torch.no_grad()
def completion_logprobs(
    lm: LoadedModel,
    records: Sequence[dict],
    completions: Sequence[list[dict] | str] | None = None,
    batch_size: int = 32,
    encoded: Sequence[Encoded] | None = None,
) -> pd.DataFrame:
    """``id, logp_sum, logp_mean, n_tokens`` of each record's completion (or of ``completions[i]``):
    ``logp_sum = sum_{t in completion} log softmax(logits_{t-1})[x_t]`` over the project's tokenization (the
    output head runs only at completion positions: :func:`dynamics.influence.token_logprobs`). ``encoded``: the
    records already encoded by :func:`encode_scored`."""
    from dynamics.influence import token_logprobs

    encoded = list(encoded) if encoded is not None else encode_scored(lm, records, completions=completions)
    order = sorted(range(len(records)), key=lambda i: -len(encoded[i].input_ids))
    sums = [0.0] * len(records)
    counts = [0] * len(records)
    was_training = lm.model.training
    lm.model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            logp, valid = token_logprobs(lm.model, collate([encoded[i] for i in idx], lm.tokenizer.pad_token_id))
            per_row = logp.double().sum(1).cpu()
            for j, i in enumerate(idx):
                sums[i] = per_row[j].item()
                counts[i] = int(valid[j].sum())
    finally:
        lm.model.train(was_training)
    return pd.DataFrame({
        "id": [r["id"] for r in records],
        "logp_sum": sums,
        "logp_mean": [s / c if c else float("nan") for s, c in zip(sums, counts, strict=True)],
        "n_tokens": counts,
    })


# ------------------------------------------------------------------------------------------------ scoring
@dataclass
class ProbeInputs:
    """A suite encoded for :func:`score_probes` by :func:`probe_inputs`."""

    gold: list[Encoded]  # prompt + gold completion, the prompt leaving the generation budget free
    base: dict[int, Encoded]  # prompt + stored base response (``meta.base_response``), by probe index


def probe_inputs(lm: LoadedModel, probes: Sequence[dict], max_new_tokens: int) -> ProbeInputs:
    """Every sequence :func:`score_probes` runs, encoded and checked against the context before it generates."""
    gold = encode_scored(lm, probes, max_new_tokens)
    with_base = [i for i, p in enumerate(probes) if isinstance((p.get("meta") or {}).get("base_response"), str)]
    base = encode_scored(lm, [probes[i] for i in with_base], completions=[probe_target(probes[i]) for i in with_base],
                         completion_field="meta.base_response")
    return ProbeInputs(gold, dict(zip(with_base, base, strict=True)))


def score_probes(
    lm: LoadedModel,
    probes: Sequence[dict],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 64,
    logp_batch_size: int = 32,
    progress: bool = True,
    inputs: ProbeInputs | None = None,
) -> pd.DataFrame:
    """One row per probe: ``id, category, correct, response, logp_sum, logp_mean, n_tokens`` and, for probes
    with a stored base response, ``logp_base_sum, logp_base_mean`` (NaN elsewhere). ``inputs``: the probes
    already encoded by :func:`probe_inputs` with this ``max_new_tokens``."""
    inputs = inputs if inputs is not None else probe_inputs(lm, probes, max_new_tokens)
    responses = [r[0] for r in generate(lm, probes, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                        progress=progress, prompts=[e.prompt() for e in inputs.gold])]
    df = completion_logprobs(lm, probes, batch_size=logp_batch_size, encoded=inputs.gold)
    df.insert(1, "category", [str((p.get("meta") or {}).get("category", "")) for p in probes])
    df.insert(2, "correct", [probe_correct(p, r) for p, r in zip(probes, responses, strict=True)])
    df.insert(3, "response", responses)
    with_base = list(inputs.base)
    df["logp_base_sum"] = df["logp_base_mean"] = float("nan")
    if with_base:
        base = completion_logprobs(lm, [probes[i] for i in with_base], batch_size=logp_batch_size,
                                   encoded=list(inputs.base.values()))
        df.loc[with_base, "logp_base_sum"] = base["logp_sum"].to_numpy()
        df.loc[with_base, "logp_base_mean"] = base["logp_mean"].to_numpy()
    return df


def by_category(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracy, mean log p (gold and base, summed over tokens) and count per category, plus ``all``."""
    cols = {"accuracy": ("correct", "mean"), "logp": ("logp_sum", "mean"), "n": ("correct", "size")}
    if "logp_base_sum" in df and df["logp_base_sum"].notna().any():
        cols["logp_base"] = ("logp_base_sum", "mean")
    table = df.groupby("category").agg(**cols)
    total = df.assign(category="all").groupby("category").agg(**cols)
    return pd.concat([table, total])


# ------------------------------------------------------------------------------------------------ building
@dataclass
class ProbeBuildConfig:
    """``dynamics probes build``: score a suite with a model and keep (optionally only) what it gets right."""

    model: str = "default"
    suite: str | None = None  # text | visual | a records file; None: text for LMs, visual for VLMs
    keep_correct: bool = False
    max_new_tokens: int = 48
    batch_size: int = 64  # generation: 64 short prompts a batch took 0.67x the time of 16 on 2 CPU cores
    limit: int | None = None  # score only the first N items (quick looks)
    progress: bool = True

    def __post_init__(self) -> None:
        check_bounds(self, {"max_new_tokens": 1, "batch_size": 1, "limit": 1})


def build_probes(config: ProbeBuildConfig, out: str | Path, lm: LoadedModel | None = None) -> dict:
    """Score ``config.suite`` with ``config.model`` (or the already loaded ``lm``) greedily, store each item's
    response in ``meta.base_response`` (with ``base_model``, ``base_correct``, ``base_logp_gold`` and
    ``base_logp``, the summed log p of that response), keep the correct ones when ``keep_correct``, write
    ``out`` and ``<out>.summary.json``; return that summary."""
    from dynamics.models import load_model

    out = check_file(out)  # before the scoring, which can take minutes
    lm = lm if lm is not None else load_model(config.model)
    suite = config.suite or ("visual" if lm.kind == "vlm" else "text")
    probes = load_probes(suite, image_dir=out.parent / f"{out.stem}_images")
    if config.limit is not None:
        probes = probes[: config.limit]
    with naming_records(suite):
        df = score_probes(lm, probes, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                          progress=config.progress)
    kept = []
    for rec, row in zip(probes, df.itertuples(), strict=True):
        meta = {**(rec.get("meta") or {}), "base_model": config.model, "base_response": row.response,
                "base_correct": bool(row.correct), "base_logp_gold": row.logp_sum}
        if not config.keep_correct or row.correct:
            kept.append({**rec, "meta": meta})
    if not kept:
        raise DynamicsError(f"{config.model} answers none of the {len(probes)} probes correctly; nothing to keep",
                            field="keep-correct")
    own = completion_logprobs(lm, kept, [probe_target(p, "base") for p in kept])
    for p, logp in zip(kept, own["logp_sum"], strict=True):
        p["meta"]["base_logp"] = float(logp)
    write_records(out, kept, relative_images=True)
    table = by_category(df)
    summary = {
        "config": asdict(config), "suite": suite, "n_items": len(probes), "n_kept": len(kept),
        "accuracy": float(df["correct"].mean()), "logp_gold": float(df["logp_sum"].mean()),
        "logp_base_kept": float(own["logp_sum"].mean()),
        "per_category": {c: {k: (int(v) if k == "n" else float(v)) for k, v in row.items()}
                         for c, row in table.to_dict("index").items()},
        "kept_per_category": dict(Counter(str((r.get("meta") or {}).get("category", "")) for r in kept)),
    }
    write_json(out.with_suffix(".summary.json"), summary)
    return summary

"""The jigsaw task (as in arXiv 2506.23508 and Jigsaw-R1): put shuffled pieces back in their original places.

An ``m x n`` grid has positions ``1..mn`` numbered row-major. The pieces are shown in a shuffled order
``perm`` (display slot ``i`` shows the piece from original position ``perm[i]``; the identity is never used).

* **Image form** (VLMs): an image cut into ``m x n`` patches, shown as one composed image of the shuffled
  patches (``patches=composite``) or as one image per patch (``patches=separate``). The answer gives, for
  each shown patch in reading order, its original position: ``[perm[0]+1, perm[1]+1, ...]``, e.g.
  ``[3, 1, 4, 2]``.
* **Text form** (text-only LMs): the same puzzle over text. The "image" is one sentence written as ``m``
  lines of ``n`` word-pieces, so position ``r*n + c + 1`` (row ``r``, column ``c``) is the ``(r*n + c + 1)``-th
  piece in reading order; the shuffled pieces are shown labelled ``A, B, C, ...``. The answer lists the labels
  in original reading order, e.g. ``[C, A, B]``: the inverse permutation of the image answer, which has the
  same accuracy and hit (``sigma`` and ``tau`` agree at as many places as ``sigma^-1`` and ``tau^-1``),
  and is what "put the pieces back in order" means for text. The capital first word and the final full stop
  pin the first and last pieces; the words in between must be ordered by grammar and sense.
* **Questions**: ``full`` (the whole arrangement) or ``pair`` (multiple choice: where is piece X relative to
  piece Y in the original: 8 options, or 2 when ``m == 1`` or ``n == 1``; the answer is the option number).
* **Variants**: ``direct`` (the completion is the answer alone, e.g. ``[C, A, B]``, then end of turn) or
  ``think`` (``<think>...</think><answer>...</answer>``).
* **Rewards** (TRL signature ``f(completions, answer, **kwargs) -> list[float]``): ``accuracy`` (1 when the
  whole answer is right), ``hit`` (fraction of positions right), ``format`` (the variant's layout holds
  exactly ``mn`` valid labels, or one valid option); the study's total is ``hit + accuracy + format``. A
  completion that does not parse scores 0 on all three and never raises.

Presets (``preset=``; explicit arguments override them): see :data:`PRESETS`. Text prompts carry ``shots``
worked examples as earlier chat turns whose answers are drawn per item (so copying them is worth no more
than guessing), and the format hint in the instruction is likewise drawn per item.

Base-model measurements (SmolLM2-135M-Instruct, 48 items per preset, greedy and 8 samples per prompt at
temperature 1.0, ``benchmarks/jigsaw_presets.py``; chance for three pieces is 1/5):

=========================  ==========  =============  ===========  ===============  ==========  =============
preset                     greedy acc  greedy reward  sampled acc  prompts with a   sampled     sampled reward
                                                                   correct sample   format
=========================  ==========  =============  ===========  ===============  ==========  =============
text (1x3, 1 shot)         0.27        1.70           0.08         0.48             0.62        0.90
=========================  ==========  =============  ===========  ===============  ==========  =============
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from dynamics.errors import DynamicsError
from dynamics.store import make_folder, text_hash, write_image
from dynamics.tasks import Task, format_task_args

FORMS = ("text", "image")
QUESTIONS = ("full", "pair")
VARIANTS = ("direct", "think")
PATCHES = ("composite", "separate")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
RELATIONS = ("above-left", "above", "above-right", "left", "right", "below-left", "below", "below-right")
PHRASES = {"above-left": "above and to the left of", "above": "above", "above-right": "above and to the right of",
           "left": "to the left of", "right": "to the right of", "below-left": "below and to the left of",
           "below": "below", "below-right": "below and to the right of", "before": "before", "after": "after"}

# named configurations; "text" is the default (chosen so that the base model's sampled rollouts are sometimes
# right: see the measurements in the module docstring)
PRESETS: dict[str, dict[str, Any]] = {
    "text": dict(form="text", grid="1x3", question="full", variant="direct", shots=1),
    "text-0shot": dict(form="text", grid="1x3", question="full", variant="direct", shots=0),
    "text-2x2": dict(form="text", grid="2x2", question="full", variant="direct", shots=1),
    "text-pair": dict(form="text", grid="1x3", question="pair", variant="direct", shots=1),
    "text-think": dict(form="text", grid="1x3", question="full", variant="think", shots=1),
    "image": dict(form="image", grid="2x2", question="full", variant="think", shots=0),
    "image-direct": dict(form="image", grid="2x2", question="full", variant="direct", shots=0),
    "image-pair": dict(form="image", grid="2x2", question="pair", variant="think", shots=0),
    "image-3x3": dict(form="image", grid="3x3", question="full", variant="think", shots=0),
}
DEFAULT_PRESET = "text"

# a small grammar of concrete sentences: capital first word and final full stop, as in any text
SUBJECTS = ("The old man", "My sister", "A small bird", "The children", "Our teacher", "A tall woman", "The farmer",
            "His brother", "The little cat", "A young doctor", "The baker", "My neighbour", "The tired driver",
            "Her father", "A kind nurse", "The new student", "Our dog", "The painter", "A quiet boy", "The pilot")
VERBS = ("found", "painted", "carried", "watched", "cleaned", "opened", "sold", "lost", "bought", "fixed",
         "dropped", "moved", "hid", "washed", "borrowed", "picked up")
OBJECTS = ("a blue box", "the heavy door", "an old map", "the wooden chair", "a new kite", "the big window",
           "a silver key", "the yellow boat", "a warm coat", "the broken clock", "a red apple", "the tall ladder",
           "a paper bag", "the green bottle", "an empty cup", "the round table")
PLACES = ("in the park.", "near the river.", "after lunch.", "at the market.", "before dinner.",
          "on Sunday morning.", "behind the house.", "in the kitchen.", "at the station.", "by the lake.",
          "during the storm.", "in the garden.", "at school.", "under the bridge.", "last winter.", "at noon.")


@dataclass
class JigsawConfig:
    """One jigsaw task; ``preset`` fills the fields that are not given explicitly (see :data:`PRESETS`)."""

    form: str = "text"  # text | image
    grid: str = "1x3"  # ROWSxCOLS, positions 1..mn row-major
    question: str = "full"  # full | pair
    variant: str = "direct"  # direct | think
    shots: int = 1  # worked examples before the puzzle (earlier chat turns)
    source: str | None = None  # text: a file, one sentence per line; image: a folder of images; None: built in
    patches: str = "composite"  # image form: composite (one image) | separate (one image per patch)
    patch_size: int = 112  # image form: pixels per patch side
    image_dir: str | None = None  # where image records' PNGs go (default: a folder in the dynamics cache)

    def __post_init__(self) -> None:
        for name, allowed in (("form", FORMS), ("question", QUESTIONS), ("variant", VARIANTS), ("patches", PATCHES)):
            if getattr(self, name) not in allowed:
                raise DynamicsError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}",
                                    field=name)
        m = re.fullmatch(r"(\d+)x(\d+)", str(self.grid))
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1 or int(m.group(1)) * int(m.group(2)) < 3:
            raise DynamicsError(f"grid must look like 2x2 (rows x columns, at least 3 pieces), got {self.grid!r}",
                                field="grid")
        if self.rows * self.cols > len(LETTERS) or (self.form == "image" and max(self.rows, self.cols) > 6):
            raise DynamicsError(f"grid {self.grid} is too large", field="grid")
        if not isinstance(self.shots, int) or self.shots < 0:
            raise DynamicsError(f"shots must be a non-negative integer, got {self.shots!r}", field="shots")
        if self.form == "image" and self.shots:
            raise DynamicsError("worked examples (shots) are for the text form; use shots=0", field="shots")
        if not isinstance(self.patch_size, int) or self.patch_size < 8:
            raise DynamicsError(f"patch_size must be an integer >= 8, got {self.patch_size!r}", field="patch_size")

    @property
    def rows(self) -> int:
        return int(self.grid.split("x")[0])

    @property
    def cols(self) -> int:
        return int(self.grid.split("x")[1])

    @property
    def n_pieces(self) -> int:
        return self.rows * self.cols

    @property
    def relations(self) -> tuple[str, ...]:
        """The options of a pair question."""
        if self.rows == 1:
            return ("before", "after") if self.form == "text" else ("left", "right")
        if self.cols == 1:
            return ("above", "below")
        return RELATIONS

    def scoring_args(self) -> dict[str, Any]:
        """The fields that decide how a completion is scored (stored in each record's ``meta.task_args``)."""
        return {"form": self.form, "grid": self.grid, "question": self.question, "variant": self.variant}


def config_from(preset: str | None = None, **overrides: Any) -> JigsawConfig:
    """A :class:`JigsawConfig` from a preset name plus explicit overrides; no preset means ``image`` for
    ``form="image"`` and :data:`DEFAULT_PRESET` otherwise."""
    if preset is None:
        preset = "image" if overrides.get("form") == "image" else DEFAULT_PRESET
    if preset not in PRESETS:
        raise DynamicsError(f"unknown jigsaw preset {preset!r}; choose one of {', '.join(PRESETS)}", field="preset")
    known = {f.name for f in fields(JigsawConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise DynamicsError(f"unknown jigsaw argument(s) {', '.join(unknown)}; known: preset, {', '.join(sorted(known))}",
                            field="task-args")
    base = dict(PRESETS[preset])
    base.update({k: (str(v) if k in ("grid", "source", "image_dir") and v is not None else v)
                 for k, v in overrides.items()})
    return JigsawConfig(**base)


# ------------------------------------------------------------------------------------------------ puzzles
def shuffle(rng: random.Random, k: int) -> list[int]:
    """A uniformly random permutation of ``range(k)`` other than the identity."""
    while True:
        perm = list(range(k))
        rng.shuffle(perm)
        if perm != sorted(perm):
            return perm


def split_words(line: str, k: int) -> list[str]:
    """``line`` cut at word boundaries into ``k`` pieces of as equal a number of words as possible."""
    words = line.split()
    bounds = [round(i * len(words) / k) for i in range(k + 1)]
    return [" ".join(words[bounds[i]:bounds[i + 1]]) for i in range(k)]


def sentence(rng: random.Random) -> str:
    return " ".join((rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(PLACES)))


def _read_lines(path: str, min_words: int) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise DynamicsError("text source not found", file=p, field="source")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    good = [ln for ln in lines if len(ln.split()) >= min_words]
    if not good:
        raise DynamicsError(f"no line has the {min_words} words needed to cut it into pieces", file=p, field="source")
    return good


def text_pieces(cfg: JigsawConfig, rng: random.Random, lines: list[str] | None) -> list[str]:
    """The ``mn`` pieces, in reading (= row-major) order, of one sentence: a line of the source file, or a
    built-in sentence (more sentences appended while it has fewer words than pieces)."""
    if lines:
        text = rng.choice(lines)
    else:
        text = sentence(rng)
        while len(text.split()) < cfg.n_pieces:
            text += " " + sentence(rng)
    return split_words(text, cfg.n_pieces)


def answer_items(cfg: JigsawConfig, perm: list[int]) -> list[str]:
    """The gold answer's items: text -- labels in original order; image -- original positions in shown order."""
    if cfg.form == "text":
        return [LETTERS[perm.index(j)] for j in range(len(perm))]
    return [str(p + 1) for p in perm]


def format_items(items: list[str]) -> str:
    return "[" + ", ".join(items) + "]"


def _relation(cfg: JigsawConfig, a: int, b: int) -> int:
    """Index into ``cfg.relations`` of original position ``a`` relative to ``b`` (0-based, row-major)."""
    (ra, ca), (rb, cb) = divmod(a, cfg.cols), divmod(b, cfg.cols)
    if cfg.rows == 1:
        return 0 if ca < cb else 1
    if cfg.cols == 1:
        return 0 if ra < rb else 1
    dr, dc = (ra > rb) - (ra < rb), (ca > cb) - (ca < cb)
    return RELATIONS.index({(-1, -1): "above-left", (-1, 0): "above", (-1, 1): "above-right", (0, -1): "left",
                            (0, 1): "right", (1, -1): "below-left", (1, 0): "below", (1, 1): "below-right"}[(dr, dc)])


def _place_name(cfg: JigsawConfig, pos: int) -> str:
    r, c = divmod(pos, cfg.cols)
    vertical = ["top", "middle", "bottom"][min(2, round(2 * r / (cfg.rows - 1)))] if cfg.rows > 1 else ""
    horizontal = ["left", "centre", "right"][min(2, round(2 * c / (cfg.cols - 1)))] if cfg.cols > 1 else ""
    return f"row {r + 1}, column {c + 1} ({'-'.join(x for x in (vertical, horizontal) if x)})"


# ------------------------------------------------------------------------------------------------ prompts
def _answer_instruction(cfg: JigsawConfig, rng: random.Random) -> str:
    """How to answer, with an example answer drawn per item (so that copying it is worth nothing)."""
    if cfg.question == "pair":
        how = "the number of the right option"
        hint = str(rng.randint(1, len(cfg.relations)))
    else:
        how = ("each letter once" if cfg.form == "text"
               else "the original positions, in the order the patches are shown")
        hint = format_items(answer_items(cfg, shuffle(rng, cfg.n_pieces)))
    if cfg.variant == "think":
        return (f"Think it through inside <think> </think>, then answer inside <answer> </answer> with {how}, "
                f"for example <answer>{hint}</answer>.")
    if cfg.form == "text" and cfg.question == "full":
        return f"Use {how}, for example {hint}."
    return f"Answer only with {how}, for example {hint}."


def _pair_question(cfg: JigsawConfig, first: str, second: str) -> str:
    options = " ".join(f"{i + 1}. {r}" for i, r in enumerate(cfg.relations))
    if cfg.form == "text" and cfg.rows == 1:
        where = f"In the original sentence, does {first} come before or after {second}?"
    else:
        where = f"In the original, where is {first} relative to {second}?"
    return f"{where} Options: {options}."


def text_prompt(cfg: JigsawConfig, pieces: list[str], perm: list[int], rng: random.Random,
                pair: tuple[int, int] | None) -> str:
    k = cfg.n_pieces
    shown = "\n".join(f"{LETTERS[i]}: {pieces[p]}" for i, p in enumerate(perm))
    what = (f"A sentence was cut into {k} pieces" if cfg.rows == 1
            else f"A sentence, written as {cfg.rows} lines of {cfg.cols} pieces, was cut into its {k} pieces")
    labels = ", ".join(LETTERS[:k - 1]) + f" and {LETTERS[k - 1]}"
    head = f"{what}, labelled {labels}, and the pieces were shuffled:\n{shown}\n"
    if pair is None:
        ask = "In which order do the pieces restore the sentence?"
    else:
        ask = _pair_question(cfg, f"piece {LETTERS[pair[0]]}", f"piece {LETTERS[pair[1]]}")
    return f"{head}{ask} {_answer_instruction(cfg, rng)}"


def image_prompt(cfg: JigsawConfig, rng: random.Random, pair: tuple[int, int] | None) -> str:
    k = cfg.n_pieces
    if cfg.patches == "composite":
        head = (f"This image was cut into a {cfg.grid} grid of {k} patches and the patches were shuffled. Patches "
                f"and positions are numbered 1 to {k} row by row (left to right, top to bottom).")
        name = "patch"
    else:
        head = (f"These {k} images are the patches of one picture cut into a {cfg.grid} grid, in shuffled order. "
                f"Original positions are numbered 1 to {k} row by row (left to right, top to bottom).")
        name = "image"
    if pair is None:
        ask = f"Where was each {name} in the original picture?"
    else:
        ask = _pair_question(cfg, f"{name} {pair[0] + 1}", f"{name} {pair[1] + 1}")
    return f"{head} {ask} {_answer_instruction(cfg, rng)}"


def gold_completion(cfg: JigsawConfig, pieces: list[str] | None, perm: list[int], pair: tuple[int, int] | None,
                    answer: str) -> str:
    """The gold completion: the answer, preceded in the ``think`` variant by a short worked reasoning."""
    if cfg.variant == "direct":
        return answer
    if pair is not None:
        a, b = perm[pair[0]], perm[pair[1]]
        if cfg.form == "text":
            x, y = f"piece {LETTERS[pair[0]]}", f"piece {LETTERS[pair[1]]}"
            reason = f"{x} is \"{pieces[a]}\" and {y} is \"{pieces[b]}\"; in the sentence {x} comes"
        else:
            x, y = f"patch {pair[0] + 1}", f"patch {pair[1] + 1}"
            reason = f"{x} belongs at {_place_name(cfg, a)} and {y} at {_place_name(cfg, b)}, so {x} is"
        think = f"{reason} {PHRASES[cfg.relations[_relation(cfg, a, b)]]} {y}."
    elif cfg.form == "text":
        order = [perm.index(j) for j in range(cfg.n_pieces)]
        think = "The sentence reads: " + " ".join(f"{LETTERS[i]} \"{pieces[perm[i]]}\"" for i in order) + "."
    else:
        think = " ".join(f"Patch {i + 1} belongs at {_place_name(cfg, p)}." for i, p in enumerate(perm))
    return f"<think>{think}</think><answer>{answer}</answer>"


# ------------------------------------------------------------------------------------------------ building
def _puzzle(cfg: JigsawConfig, rng: random.Random, lines: list[str] | None) -> tuple[list[str], list[int], tuple | None]:
    pieces = text_pieces(cfg, rng, lines)
    perm = shuffle(rng, cfg.n_pieces)
    pair = tuple(rng.sample(range(cfg.n_pieces), 2)) if cfg.question == "pair" else None
    return pieces, perm, pair


def _answer(cfg: JigsawConfig, perm: list[int], pair: tuple | None) -> str:
    if pair is None:
        return format_items(answer_items(cfg, perm))
    return str(_relation(cfg, perm[pair[0]], perm[pair[1]]) + 1)


def _text_record(cfg: JigsawConfig, rng: random.Random, lines: list[str] | None) -> dict:
    messages = []
    for _ in range(cfg.shots):
        pieces, perm, pair = _puzzle(cfg, rng, lines)
        messages += [{"role": "user", "content": text_prompt(cfg, pieces, perm, rng, pair)},
                     {"role": "assistant",
                      "content": gold_completion(cfg, pieces, perm, pair, _answer(cfg, perm, pair))}]
    pieces, perm, pair = _puzzle(cfg, rng, lines)
    messages.append({"role": "user", "content": text_prompt(cfg, pieces, perm, rng, pair)})
    answer = _answer(cfg, perm, pair)
    return {"prompt": messages,
            "completion": [{"role": "assistant", "content": gold_completion(cfg, pieces, perm, pair, answer)}],
            "answer": answer, "meta": {"perm": perm, "pair": list(pair) if pair else None,
                                       "text": " | ".join(pieces)}}


def _image_record(cfg: JigsawConfig, rng: random.Random, sources: list[Path] | None, folder: Path, rid: str) -> dict:
    from PIL import Image

    from dynamics.tasks import images as im

    width, height = cfg.cols * cfg.patch_size, cfg.rows * cfg.patch_size
    if sources:
        src = rng.choice(sources)
        with Image.open(src) as opened:
            original = im.fit(opened, width, height)
        origin = str(src)
    else:
        original = im.builtin_image(rng, width, height)
        origin = "built-in"
    perm = shuffle(rng, cfg.n_pieces)
    pair = tuple(rng.sample(range(cfg.n_pieces), 2)) if cfg.question == "pair" else None
    patches = im.cut(original, cfg.rows, cfg.cols)
    shown = [patches[p] for p in perm]
    make_folder(folder)
    if cfg.patches == "composite":
        paths = [folder / f"{rid}.png"]
        write_image(paths[0], im.compose(shown, cfg.rows, cfg.cols))
    else:
        paths = [folder / f"{rid}-{i + 1}.png" for i in range(cfg.n_pieces)]
        for patch, path in zip(shown, paths, strict=True):
            write_image(path, patch)
    answer = _answer(cfg, perm, pair)
    return {"prompt": [{"role": "user", "content": image_prompt(cfg, rng, pair)}],
            "completion": [{"role": "assistant", "content": gold_completion(cfg, None, perm, pair, answer)}],
            "images": [str(p.resolve()) for p in paths], "answer": answer,
            "meta": {"perm": perm, "pair": list(pair) if pair else None, "source": origin}}


def default_image_dir(cfg: JigsawConfig, seed: int) -> Path:
    """``$DYNAMICS_CACHE/jigsaw/<hash of the config>-<seed>``: the same puzzles always land in the same place."""
    from dynamics.models import cache_dir

    key = format_task_args({k: v for k, v in asdict(cfg).items() if k != "image_dir"})
    return cache_dir() / "jigsaw" / f"{text_hash(key, 12)}-{seed}"


def build(cfg: JigsawConfig, n: int, seed: int = 0) -> list[dict]:
    """``n`` puzzles, deterministic in ``(cfg, seed)``: records with prompt, gold completion, answer and
    ``meta`` (category, task, task_args, perm; images for the image form)."""
    if n < 1:
        raise DynamicsError(f"n must be at least 1, got {n}", field="n")
    rng = random.Random(seed)
    meta_common = {"category": f"jigsaw-{cfg.question}", "task": "jigsaw",
                   "task_args": format_task_args(cfg.scoring_args())}
    records = []
    if cfg.form == "text":
        lines = _read_lines(cfg.source, cfg.n_pieces) if cfg.source else None
        for i in range(n):
            rec = _text_record(cfg, rng, lines)
            records.append({"id": f"jigsaw-{seed}-{i:05d}", **rec, "meta": {**meta_common, **rec["meta"]}})
        return records
    from dynamics.tasks.images import folder_images

    sources = folder_images(cfg.source) if cfg.source else None
    folder = Path(cfg.image_dir) if cfg.image_dir else default_image_dir(cfg, seed)
    for i in range(n):
        rid = f"jigsaw-{seed}-{i:05d}"
        rec = _image_record(cfg, rng, sources, folder, rid)
        records.append({"id": rid, **rec, "meta": {**meta_common, **rec["meta"]}})
    return records


# ------------------------------------------------------------------------------------------------ scoring
_NO_TAG = r"(?:(?!</?(?:think|answer)>).)*"
THINK = re.compile(rf"\s*<think>{_NO_TAG}</think>\s*<answer>({_NO_TAG})</answer>\s*", re.S)
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
LIST = re.compile(r"\[([^\[\]]*)\]")


def _text(completion: Any) -> str:
    """A completion (a string or a list of message dicts) as plain text; anything else as ""."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        parts = []
        for msg in completion:
            content = msg.get("content") if isinstance(msg, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        return "\n".join(parts)
    return ""


def _items(cfg: JigsawConfig, segment: str) -> list[str] | None:
    """The answer items of an answer segment: ``[C, A, B]`` -> ``["C", "A", "B"]``; a pair option ``3`` -> ``["3"]``."""
    if cfg.question == "pair":
        return [segment] if re.fullmatch(r"\d{1,2}", segment) else None
    m = LIST.fullmatch(segment)
    if not m:
        return None
    items = [x.strip() for x in m.group(1).split(",")] if m.group(1).strip() else []
    return items if len(items) == cfg.n_pieces else None


def parse_answer(cfg: JigsawConfig, text: str) -> tuple[list[str] | None, bool]:
    """(answer items or None, format ok) of a completion: the list (or option) in the variant's layout, and
    whether the layout holds exactly the right number of valid labels."""
    if cfg.variant == "think":
        whole = THINK.fullmatch(text)
        tags = ANSWER_TAG.findall(text)
        segment = tags[0].strip() if len(tags) == 1 else None  # several answers: none counts
        layout_ok = whole is not None
    else:
        segment, layout_ok = text.strip(), True
    items = None if segment is None else _items(cfg, segment)
    if items is None:
        return None, False
    if cfg.question == "pair":
        valid = {str(i) for i in range(1, len(cfg.relations) + 1)}
    else:
        valid = set(LETTERS[:cfg.n_pieces]) if cfg.form == "text" else {str(i) for i in range(1, cfg.n_pieces + 1)}
    return items, layout_ok and all(x in valid for x in items)


def score(cfg: JigsawConfig, text: Any, answer: Any) -> dict[str, float]:
    """``accuracy, hit, format, total`` of one completion against a gold answer string; all 0 when either
    does not parse (a malformed completion, or a malformed answer passed by mistake)."""
    gold = _items(cfg, _text(answer).strip())
    items, fmt = parse_answer(cfg, _text(text))
    if gold is None or items is None:
        return {"accuracy": 0.0, "hit": 0.0, "format": 0.0, "total": 0.0}
    hit = sum(a == b for a, b in zip(items, gold, strict=True)) / len(gold)
    acc = float(items == gold)
    return {"accuracy": acc, "hit": hit, "format": float(fmt), "total": hit + acc + float(fmt)}


def _reward(cfg: JigsawConfig, key: str):
    def reward(completions: list, answer: list, **kwargs: Any) -> list[float]:
        return [score(cfg, c, a)[key] for c, a in zip(completions, answer, strict=False)]

    reward.__name__ = reward.__qualname__ = f"jigsaw_{key}"
    reward.__doc__ = f"The jigsaw {key} reward of each completion (TRL reward-function signature)."
    return reward


def max_new_tokens(cfg: JigsawConfig) -> int:
    """A generation budget that fits the gold completion, even for a byte-level tokenizer: ``[C, A, B]`` is at
    most 3 bytes per item plus brackets and end of turn; the reasoning of ``think`` gets ~24 tokens per piece."""
    answer = 6 + 3 * (1 if cfg.question == "pair" else cfg.n_pieces)
    return answer if cfg.variant == "direct" else 64 + 24 * cfg.n_pieces + answer


def make_task(preset: str | None = None, **overrides: Any) -> Task:
    """The jigsaw :class:`~dynamics.tasks.Task` for a preset and/or explicit :class:`JigsawConfig` fields."""
    cfg = config_from(preset, **overrides)
    return Task(
        name="jigsaw",
        build=functools.partial(build, cfg),
        reward_funcs=[_reward(cfg, "accuracy"), _reward(cfg, "hit"), _reward(cfg, "format")],
        score=functools.partial(score, cfg),
        max_new_tokens=max_new_tokens(cfg),
        config=cfg,
        args={"preset": preset, **overrides},
    )


def write_dataset(cfg: JigsawConfig, n: int, seed: int, out: str | Path) -> list[dict]:
    """Build ``n`` puzzles and write them to ``out`` (JSONL or parquet). Image-form PNGs go to
    ``cfg.image_dir`` or ``<out stem>_images/`` beside ``out``, referenced relative to ``out``'s folder."""
    from dynamics.data import write_records

    out = Path(out)
    if cfg.form == "image" and cfg.image_dir is None:
        cfg = JigsawConfig(**{**asdict(cfg), "image_dir": str(out.parent / f"{out.stem}_images")})
    records = build(cfg, n, seed)
    write_records(out, records, relative_images=True)
    return records

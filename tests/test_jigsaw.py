"""The jigsaw task: reassembly by the gold answer, determinism, rewards on hand-made and hostile outputs."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dynamics.data import read_records
from dynamics.errors import DynamicsError
from dynamics.tasks import get_task, parse_task_args, task_of_record
from dynamics.tasks.images import compose, cut
from dynamics.tasks.jigsaw import LETTERS, PRESETS, config_from


def shown_pieces(record: dict) -> dict[str, str]:
    """Label -> piece text, read back from the prompt the model sees."""
    return dict(re.findall(r"^([A-Z]): (.+)$", record["prompt"][-1]["content"], re.M))


@pytest.mark.parametrize("grid", ["1x3", "2x2", "2x3", "1x5"])
def test_text_answer_reassembles_the_sentence(grid):
    records = get_task("jigsaw", preset="text", grid=grid).build(20, seed=3)
    k = int(grid[0]) * int(grid[2])
    for rec in records:
        pieces = shown_pieces(rec)
        assert sorted(pieces) == list(LETTERS[:k])
        order = rec["answer"].strip("[]").split(", ")
        sentence = " ".join(pieces[label] for label in order)
        assert sentence == rec["meta"]["text"].replace(" | ", " ")
        assert sentence[0].isupper() and sentence.endswith(".")
        assert order != sorted(order)  # never shown in the original order
        assert rec["completion"][0]["content"] == rec["answer"]


def test_text_source_file_and_its_errors(tmp_path):
    src = tmp_path / "lines.txt"
    src.write_text("One two three four five six.\nToo short.\nSeven eight nine ten eleven.\n")
    recs = get_task("jigsaw", preset="text", source=str(src)).build(10, seed=0)
    assert {r["meta"]["text"].replace(" | ", " ") for r in recs} <= {"One two three four five six.",
                                                                       "Seven eight nine ten eleven.", "Too short."}
    with pytest.raises(DynamicsError, match="words"):
        get_task("jigsaw", preset="text", grid="3x3", source=str(src)).build(2, seed=0)
    with pytest.raises(DynamicsError, match="not found"):
        get_task("jigsaw", source=str(tmp_path / "absent.txt")).build(2, seed=0)


def noise_folder(tmp_path, rows, cols, patch=16, n=2):
    rng = np.random.default_rng(0)
    folder = tmp_path / "src"
    folder.mkdir(exist_ok=True)
    images = []
    for i in range(n):
        arr = rng.integers(0, 256, (rows * patch, cols * patch, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.png")
        images.append(arr)
    return folder, images


@pytest.mark.parametrize(("grid", "patches"), [("2x2", "composite"), ("2x3", "composite"), ("3x3", "separate")])
def test_image_answer_reassembles_the_original_exactly(tmp_path, grid, patches):
    rows, cols = map(int, grid.split("x"))
    folder, originals = noise_folder(tmp_path, rows, cols)
    task = get_task("jigsaw", preset="image", grid=grid, patches=patches, patch_size=16, source=str(folder),
                    image_dir=str(tmp_path / "out"))
    records = task.build(6, seed=1)
    for rec in records:
        if patches == "composite":
            assert len(rec["images"]) == 1
            shown = cut(Image.open(rec["images"][0]).convert("RGB"), rows, cols)
        else:
            assert len(rec["images"]) == rows * cols
            shown = [Image.open(p).convert("RGB") for p in rec["images"]]
        positions = [int(x) for x in rec["answer"].strip("[]").split(", ")]
        assert sorted(positions) == list(range(1, rows * cols + 1)) and positions != sorted(positions)
        placed = [None] * len(shown)
        for patch, pos in zip(shown, positions, strict=True):
            placed[pos - 1] = patch
        rebuilt = np.asarray(compose(placed, rows, cols))
        assert any(np.array_equal(rebuilt, o) for o in originals)
        assert rec["completion"][0]["content"].endswith(f"<answer>{rec['answer']}</answer>")
        assert task.score(rec["completion"][0]["content"], rec["answer"])["total"] == 3.0


def test_builtin_images_are_deterministic_and_records_validate(tmp_path):
    a = get_task("jigsaw", preset="image", image_dir=str(tmp_path / "a")).build(6, seed=5)
    b = get_task("jigsaw", preset="image", image_dir=str(tmp_path / "b")).build(6, seed=5)
    for ra, rb in zip(a, b, strict=True):
        assert ra["answer"] == rb["answer"] and ra["prompt"] == rb["prompt"]
        assert np.array_equal(np.asarray(Image.open(ra["images"][0])), np.asarray(Image.open(rb["images"][0])))
        assert Image.open(ra["images"][0]).size == (224, 224)
    spreads = {np.asarray(Image.open(r["images"][0])).std().round(1) for r in a}
    assert len(spreads) == len(a)  # distinct pictures


def test_puzzle_and_probe_images_are_written_atomically(tmp_path, monkeypatch):
    """Image puzzles and visual probes land under their final names only once whole: a save that fails midway
    (here after writing some bytes) leaves no file there, and an earlier file of that name as it was. Processes
    building the same puzzles into one shared cache folder never read a half-written image."""
    from pathlib import Path

    from dynamics.probes import visual_suite
    from dynamics.store import write_image

    path = tmp_path / "kept.png"
    write_image(path, Image.new("RGB", (8, 8), "red"))
    before = path.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    for build in (lambda: write_image(path, Image.new("RGB", (8, 8), "blue")),
                  lambda: get_task("jigsaw", preset="image-direct", image_dir=str(tmp_path / "p")).build(2, 0),
                  lambda: get_task("jigsaw", preset="image", patches="separate",
                                   image_dir=str(tmp_path / "s")).build(2, 0),
                  lambda: visual_suite(tmp_path / "v", n_per_category=1)):
        with pytest.raises(OSError, match="No space"):
            build()
    assert path.read_bytes() == before
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == ["kept.png"]


def test_seeded_determinism_and_ids():
    task = get_task("jigsaw")
    assert task.build(30, seed=7) == task.build(30, seed=7)
    other = task.build(30, seed=8)
    assert [r["answer"] for r in task.build(30, seed=7)] != [r["answer"] for r in other]
    assert len({r["id"] for r in other}) == 30
    answers = {r["answer"] for r in task.build(200, seed=0)}
    assert answers == {"[A, C, B]", "[B, A, C]", "[B, C, A]", "[C, A, B]", "[C, B, A]"}  # all 5 non-identity


def test_examples_vary_per_item():
    records = get_task("jigsaw").build(60, seed=0)
    shot_answers = [r["prompt"][1]["content"] for r in records]
    hints = [re.search(r"for example (\[.*?\])", r["prompt"][-1]["content"]).group(1) for r in records]
    assert len(set(shot_answers)) == 5 and len(set(hints)) == 5
    # copying the worked example or the hint is right about as often as guessing (1/5)
    for copied in (shot_answers, hints):
        rate = np.mean([c == r["answer"] for c, r in zip(copied, records, strict=True)])
        assert rate < 0.4


JIG = get_task("jigsaw", preset="text")
THINK = get_task("jigsaw", preset="text-think")
IMAGE = get_task("jigsaw", preset="image")
PAIR = get_task("jigsaw", preset="image-pair")


@pytest.mark.parametrize(
    ("task", "completion", "answer", "expected"),
    [
        (JIG, "[C, A, B]", "[C, A, B]", (1, 1, 1)),
        (JIG, "  [C,A,B] \n", "[C, A, B]", (1, 1, 1)),
        (JIG, "[C, B, A]", "[C, A, B]", (0, 1 / 3, 1)),
        (JIG, "[A, A, B]", "[C, A, B]", (0, 2 / 3, 1)),
        (JIG, "[X, A, B]", "[C, A, B]", (0, 2 / 3, 0)),  # not a label: format fails, places still count
        (JIG, "[C, A]", "[C, A, B]", (0, 0, 0)),  # truncated
        (JIG, "[C, A, B", "[C, A, B]", (0, 0, 0)),  # cut off before the bracket closes
        (JIG, "[C, A, B, D]", "[C, A, B]", (0, 0, 0)),
        (JIG, "The answer is [C, A, B].", "[C, A, B]", (0, 0, 0)),  # direct: the answer alone
        (JIG, "<answer>[C, A, B]</answer>", "[C, A, B]", (0, 0, 0)),
        (JIG, "", "[C, A, B]", (0, 0, 0)),
        (JIG, "[C, A, B]", "garbage answer", (0, 0, 0)),
        (THINK, "<think>C starts it.</think><answer>[C, A, B]</answer>", "[C, A, B]", (1, 1, 1)),
        (THINK, "<think>\nhmm\n</think>\n<answer> [C, B, A] </answer>\n", "[C, A, B]", (0, 1 / 3, 1)),
        (THINK, "<answer>[C, A, B]</answer>", "[C, A, B]", (1, 1, 0)),  # no reasoning block: format fails
        (THINK, "<think>x</think><answer>[A, B, C]</answer><answer>[C, A, B]</answer>", "[C, A, B]", (0, 0, 0)),
        (THINK, "<think>x<answer>[C, A, B]</answer></think><answer>[C, A, B]</answer>", "[C, A, B]", (0, 0, 0)),
        (THINK, "<think>a long thought that never ends", "[C, A, B]", (0, 0, 0)),
        (THINK, "<think>x</think><answer>[C, A, B]", "[C, A, B]", (0, 0, 0)),
        (IMAGE, "<think>p</think><answer>[3, 1, 4, 2]</answer>", "[3, 1, 4, 2]", (1, 1, 1)),
        (IMAGE, "<think>p</think><answer>[3, 1, 2, 4]</answer>", "[3, 1, 4, 2]", (0, 0.5, 1)),
        (IMAGE, "<think>p</think><answer>[3, 1, 4, 9]</answer>", "[3, 1, 4, 2]", (0, 0.75, 0)),
        (IMAGE, "<think>p</think><answer>[C, A, B, D]</answer>", "[3, 1, 4, 2]", (0, 0, 0)),
        (PAIR, "<think>p</think><answer>7</answer>", "7", (1, 1, 1)),
        (PAIR, "<think>p</think><answer>6</answer>", "7", (0, 0, 1)),
        (PAIR, "<think>p</think><answer>9</answer>", "7", (0, 0, 0)),
        (PAIR, "<think>p</think><answer>7.</answer>", "7", (0, 0, 0)),
    ],
)
def test_scores_of_hand_made_completions(task, completion, answer, expected):
    s = task.score(completion, answer)
    acc, hit, fmt = expected
    assert (s["accuracy"], s["format"]) == (acc, fmt)
    assert s["hit"] == pytest.approx(hit)
    assert s["total"] == pytest.approx(acc + hit + fmt)


def test_reward_funcs_have_trl_signature():
    funcs = JIG.reward_funcs
    assert [f.__name__ for f in funcs] == ["jigsaw_accuracy", "jigsaw_hit", "jigsaw_format"]
    completions = [[{"role": "assistant", "content": "[C, A, B]"}], [{"role": "assistant", "content": "[B, A, C]"}],
                   "[C, A]", None, [{"role": "assistant", "content": [{"type": "text", "text": "[A, C, B]"}]}]]
    answers = ["[C, A, B]"] * 4 + ["[A, C, B]"]
    out = [f(completions=completions, answer=answers, prompts=["p"] * 5, meta=[{}] * 5, trainer_state=None)
           for f in funcs]
    assert out == [[1.0, 0.0, 0.0, 0.0, 1.0], [1.0, 1 / 3, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0, 1.0]]
    assert [sum(v) for v in zip(*out, strict=True)] == pytest.approx([3.0, 4 / 3, 0.0, 0.0, 3.0])  # the total


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.text(alphabet="[]<>/ABCthinkanswer ,0123456789\n", max_size=120),
                 st.none(), st.integers(), st.lists(st.dictionaries(st.sampled_from(["role", "content"]),
                                                                     st.one_of(st.text(max_size=20), st.none())))))
def test_rewards_never_raise_and_stay_in_range(completion):
    for task in (JIG, THINK, IMAGE, PAIR):
        for f in task.reward_funcs:
            (v,) = f([completion], ["[C, A, B]" if task.config.form == "text" else "3"])
            assert 0.0 <= v <= 1.0


def test_hostile_long_output_is_scored_quickly():
    for text in ("[" + " " * 50_000, "<think>" * 20_000, "[" + "A, " * 30_000 + "]"):
        assert JIG.score(text, "[C, A, B]")["total"] == 0.0
        assert THINK.score(text, "[C, A, B]")["total"] == 0.0


def test_task_args_presets_and_errors():
    assert parse_task_args("grid=2x2, form=image,shots=0,source=none") == {
        "grid": "2x2", "form": "image", "shots": 0, "source": None}
    cfg = config_from("image", grid="3x3", patches="separate")
    assert (cfg.form, cfg.rows, cfg.cols, cfg.variant, cfg.patches) == ("image", 3, 3, "think", "separate")
    assert set(PRESETS) >= {"text", "image", "text-pair", "image-pair"}
    assert (config_from(form="image").variant, config_from(form="image").shots) == ("think", 0)  # image preset
    assert config_from() == config_from("text") and config_from().grid == "1x3"
    for bad, field in [({"grid": "2by2"}, "grid"), ({"form": "audio"}, "form"), ({"preset": "nope"}, "preset"),
                       ({"colour": "red"}, "task-args"), ({"shots": -1}, "shots"), ({"grid": "1x2"}, "grid"),
                       ({"form": "image", "shots": 2}, "shots")]:
        with pytest.raises(DynamicsError) as err:
            get_task("jigsaw", **bad)
        assert err.value.field == field
    with pytest.raises(DynamicsError, match="unknown task"):
        get_task("sudoku")
    with pytest.raises(DynamicsError, match="key=value"):
        parse_task_args("grid")


def test_records_name_the_task_that_scores_them():
    rec = get_task("jigsaw", preset="text-pair").build(1, seed=0)[0]
    task = task_of_record(rec)
    assert task.config.question == "pair" and task.score(rec["answer"], rec["answer"])["total"] == 3.0
    assert task.max_new_tokens >= 4


def test_write_dataset_stores_image_paths_relative_to_the_file(tmp_path):
    from dynamics.tasks.jigsaw import write_dataset

    out = tmp_path / "sets" / "img.jsonl"
    write_dataset(config_from("image", patches="separate"), 3, 0, out)
    assert '"images": ["img_images/jigsaw-0-00000-1.png"' in out.read_text()
    assert all(len(r["images"]) == 4 for r in read_records(out))  # and they resolve from the file's folder


def test_data_jigsaw_command(cli, tmp_path):
    out = tmp_path / "train.jsonl"
    r = cli("data", "jigsaw", "--n", "12", "--grid", "2x2", "--form", "text", "--out", str(out))
    assert r.returncode == 0, r.stderr
    recs = read_records(out)
    assert len(recs) == 12 and all(len(r["answer"].split(",")) == 4 for r in recs)
    assert recs == get_task("jigsaw", grid="2x2").build(12, seed=0)
    r = cli("data", "jigsaw", "--n", "3", "--grid", "two", "--out", str(tmp_path / "x.jsonl"))
    assert r.returncode == 2 and "grid" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

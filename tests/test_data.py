"""Records: reading, validation errors that name file/line/field, stable ids, and the tokenization convention."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dynamics.data import collate, encode, encode_record, read_records, record_id, write_records
from dynamics.errors import DynamicsError

GOOD = {"id": "a", "prompt": [{"role": "user", "content": "2+2?"}],
        "completion": [{"role": "assistant", "content": "4"}], "answer": "4", "meta": {"category": "arith"}}


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_read_normalises_strings_and_assigns_stable_ids(tmp_path):
    p = write_lines(tmp_path / "r.jsonl", [GOOD, {"prompt": "Capital of Italy?", "completion": "Rome"}])
    recs = read_records(p)
    assert recs[0]["id"] == "a"
    assert recs[1]["prompt"] == [{"role": "user", "content": "Capital of Italy?"}]
    assert recs[1]["completion"] == [{"role": "assistant", "content": "Rome"}]
    assert recs[1]["id"] == record_id(recs[1]) == read_records(p)[1]["id"]  # content hash, stable across reads
    assert len(recs[1]["id"]) == 16


def test_content_keys_hold_the_images_bytes(tmp_path):
    """Records name images by path: ``data_hash`` (of a file) and ``content_hash`` (of records), the keys of
    results computed on them, change when an image is rewritten in place; a file without images hashes as its
    bytes alone, and a file moved with its images keeps its ``data_hash``."""
    import shutil

    from dynamics.data import content_hash, data_hash
    from dynamics.store import file_hash

    text = write_lines(tmp_path / "t.jsonl", [GOOD])
    assert data_hash(text) == file_hash(text)
    (tmp_path / "a.png").write_bytes(b"first")
    path = write_lines(tmp_path / "r.jsonl", [{**GOOD, "images": ["a.png"]}])
    before = data_hash(path), content_hash(read_records(path))
    assert before[0] != file_hash(path)
    assert (data_hash(path), content_hash(read_records(path))) == before  # (stable)
    shutil.copytree(tmp_path, tmp_path.parent / f"{tmp_path.name}-moved")
    assert data_hash(tmp_path.parent / f"{tmp_path.name}-moved" / "r.jsonl") == before[0]
    (tmp_path / "a.png").write_bytes(b"second")
    after = data_hash(path), content_hash(read_records(path))
    assert after[0] != before[0] and after[1] != before[1]


def test_parquet_round_trip(tmp_path):
    recs = read_records(write_lines(tmp_path / "r.jsonl", [GOOD, {**GOOD, "id": "b", "meta": {"category": "x"}}]))
    write_records(tmp_path / "r.parquet", recs)
    assert read_records(tmp_path / "r.parquet") == recs


@pytest.mark.parametrize(
    ("lines", "line", "field", "text"),
    [
        (['{"prompt": "x", "completion": '], 1, None, "invalid JSON"),
        ([GOOD, {"id": "b", "completion": "y"}], 2, "prompt", "missing"),
        ([{"prompt": "x"}], 1, "completion", "missing"),
        ([{"prompt": 3, "completion": "y"}], 1, "prompt", "expected a string"),
        ([{"prompt": [{"role": "bot", "content": "x"}], "completion": "y"}], 1, "prompt[0].role", "role"),
        ([{"prompt": [{"role": "user", "content": 5}], "completion": "y"}], 1, "prompt[0].content", "content"),
        ([{"prompt": "x", "completion": "y", "meta": "oops"}], 1, "meta", "expected dict"),
        ([{"prompt": "x", "completion": "y", "reward": "high"}], 1, "reward", "expected int or float"),
        ([{"prompt": "x", "completion": "y", "images": ["nope.png"]}], 1, "images[0]", "image not found"),
        ([GOOD, GOOD], 2, "id", "duplicate id"),
        (["[1, 2]"], 1, None, "expected a JSON object"),
    ],
)
def test_validation_errors_name_file_line_field(tmp_path, lines, line, field, text):
    p = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DynamicsError) as err:
        read_records(p)
    e = err.value
    assert e.file == str(p) and e.line == line and e.field == field and text in e.message
    assert f"{p}:{line}: " in str(e) and "\n" not in str(e)


def test_empty_missing_and_unreadable_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DynamicsError, match="empty"):
        read_records(tmp_path / "empty.jsonl")
    with pytest.raises(DynamicsError, match="not found"):
        read_records(tmp_path / "absent.jsonl")
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DynamicsError, match="parquet"):
        read_records(tmp_path / "x.parquet")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DynamicsError, match="jsonl"):
        read_records(tmp_path / "x.csv")


def test_image_that_does_not_decode(tmp_path, tiny_vl):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    recs = read_records(write_lines(tmp_path / "r.jsonl", [{"prompt": "x", "completion": "y",
                                                            "images": ["broken.png"]}]))
    with pytest.raises(DynamicsError, match="does not decode") as err:
        encode_record(tiny_vl.processing_class, recs[0])
    assert "broken.png" in str(err.value)


def test_cli_check_reports_one_line_error(tmp_path, cli):
    p = write_lines(tmp_path / "bad.jsonl", [GOOD, {"id": "b", "prompt": "x", "completion": 7}])
    res = cli("data", "check", str(p))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    assert f"{p}:2: field 'completion'" in res.stderr
    good = write_lines(tmp_path / "good.jsonl", [GOOD])
    res = cli("data", "check", str(good))
    assert res.returncode == 0 and "1 records" in res.stdout


def test_completion_tokens_follow_the_chat_template(default_lm):
    tok = default_lm.tokenizer
    enc = encode(tok, "What is 2+2?", "4")
    prompt_ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                         tokenize=True)["input_ids"]
    assert enc.input_ids[: len(prompt_ids)] == list(prompt_ids)
    completion = tok.decode([t for t, m in zip(enc.input_ids, enc.completion_mask, strict=True) if m])
    assert completion == "4<|im_end|>\n"


def test_no_chat_template_appends_eos(tiny_lm):
    import copy

    tok = copy.deepcopy(tiny_lm.tokenizer)
    tok.chat_template = None
    enc = encode(tok, "ab", "cd")
    assert enc.input_ids == tok("ab")["input_ids"] + tok("cd", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id]
    assert enc.completion_mask == [0, 0, 1, 1, 1]


def test_the_prompt_of_an_encoding_is_the_prompt_encoded_alone(tiny_lm, tiny_vl):
    """Evaluation encodes a record once with its completion and generates from :meth:`Encoded.prompt`: that
    prefix equals the generation prompt encoded alone, with a chat template, without one, and with an image."""
    from PIL import Image

    plain = copy.deepcopy(tiny_lm.tokenizer)
    plain.chat_template = None
    image = Image.new("RGB", (56, 56), (200, 30, 30))
    for pc, images in ((tiny_lm.tokenizer, None), (plain, None), (tiny_vl.processing_class, [image])):
        full = encode(pc, GOOD["prompt"], "The answer is 4.", images)
        alone = encode(pc, GOOD["prompt"], None, images)
        got = full.prompt()
        assert sum(full.completion_mask) > 1 and got.input_ids == alone.input_ids
        assert got.completion_mask == [0] * len(alone.input_ids)
        if pc is not plain:  # a chat template's end-of-turn cut from the completion does not move its start
            content = full.content_only(set(getattr(pc, "tokenizer", pc).all_special_ids))
            assert 0 < sum(content.completion_mask) < sum(full.completion_mask)
            assert content.prompt().input_ids == alone.input_ids
        if images:
            assert torch.equal(got.pixel_values, alone.pixel_values)
            assert torch.equal(got.image_grid_thw, alone.image_grid_thw)
    # the prompt with its budget to generate, and the whole sequence, are each checked against the context
    n_prompt, n_full = len(alone.input_ids), len(full.input_ids)
    args = (tiny_vl.processing_class, GOOD["prompt"], "The answer is 4.", [image])
    assert encode(*args, n_full, n_full - n_prompt).input_ids == full.input_ids
    with pytest.raises(DynamicsError, match=f"{n_prompt} tokens and the {n_full - n_prompt + 1} to generate") as err:
        encode(*args, n_full, n_full - n_prompt + 1)
    assert err.value.field == "prompt"
    with pytest.raises(DynamicsError, match=f"{n_full} tokens \\({n_prompt} of them the prompt's\\)") as err:
        encode(*args, n_full - 1, 0)
    assert err.value.field == "completion"


@pytest.mark.parametrize("model_fixture", ["tiny_lm", "default_lm"])
def test_tokenization_equals_trl_completion_mask(model_fixture, request, tmp_path):
    """Our labels equal those TRL's SFTTrainer builds (its tokenizer pass + its collator) on the same records."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    lm = request.getfixturevalue(model_fixture)
    rows = [
        {"prompt": [{"role": "user", "content": "Name a primary colour."}],
         "completion": [{"role": "assistant", "content": "Red."}]},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "12 * 3 = ?"}],
         "completion": [{"role": "assistant", "content": "36, because 12 times 3 is 36."}]},
        {"prompt": [{"role": "user", "content": "Spell 'cat' backwards, then say hi."}],
         "completion": [{"role": "assistant", "content": "tac\nhi"}]},
    ]
    args = SFTConfig(output_dir=str(tmp_path), report_to=[], max_length=None, use_cpu=True)
    # a copy: TRL patches the model it is given (its forward), and the session's model is shared
    trainer = SFTTrainer(model=copy.deepcopy(lm.model), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=lm.tokenizer)
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    ours = collate([encode(lm.tokenizer, r["prompt"], r["completion"]) for r in rows], lm.tokenizer.pad_token_id)
    ours_labels = ours["input_ids"].masked_fill(ours["completion_mask"] == 0, -100)
    width = ours["input_ids"].shape[1]
    assert torch.equal(trl_batch["input_ids"][:, :width][ours["attention_mask"] == 1],
                       ours["input_ids"][ours["attention_mask"] == 1])
    assert torch.equal(trl_batch["labels"][:, :width], ours_labels)

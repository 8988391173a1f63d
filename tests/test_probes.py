"""Probe suites, answer matching, log p against a direct forward pass, and building a model's kept suite."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections import Counter

import pytest
import torch

from dynamics.data import encode_record, read_records, write_records
from dynamics.errors import DynamicsError
from dynamics.probes import (
    ProbeBuildConfig,
    answer_matches,
    build_probes,
    by_category,
    completion_logprobs,
    load_probes,
    normalize_answer,
    probe_target,
    score_probes,
    text_suite,
    visual_suite,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The capital is Paris.", "capital is paris"),
        ("Twenty-one apples", "21 apples"),
        ("one hundred and five", "100 and 5"),
        ("two hundred", "200"),
        ("1,000 meters", "1000 meters"),
        ("On the 25th of December", "on 25 of december"),
        ("Bogotá, Colombia!", "bogota colombia"),
        ("It is 3.5 km. Yes.", "it is 3.5 km yes"),
        ("An H2O molecule", "h2o molecule"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("response", "answer", "aliases", "question", "ok"),
    [
        ("The capital of France is Paris.", "Paris", (), "What is the capital of France?", True),
        ("PARIS", "Paris", (), "", True),
        ("The capital of France is Lyon.", "Paris", (), "What is the capital of France?", False),
        ("Parisian food is great.", "Paris", (), "", False),  # whole words only
        ("It is Washington, D.C.", "Washington", ("Washington D.C.",), "", True),
        ("Kiev is the capital.", "Kyiv", ("Kiev",), "", True),
        ("7 + 5 = 12", "12", (), "What is 7 + 5?", True),
        ("To add 7 and 5, add them: 7 + 5 = 12.", "12", (), "What is 7 + 5?", True),
        ("6 - 3 = 2", "3", (), "What is 6 - 3?", False),  # the echoed 3 does not count
        ("6 - 3 = 3", "3", (), "What is 6 - 3?", True),
        ("A week has seven days.", "7", (), "How many days are in a week?", True),
        ("100 centimeters make 1 meter.", "100", (), "How many centimeters are in a meter?", True),
        ("There are 12 or 13 of them.", "12", (), "How many?", True),
        ("There are 13 or 12 of them.", "12", (), "How many?", False),
        ("Mia bought two apples.", "2", ("two",), "Mia bought seven plums and two apples. How many apples?", True),
        ("Mia bought seven plums.", "2", ("two",), "Mia bought seven plums and two apples. How many apples?", False),
        ("Yes, the sun is a star.", "yes", (), "Is the sun a star?", True),
        ("No, it is not. Yes.", "yes", (), "Is the sun a star?", False),
        ("Ice is cold, not hot.", "cold", (), "Is ice hot or cold?", True),
        ("Ice can be hot or cold.", "cold", (), "Is ice hot or cold?", False),
        ("An elephant is heavier than a mouse.", "elephant", (), "Which is heavier, an elephant or a mouse?", True),
        ("", "Paris", (), "", False),
    ],
)
def test_answer_matches(response, answer, aliases, question, ok):
    assert answer_matches(response, answer, aliases, question) is ok


def test_builtin_text_suite():
    suite = text_suite()
    cats = Counter(p["meta"]["category"] for p in suite)
    assert len(suite) >= 300 and len({p["id"] for p in suite}) == len(suite)
    assert set(cats) == {"world_facts", "arithmetic", "units_dates", "common_sense", "reading"}
    assert min(cats.values()) >= 40
    for p in suite:  # each gold completion states its own answer
        assert answer_matches(p["completion"][0]["content"], p["answer"], p["meta"].get("aliases", ()),
                              p["prompt"][0]["content"]), p["id"]
    assert load_probes("text") == suite


def test_bad_probe_files(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "2+2?", "completion": "4", "answer": "4"}) + "\n"
                 + json.dumps({"prompt": "3+3?", "completion": "6"}) + "\n")
    with pytest.raises(DynamicsError) as err:
        load_probes(p)
    assert err.value.line == 2 and err.value.field == "answer"
    with pytest.raises(DynamicsError, match="no probe suite"):
        load_probes(tmp_path / "absent.jsonl")


def test_probe_target():
    rec = {"id": "x", "prompt": [{"role": "user", "content": "q"}],
           "completion": [{"role": "assistant", "content": "Paris"}], "answer": "Paris",
           "meta": {"base_response": "The capital of France is Paris."}}
    assert probe_target(rec) == [{"role": "assistant", "content": "The capital of France is Paris."}]
    assert probe_target(rec, "gold") == rec["completion"]
    assert probe_target({**rec, "meta": {}}) == rec["completion"]
    with pytest.raises(DynamicsError):
        probe_target(rec, "best")


def direct_logp(lm, record, completion=None) -> float:
    """log p of the completion tokens from one unbatched, unpadded forward pass."""
    enc = encode_record(lm.processing_class, record, completion=completion)
    ids = torch.tensor([enc.input_ids])
    kwargs = {}
    if enc.pixel_values is not None:
        kwargs = {"pixel_values": enc.pixel_values, "image_grid_thw": enc.image_grid_thw}
    with torch.no_grad():
        logits = lm.model(input_ids=ids, **kwargs).logits[0].double()
    logp = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
    return float(logp[torch.tensor(enc.completion_mask[1:]).bool()].sum())


def test_logp_equals_a_direct_forward_pass(default_lm):
    """Batched, padded log p equals one unpadded forward pass per record: to 1e-6 in float64, and in float32 to
    1e-4 or, for long sums, their fp32 rounding (5e-6 relative)."""
    lm64 = dataclasses.replace(default_lm, model=copy.deepcopy(default_lm.model).double())
    probes = text_suite()[::40][:8]  # different lengths: batches are padded
    responses = [f"The answer is {p['answer']}" + ", of course." * i for i, p in enumerate(probes)]
    for lm, tol in ((lm64, dict(abs=1e-6)), (default_lm, dict(abs=1e-4, rel=5e-6))):
        for completions in (None, responses):
            df = completion_logprobs(lm, probes, completions, batch_size=3)
            assert list(df["id"]) == [p["id"] for p in probes]
            for i, p in enumerate(probes):
                want = direct_logp(lm, p, None if completions is None else completions[i])
                assert df["logp_sum"][i] == pytest.approx(want, **tol)
                assert df["logp_mean"][i] == pytest.approx(want / df["n_tokens"][i], **tol)


def test_visual_suite_and_logp_on_the_tiny_vlm(tiny_vl, tmp_path):
    suite = visual_suite(tmp_path, n_per_category=3)
    assert Counter(p["meta"]["category"] for p in suite) == {"colour": 3, "shape": 3, "count": 3, "position": 3}
    df = completion_logprobs(tiny_vl, suite[:5], batch_size=2)
    for i, p in enumerate(suite[:5]):
        assert df["logp_sum"][i] == pytest.approx(direct_logp(tiny_vl, p), abs=1e-4)
    scored = score_probes(tiny_vl, suite, max_new_tokens=4, progress=False)
    assert list(scored["category"]) == [p["meta"]["category"] for p in suite]
    assert scored["logp_base_sum"].isna().all() and (scored["logp_sum"] < 0).all()
    # `probes build` for a VLM draws the visual suite beside its output, referenced by relative paths
    out = tmp_path / "built" / "vis.jsonl"
    summary = build_probes(ProbeBuildConfig(model="tiny-qwen2.5-vl", limit=4, max_new_tokens=3, progress=False),
                           out, lm=tiny_vl)
    assert summary["suite"] == "visual" and summary["n_kept"] == 4
    assert '"images": ["vis_images/visual-colour-000.png"]' in out.read_text()
    kept = read_records(out)
    assert all(len(p["meta"]["base_response"]) <= 12 and p["meta"]["base_model"] == "tiny-qwen2.5-vl" for p in kept)


@pytest.fixture(scope="module")
def built(default_lm, tmp_path_factory):
    """The default model's kept suite of every third built-in probe (each category evenly; the whole suite takes
    three times as long), built once (the model is the session's, passed in by spec)."""
    work = tmp_path_factory.mktemp("probes")
    pool = write_records(work / "pool.jsonl", text_suite()[::3])
    summary = build_probes(ProbeBuildConfig(model="default", suite=str(pool), keep_correct=True, max_new_tokens=24,
                                            progress=False), work / "probes.jsonl", lm=default_lm)
    return work / "probes.jsonl", summary


def test_build_keeps_what_the_default_model_knows(built, default_lm):
    out, summary = built
    kept = read_records(out)
    print(f"\naccuracy of the default model on a third of the suite: {summary['accuracy']:.1%} "
          f"({summary['n_kept']} of {summary['n_items']} kept); per category: "
          + ", ".join(f"{c} {v['accuracy']:.0%}" for c, v in summary["per_category"].items()))
    assert summary["n_items"] == len(text_suite()[::3]) and summary["n_kept"] == len(kept) >= 50
    assert 0.3 < summary["accuracy"] < 1.0
    assert all(p["meta"]["base_correct"] and p["meta"]["base_response"] for p in kept)
    assert len({p["meta"]["category"] for p in kept}) == 5
    # the stored responses are the model's greedy answers: re-scoring a sample gives 100% by construction
    sample = kept[::3]
    df = score_probes(default_lm, sample, max_new_tokens=24, progress=False)
    assert df["correct"].all()
    assert list(df["response"]) == [p["meta"]["base_response"] for p in sample]
    # its own response is far more likely under the model than the terse gold answer
    assert df["logp_base_mean"].mean() > df["logp_mean"].mean()
    table = by_category(df)
    assert table.loc["all", "accuracy"] == 1.0 and "logp_base" in table

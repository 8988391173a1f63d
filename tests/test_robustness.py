"""Bad input never crashes: random and corrupted records fed to the readers give either a clean result or a
DynamicsError with a message (never another exception), and the CLI answers a bad file with one line
``error: FILE...`` and exit status 2, no traceback and no output file."""

from __future__ import annotations

import contextlib
import json
import string
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamics.analyses.loader import read_jsonl_table
from dynamics.data import read_records, write_records
from dynamics.errors import DynamicsError
from dynamics.probes import load_probes

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
GOOD = {"id": "a", "prompt": [{"role": "user", "content": "2+2?"}],
        "completion": [{"role": "assistant", "content": "4"}], "answer": "4", "meta": {"category": "arith"}}

# any JSON value, including huge integers and deep nesting
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-10**30, max_value=10**30) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "bot", 3, None]),
                                           "content": json_values | st.text(max_size=10)}), max_size=3)
field_values = {
    "id": json_values | st.text(max_size=10) | st.integers(min_value=10**18, max_value=10**40),
    "prompt": json_values | messages | st.text(max_size=10),
    "completion": json_values | messages | st.text(max_size=10),
    "images": json_values | st.lists(st.text(max_size=12) | st.just("x" * 300) | st.just("a\x00b.png"), max_size=2),
    "meta": json_values,
    "answer": json_values,
    "reward": json_values,
    "advantage": json_values,
    "step": json_values,
}


@st.composite
def records(draw):
    """A record built from GOOD with some fields replaced by random values or removed."""
    rec = dict(GOOD, id=draw(st.text(string.ascii_letters, min_size=1, max_size=6)))
    for name in draw(st.lists(st.sampled_from(sorted(field_values)), max_size=4, unique=True)):
        if draw(st.booleans()):
            rec[name] = draw(field_values[name])
        else:
            rec.pop(name, None)
    return rec


def corrupt(text: bytes, how: str, at: int) -> bytes:
    """Damage serialized records: cut them, insert random bytes, or make them non-UTF-8."""
    at = at % (len(text) + 1)
    return {"truncate": text[:at], "garbage": text[:at] + b"\x00\xff{]\"" + text[at:],
            "latin1": text[:at] + "é".encode("latin-1") + text[at:], "none": text, "empty": b""}[how]


def clean_or_error(fn, *args, **kwargs):
    """Call ``fn``; a DynamicsError must carry a one-line message, anything else fails the test."""
    try:
        return fn(*args, **kwargs)
    except DynamicsError as e:
        assert e.message and "\n" not in str(e)
        return e


def records_file(tmp_path, name, rows, how="none", at=0):
    path = tmp_path / name
    text = "".join(json.dumps(r, allow_nan=True) + "\n" for r in rows).encode()
    path.write_bytes(corrupt(text, how, at))
    return path


HOW = st.sampled_from(["none", "none", "truncate", "garbage", "latin1", "empty"])


@SETTINGS
@given(rows=st.lists(records(), max_size=4), how=HOW, at=st.integers(0, 10**6))
def test_read_records_random_and_corrupted(tmp_path, rows, how, at):
    path = records_file(tmp_path, "r.jsonl", rows, how, at)
    out = clean_or_error(read_records, path)
    if isinstance(out, list):  # a clean result is a list of normalised records with unique string ids
        assert out and len({r["id"] for r in out}) == len(out)
        assert all(isinstance(r["prompt"], list) and isinstance(r["completion"], list) for r in out)
    else:
        assert out.file == str(path)


@SETTINGS
@given(data=st.binary(max_size=200), suffix=st.sampled_from([".jsonl", ".parquet", ".json"]))
def test_read_records_random_bytes(tmp_path, data, suffix):
    path = tmp_path / f"r{suffix}"
    path.write_bytes(data)
    out = clean_or_error(read_records, path)
    assert isinstance(out, DynamicsError) and out.file == str(path)


@SETTINGS
@given(rows=st.lists(records(), min_size=1, max_size=3))
def test_read_records_parquet_with_wrong_columns(tmp_path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "r.parquet"
    try:  # pyarrow cannot store every mix of types in one column: such rows are not a parquet file at all
        table = pa.Table.from_pylist([{k: json.dumps(v) if k == "meta" else v for k, v in r.items()} for r in rows])
        pq.write_table(table, path)
    except (pa.ArrowException, OverflowError):
        return
    out = clean_or_error(read_records, path)
    if isinstance(out, DynamicsError):  # meta stored as a JSON string is a wrong type, named as such
        assert out.file == str(path)


def test_read_records_huge_integer_id_and_non_utf8(tmp_path):
    p = tmp_path / "big.jsonl"
    p.write_text('{"id": ' + "9" * 5000 + ', "prompt": "x", "completion": "y"}\n')
    e = clean_or_error(read_records, p)
    assert isinstance(e, DynamicsError) and e.line == 1
    p.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "\xff\xfe"}\n')
    e = clean_or_error(read_records, p)
    assert isinstance(e, DynamicsError) and e.line == 2 and "UTF-8" in e.message


@SETTINGS
@given(rows=st.lists(records(), max_size=4), how=HOW, at=st.integers(0, 10**6))
def test_load_probes_random_and_corrupted(tmp_path, rows, how, at):
    path = records_file(tmp_path, "p.jsonl", rows, how, at)
    out = clean_or_error(load_probes, path)
    if isinstance(out, list):
        assert all(isinstance(r["answer"], str) and r["answer"].strip() for r in out)


@SETTINGS
@given(rows=st.lists(st.dictionaries(st.sampled_from(["step", "loss", "lr", "x"]), json_values, max_size=4)
                     | json_values, max_size=5),
       how=HOW, at=st.integers(0, 10**6))
def test_read_jsonl_table_random_and_corrupted(tmp_path, rows, how, at):
    path = records_file(tmp_path, "metrics.jsonl", rows, how, at)
    out = clean_or_error(read_jsonl_table, path, required=("step",), numeric=lambda c: c in ("step", "loss"))
    if not isinstance(out, DynamicsError):
        assert "step" in out.columns and len(out) >= 1


# ------------------------------------------------------------------------------------------------ the CLI
def bad_files(tmp_path):
    """One broken file of each kind, with what its error must say besides the file name."""
    good = write_records(tmp_path / "good.jsonl", [GOOD, {**GOOD, "id": "b"}])
    cases = {
        "truncated.jsonl": (json.dumps(GOOD) + "\n" + json.dumps(GOOD)[:20] + "\n", ":2:"),
        "wrongtype.jsonl": (json.dumps({**GOOD, "meta": "oops"}) + "\n", "field 'meta'"),
        "empty.jsonl": ("", "empty"),
        "noprompt.jsonl": (json.dumps({"id": "x", "completion": "y", "answer": "1"}) + "\n", "field 'prompt'"),
    }
    out = {}
    for name, (text, must) in cases.items():
        (tmp_path / name).write_text(text)
        out[name] = (tmp_path / name, must)
    (tmp_path / "notutf8.jsonl").write_bytes(b'{"prompt": "\xff"}\n')
    out["notutf8.jsonl"] = (tmp_path / "notutf8.jsonl", "UTF-8")
    return good, out


def assert_clean_error(code: int, stderr: str, name: str, must: str, out) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert name in lines[0] and must in lines[0], lines[0]
    assert not out.exists(), f"{out} left behind"


@pytest.fixture
def main_in_process(monkeypatch, capsys):
    """Run ``dynamics ARGS`` through the CLI's own entry point in this process (no interpreter start-up);
    any exception other than the clean exit fails the test. Returns (exit code, stderr)."""
    from dynamics.cli.main import main

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["dynamics", *args])
        capsys.readouterr()
        with pytest.raises(SystemExit) as done:
            main()
        return done.value.code, capsys.readouterr().err

    return run


def test_cli_rejects_bad_files_cleanly(tmp_path, main_in_process, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good, bad = bad_files(tmp_path)
    out = tmp_path / "out"
    trunc, must = bad["truncated.jsonl"]
    jobs = [(["data", "check", str(path)], name, why) for name, (path, why) in bad.items()]
    jobs += [
        (["influence", "--ckpt", "tiny-llama", "--train", str(trunc), "--probes", str(good), "--out", str(out)],
         "truncated.jsonl", must),
        (["influence", "--ckpt", "tiny-llama", "--train", str(good), "--probes", str(bad["empty.jsonl"][0]),
          "--out", str(out)], "empty.jsonl", "empty"),
        (["train", "sft", "--model", "tiny-llama", "--data", str(bad["wrongtype.jsonl"][0]), "--out", str(out),
          "--max-steps", "1"], "wrongtype.jsonl", "field 'meta'"),
        (["rollouts", "--model", "tiny-llama", "--data", str(bad["noprompt.jsonl"][0]), "--out",
          str(out / "r.jsonl")], "noprompt.jsonl", "field 'prompt'"),
        (["eval", "--model", "tiny-llama", "--task-data", str(trunc), "--probes", str(good), "--out", str(out)],
         "truncated.jsonl", must),
        (["eval", "--model", "tiny-llama", "--no-task", "--probes", str(bad["notutf8.jsonl"][0]), "--out",
          str(out)], "notutf8.jsonl", "UTF-8"),
        (["probes", "build", "--model", "tiny-llama", "--suite", str(trunc), "--out", str(out / "p.jsonl")],
         "truncated.jsonl", must),
        (["select", "--model", "tiny-llama", "--data", str(trunc), "--probes", str(good), "--out",
          str(out / "k.jsonl")], "truncated.jsonl", must),
        (["compare", "--data", str(good), "--data", str(trunc), "--out", str(out)], "truncated.jsonl", must),
    ]
    for args, name, why in jobs:
        assert_clean_error(*main_in_process(*args), name, why, out)


@pytest.mark.parametrize("args,must", [
    (["influence", "--ckpt", "no-such-model-xyz", "--train", "{good}", "--probes", "{good}", "--out", "{out}"],
     "option --ckpt: unknown model spec 'no-such-model-xyz'"),
    (["influence", "--ckpt", "{tmp}/missing-ckpt", "--train", "{good}", "--probes", "{good}", "--out", "{out}"],
     "option --ckpt: no model folder or file at"),
    (["influence", "--ckpt", "tiny-llama", "--train", "{good}", "--probes", "{good}", "--out", "{out}",
      "--reduce", "median"], "option --reduce: reduce must be sum or mean, got 'median'"),
    (["influence", "--ckpt", "tiny-llama", "--train", "{good}", "--probes", "{good}", "--out", "{out}",
      "--launcher", "slurm"], "option --launcher: launcher must be"),
    (["eval", "--model", "{tmp}/missing-ckpt", "--no-task", "--probes", "{good}", "--out", "{out}"],
     "option --model: no model folder or file at"),
    (["train", "sft", "--model", "no-such-model-xyz", "--data", "{good}", "--out", "{out}"],
     "option --model: unknown model spec 'no-such-model-xyz'"),
    (["rollouts", "--model", "tiny-llama", "--data", "{good}", "--keep", "some", "--out", "{out}/r.jsonl"],
     "option --keep: keep must be one of"),
    (["rollouts", "--model", "tiny-llama", "--data", "{good}", "--samples", "0", "--out", "{out}/r.jsonl"],
     "option --samples: samples"),
    # numbers out of range: each named before any work, never a traceback from torch, transformers or TRL
    (["influence", "--ckpt", "tiny-llama", "--train", "{good}", "--probes", "{good}", "--out", "{out}",
      "--shard-size", "0"], "option --shard-size: shard_size must be >= 1, got 0"),
    (["influence", "--ckpt", "tiny-llama", "--train", "{good}", "--probes", "{good}", "--out", "{out}",
      "--max-memory", "-1"], "option --max-memory: max_memory_gb must be >= 0"),
    (["influence", "--ckpt", "tiny-llama", "--train", "{good}", "--probes", "{good}", "--out", "{out}",
      "--predict-check", "1", "--lr", "nan"], "option --lr: lr must be > 0, got nan"),
    (["influence", "--ckpt", "tiny-llama", "--train", "{good}", "--probes", "{good}", "--out", "{out}",
      "--proj-dim", "0"], "option --proj-dim: proj_dim must be >= 1"),
    (["influence", "--ckpt", "tiny-llama", "--train", "{good}", "--probes", "{good}", "--out", "{out}",
      "--mode", "projected", "--per-token"], "option --per-token: per_token needs mode exact, got 'projected'"),
    (["influence", "--ckpt", "tiny-llama", "--train", "{good}", "--probes", "{good}", "--out", "{out}",
      "--resume", "--overwrite"], "option --overwrite: resume keeps the folder's finished shards and overwrite"),
    (["eval", "--model", "tiny-llama", "--no-task", "--probes", "{good}", "--out", "{out}", "--batch-size", "0"],
     "option --batch-size: batch_size"),
    (["rollouts", "--model", "tiny-llama", "--data", "{good}", "--top-p", "1.5", "--out", "{out}/r.jsonl"],
     "option --top-p: top_p"),
    (["rollouts", "--model", "tiny-llama", "--data", "{good}", "--max-new-tokens", "0", "--out", "{out}/r.jsonl"],
     "option --max-new-tokens: max_new_tokens"),
    (["train", "sft", "--model", "tiny-llama", "--data", "{good}", "--out", "{out}", "--lr", "nan"], "option --lr: learning_rate"),
    (["train", "sft", "--model", "tiny-llama", "--data", "{good}", "--out", "{out}", "--grad-accum", "0"],
     "option --grad-accum: gradient_accumulation_steps"),
    (["train", "sft", "--model", "tiny-llama", "--data", "{good}", "--out", "{out}", "--max-steps", "-5"],
     "option --max-steps"),
    (["train", "sft", "--model", "tiny-llama", "--data", "{good}", "--out", "{out}", "--epochs", "0"],
     "option --epochs: num_train_epochs"),
    (["train", "rft", "--model", "tiny-llama", "--n-prompts", "2", "--out", "{out}", "--group-size", "0"],
     "option --group-size: num_generations"),
    (["train", "rft", "--model", "tiny-llama", "--n-prompts", "2", "--out", "{out}", "--temperature", "0"],
     "option --temperature"),
    # the monitor's options, checked before the run folder is made
    (["train", "sft", "--model", "tiny-llama", "--data", "{good}", "--out", "{out}", "--monitor", "{good}",
      "--monitor-dtype", "fp8"], "option --monitor-dtype: monitor_dtype must be auto, float32 or bfloat16, got 'fp8'"),
    (["train", "rft", "--model", "tiny-llama", "--n-prompts", "2", "--out", "{out}", "--monitor", "{good}",
      "--monitor-refresh", "0"], "option --monitor-refresh: monitor_refresh must be >= 1, got 0"),
    (["train", "sft", "--model", "tiny-llama", "--data", "{good}", "--out", "{out}", "--monitor", "{good}",
      "--monitor-params", "nomatch", "--max-steps", "1"], "option --monitor-params: no parameter name matches"),
    (["select", "--model", "tiny-llama", "--data", "{good}", "--probes", "{good}", "--out", "{out}/k.jsonl",
      "--strategy", "simulate-rollouts", "--samples", "0"], "option --samples: samples"),
    (["select", "--model", "tiny-llama", "--data", "{good}", "--probes", "{good}", "--out", "{out}/k.jsonl",
      "--strategy", "best"], "option --strategy: strategy must be one of"),
    (["select", "--data", "{good}", "--from-influence", "{tmp}", "--out", "{out}/k.jsonl", "--strategy",
      "simulate-rollouts"], "option --from-influence: simulate-rollouts replaces the samples"),
    (["select", "--model", "tiny-llama", "--data", "{good}", "--probes", "{good}", "--out", "{out}/k.jsonl",
      "--step", "3"], "option --step: step picks a checkpoint of from_influence's table, which is not given"),
    (["select", "--data", "{good}", "--out", "{out}/k.jsonl"], "field 'probes': needs probes, or from_influence"),
    (["select", "--data", "{good}", "--from-influence", "{tmp}", "--out", "{out}/k.jsonl"],
     "influence.parquet: file not found"),
    (["compare", "--data", "{good}", "--data", "{tmp}/other.jsonl", "--out", "{out}", "--alpha", "1.5"],
     "option --alpha: alpha"),
    (["compare", "--data", "{good}", "--data", "{tmp}/other.jsonl", "--out", "{out}", "--model", "tiny-llama",
      "--batch-size", "0"], "option --batch-size: batch_size"),
    (["probes", "build", "--model", "tiny-llama", "--out", "{out}/p.jsonl", "--batch-size", "0"],
     "option --batch-size: batch_size"),
    (["probes", "build", "--model", "tiny-llama", "--out", "{out}/p.jsonl", "--limit", "-2"], "option --limit: limit"),
])
def test_cli_rejects_bad_specs_and_options(tmp_path, main_in_process, monkeypatch, args, must):
    monkeypatch.chdir(tmp_path)
    good = write_records(tmp_path / "good.jsonl", [GOOD, {**GOOD, "id": "b"}])
    write_records(tmp_path / "other.jsonl", [GOOD])
    out = tmp_path / "out"
    args = [a.format(good=good, out=out, tmp=tmp_path) for a in args]
    assert_clean_error(*main_in_process(*args), "", must, out)


def test_train_names_the_config_file_or_the_flag_a_bad_value_came_from(tmp_path, main_in_process, monkeypatch):
    """A bad value from ``--config FILE`` names the file and its field; the same value from a flag names the flag,
    not the file (flags override the file)."""
    monkeypatch.chdir(tmp_path)
    good = write_records(tmp_path / "good.jsonl", [GOOD])
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: -1\nper_device_train_batch_size: 2\n")
    args = ["train", "sft", "--model", "tiny-llama", "--data", str(good), "--out", str(tmp_path / "out"), "--config",
            str(config)]
    assert_clean_error(*main_in_process(*args), "c.yaml: field 'learning_rate'", "must be >= 0, got -1",
                       tmp_path / "out")
    code, err = main_in_process(*args, "--lr", "1e-4", "--batch-size", "0")
    assert_clean_error(code, err, "option --batch-size: per_device_train_batch_size", "got 0", tmp_path / "out")
    assert "c.yaml" not in err
    config.write_text("monitor_dtype: fp8\n")  # the monitor's options too, before the run folder is made
    code, err = main_in_process(*args, "--monitor", str(good))
    assert_clean_error(code, err, "c.yaml: field 'monitor_dtype'", "got 'fp8'", tmp_path / "out")
    assert "option" not in err


def test_cli_names_an_option_only_where_the_command_line_set_it():
    """An error about a config field is reported against the invoked command's option of that name when the
    command line gave it; a value from a default, a file, or a field no option sets keeps the field's name."""
    from dynamics.cli.main import from_the_command_line
    from dynamics.errors import DynamicsError

    def shown(argv: list[str], **error: str) -> str:
        return str(from_the_command_line(DynamicsError("bad", **error), argv))

    influence = ["influence", "--ckpt", "m", "--train", "t.jsonl", "--probes", "p.jsonl", "--out", "o"]
    assert shown(influence + ["--batch-size", "0"], field="batch_size") == "option --batch-size: bad"
    assert shown(influence + ["--max-memory", "-1"], field="max_memory_gb") == "option --max-memory: bad"
    assert shown(influence, field="batch_size") == "field 'batch_size': bad"  # the default
    assert shown(influence + ["--batch-size", "0"], field="batch_size", file="t.jsonl") == "t.jsonl: field 'batch_size': bad"
    assert shown(influence, field="completion") == "field 'completion': bad"
    assert shown(["train", "rft", "--out", "o", "--group-size", "1"], field="num_generations") == \
        "option --group-size: bad"
    assert shown(["train", "sft", "--out", "o", "--group-size", "1"], field="num_generations") == \
        "field 'num_generations': bad"  # sft has no such option
    assert shown(["no-such-command", "--n", "0"], field="n") == "field 'n': bad"


def test_train_options_are_named_as_the_run_config_fields(cli_params):
    """`train` hands its options to the run config by name, and an error about a field names the option of that
    name: so every option of `train sft|rft` (but --config) is a field of its run config."""
    from dataclasses import fields

    from dynamics.train.rft import RFTRunConfig
    from dynamics.train.sft import SFTRunConfig

    for kind, cls in (("sft", SFTRunConfig), ("rft", RFTRunConfig)):
        assert set(cli_params("train", kind)) - {"config"} <= {f.name for f in fields(cls) if f.init}, kind


def test_cli_names_a_file_or_folder_in_the_way_of_its_output(tmp_path, main_in_process, monkeypatch):
    """A file where an output folder (or a parent of an output) should be, a folder where an output file should
    be, or a folder given as an input file: one line naming it, before any work, and nothing is written."""
    monkeypatch.chdir(tmp_path)
    good = write_records(tmp_path / "good.jsonl", [GOOD, {**GOOD, "id": "b"}])
    other = write_records(tmp_path / "other.jsonl", [GOOD])
    blocker, folder = tmp_path / "blocker", tmp_path / "folder"
    blocker.write_text("keep me")
    folder.mkdir()
    into_folder = [  # commands whose --out is a folder
        ["influence", "--ckpt", "tiny-llama", "--train", str(good), "--probes", str(good)],
        ["eval", "--model", "tiny-llama", "--no-task", "--probes", str(good)],
        ["train", "sft", "--model", "tiny-llama", "--data", str(good), "--max-steps", "1"],
        ["compare", "--data", str(good), "--data", str(other)],
        ["figures", "--runs", str(folder)],
        ["demo"],
    ]
    into_file = [  # commands whose --out is a file
        ["select", "--model", "tiny-llama", "--data", str(good), "--probes", str(good)],
        ["rollouts", "--model", "tiny-llama", "--data", str(good)],
        ["probes", "build", "--model", "tiny-llama", "--limit", "2"],
        ["data", "jigsaw", "--n", "2"],
    ]
    jobs = [(args + ["--out", str(out)], "blocker", must) for args in into_folder
            for out, must in ((blocker, "is a file, expected a folder"), (blocker / "run", "expected a folder to hold"))]
    jobs += [(args + ["--out", str(out)], name, must) for args in into_file
             for out, name, must in ((folder, "folder", "is a folder, expected a file"),
                                     (blocker / "x.jsonl", "blocker", "expected a folder to hold"))]
    jobs += [(["influence", "--ckpt", "tiny-llama", "--train", str(folder), "--probes", str(good), "--out",
               str(tmp_path / "out")], "folder", "is a folder, expected a file"),
             (["train", "sft", "--model", "tiny-llama", "--data", str(good), "--config", str(folder), "--out",
               str(tmp_path / "out")], "folder", "is a folder, expected a config file")]
    for args, name, must in jobs:
        assert_clean_error(*main_in_process(*args), name, must, tmp_path / "out")
    assert blocker.read_text() == "keep me" and not any(folder.iterdir())


@pytest.mark.parametrize("device,must", [("gpu", "not a device"), ("cuda:99", "no cuda")])
def test_cli_rejects_a_device_this_machine_lacks(tmp_path, main_in_process, monkeypatch, device, must):
    monkeypatch.chdir(tmp_path)
    good = write_records(tmp_path / "good.jsonl", [GOOD, {**GOOD, "id": "b"}])
    out = tmp_path / "out"
    for args in (["influence", "--ckpt", "tiny-llama", "--train", str(good), "--probes", str(good)],
                 ["eval", "--model", "tiny-llama", "--no-task", "--probes", str(good)]):
        assert_clean_error(*main_in_process(*args, "--out", str(out), "--device", device), "device", must, out)


def test_bounds_admit_their_edge_values(tmp_path):
    """The checks above reject only what is meaningless: each edge value that means something still builds."""
    from dynamics.analyses.compare import CompareConfig
    from dynamics.evaluate import EvalConfig
    from dynamics.influence import InfluenceConfig, InfluenceRun
    from dynamics.probes import ProbeBuildConfig
    from dynamics.select import SelectConfig
    from dynamics.train.rollouts import RolloutsConfig
    from dynamics.train.run import load_config
    from dynamics.train.sft import SFTRunConfig

    RolloutsConfig(out="r.jsonl", temperature=0.0, top_p=1.0)  # greedy decoding
    SelectConfig(data="d", probes="p", out="k.jsonl", temperature=0.0).validate()
    CompareConfig(data=[], out=tmp_path, n_resamples=0)  # no bootstrap intervals
    ProbeBuildConfig(limit=1, max_new_tokens=1, batch_size=1)
    EvalConfig(max_new_tokens=None)
    InfluenceRun(ckpts=[], train="t", probes="p", out=str(tmp_path), config=InfluenceConfig(max_memory_gb=0.0),
                 shard_size=1, predict_check=0).validate()
    cfg = load_config(SFTRunConfig, None, output_dir=str(tmp_path / "run"), max_steps=-1, num_train_epochs=0.5,
                      learning_rate=0.0, checkpoint_every=0, eval_every=0, eval_n=0)
    assert (cfg.max_steps, cfg.num_train_epochs, cfg.learning_rate) == (-1, 0.5, 0.0)


def test_cli_rejects_undecodable_image(tmp_path, main_in_process, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    img = write_records(tmp_path / "img.jsonl", [{**GOOD, "images": ["broken.png"]}])
    out = tmp_path / "out"
    code, err = main_in_process("influence", "--ckpt", "tiny-qwen2.5-vl", "--train", str(img), "--probes", str(img),
                                "--out", str(out))
    assert_clean_error(code, err, "broken.png", "decode", out)


def test_every_command_names_the_line_of_a_record_beyond_the_context(tmp_path, main_in_process, monkeypatch):
    """A prompt longer than the model's context (with the tokens to generate, where a command generates from
    it) is rejected by every command that reads it, before it trains or writes: one line naming the file and
    the record's line (blank lines count; a parquet file's row), and no output left behind."""
    monkeypatch.chdir(tmp_path)
    ok = str(write_records(tmp_path / "ok.jsonl", [GOOD, {**GOOD, "id": "b"}]))
    long_record = {**GOOD, "id": "long", "prompt": [{"role": "user", "content": "word " * 5000}]}
    (tmp_path / "long.jsonl").write_text(json.dumps(GOOD) + "\n\n" + json.dumps(long_record) + "\n")
    write_records(tmp_path / "long.parquet", [GOOD, long_record])
    shared = str(write_records(tmp_path / "shared.jsonl", [{**GOOD, "id": "long"}]))  # the id, with a short prompt
    model = ["--model", "tiny-llama"]
    jobs = [  # (arguments before --out, output, where, what the message says)
        (["select", "--data", "long.jsonl", "--probes", ok, *model, "--budget", "1"], "k.jsonl", "long.jsonl:3", ""),
        (["select", "--data", ok, "--probes", "long.jsonl", *model, "--budget", "1"], "k.jsonl", "long.jsonl:3", ""),
        (["influence", "--ckpt", "tiny-llama", "--train", "long.jsonl", "--probes", ok], "inf", "long.jsonl:3", ""),
        (["influence", "--ckpt", "tiny-llama", "--train", ok, "--probes", "long.parquet"], "inf", "long.parquet:2",
         ""),
        # projected mode in shards: checked before the first shard is computed
        (["influence", "--ckpt", "tiny-llama", "--train", "long.jsonl", "--probes", ok, "--mode", "projected",
          "--shard-size", "1"], "inf", "long.jsonl:3", ""),
        # a data and a probe file that share the id: the file whose record does not fit is named
        (["influence", "--ckpt", "tiny-llama", "--train", shared, "--probes", "long.jsonl"], "inf", "long.jsonl:3", ""),
        (["influence", "--ckpt", "tiny-llama", "--train", "long.jsonl", "--probes", shared], "inf", "long.jsonl:3", ""),
        (["select", "--data", shared, "--probes", "long.jsonl", *model, "--budget", "1"], "k.jsonl", "long.jsonl:3",
         ""),
        (["select", "--data", "long.jsonl", "--probes", shared, *model, "--budget", "1"], "k.jsonl", "long.jsonl:3",
         ""),
        (["eval", *model, "--task-data", shared, "--probes", "long.jsonl"], "ev", "long.jsonl:3", "the 48 to generate"),
        (["eval", *model, "--task-data", "long.jsonl", "--probes", shared], "ev", "long.jsonl:3", "to generate"),
        (["compare", "--data", ok, "--data", "long.jsonl", *model], "cmp", "long.jsonl:3", ""),
        (["eval", *model, "--no-task", "--probes", "long.jsonl"], "ev", "long.jsonl:3", "the 48 to generate"),
        (["eval", *model, "--task-data", "long.jsonl", "--probes", ok], "ev", "long.jsonl:3", "to generate"),
        (["probes", "build", *model, "--suite", "long.jsonl"], "p.jsonl", "long.jsonl:3", "the 48 to generate"),
        (["rollouts", *model, "--data", "long.jsonl", "--samples", "2"], "r.jsonl", "long.jsonl:3", "to generate"),
        (["train", "sft", *model, "--data", "long.jsonl"], "run", "long.jsonl:3", ""),
        (["train", "sft", *model, "--data", ok, "--monitor", "long.jsonl"], "run", "long.jsonl:3", ""),
        (["train", "sft", *model, "--data", ok, "--probes", "long.jsonl", "--eval-every", "1"], "run",
         "long.jsonl:3", "to generate"),  # met by the step-0 evaluation, as training starts
        (["train", "rft", *model, "--data", "long.jsonl", "--max-new-tokens", "16"], "run", "long.jsonl:3",
         "the 16 to generate"),
    ]
    for args, out, where, what in jobs:
        code, err = main_in_process(*args, "--out", out)
        assert_clean_error(code, err, where, "exceed the model's context", tmp_path / out)
        assert "field 'prompt (record long)'" in err and what in err, err


def test_a_completion_beyond_the_context_is_named_as_the_completion(tmp_path, main_in_process, monkeypatch):
    """When the prompt fits and its completion does not, the error names the completion (a probe's stored base
    response by its own field), not the prompt; the commands that generate find it before they generate (their
    progress bar would be a second line on stderr)."""
    monkeypatch.chdir(tmp_path)
    ok = str(write_records(tmp_path / "ok.jsonl", [GOOD, {**GOOD, "id": "b"}]))
    write_records(tmp_path / "longc.jsonl", [GOOD, {**GOOD, "id": "c", "completion": "word " * 5000}])
    write_records(tmp_path / "longb.jsonl", [GOOD, {**GOOD, "id": "c", "meta": {"base_response": "word " * 5000}}])
    model = ["--model", "tiny-llama"]
    jobs = [  # (arguments before --out, output, file, field)
        (["train", "sft", *model, "--data", "longc.jsonl"], "run", "longc.jsonl", "completion"),
        (["influence", "--ckpt", "tiny-llama", "--train", ok, "--probes", "longc.jsonl"], "inf", "longc.jsonl",
         "completion"),
        (["influence", "--ckpt", "tiny-llama", "--train", ok, "--probes", "longb.jsonl"], "inf", "longb.jsonl",
         "meta.base_response"),
        (["eval", *model, "--no-task", "--probes", "longc.jsonl"], "ev", "longc.jsonl", "completion"),
        (["eval", *model, "--no-task", "--probes", "longb.jsonl"], "ev", "longb.jsonl", "meta.base_response"),
        (["eval", *model, "--task", "jigsaw", "--task-data", "longc.jsonl", "--probes", ok], "ev", "longc.jsonl",
         "completion"),
        # the probes are checked before the task answers are generated
        (["eval", *model, "--task", "jigsaw", "--task-data", ok, "--probes", "longb.jsonl"], "ev", "longb.jsonl",
         "meta.base_response"),
        (["probes", "build", *model, "--suite", "longc.jsonl"], "p.jsonl", "longc.jsonl", "completion"),
        (["select", "--strategy", "simulate-rollouts", "--data", ok, "--probes", "longc.jsonl", *model, "--budget",
          "1"], "k.jsonl", "longc.jsonl", "completion"),  # before the rollouts are sampled
        (["select", "--strategy", "simulate-rollouts", "--data", "longc.jsonl", "--probes", ok, *model, "--budget",
          "1"], "k.jsonl", "longc.jsonl", "completion"),  # a gold answer too: kept where no sample is correct
    ]
    for args, out, where, field in jobs:
        code, err = main_in_process(*args, "--out", out)
        assert_clean_error(code, err, f"{where}:2", "of them the prompt's) exceed the model's context", tmp_path / out)
        assert f"field '{field} (record c)'" in err, err


def test_a_task_record_with_no_task_to_score_it_is_named(tmp_path, main_in_process, monkeypatch):
    """Evaluation records without meta.task are scored by the task the command names; in training, where no
    task is named (SFT without --eval-task), the step-0 evaluation names the record's file and line."""
    monkeypatch.chdir(tmp_path)
    data = str(write_records(tmp_path / "ok.jsonl", [GOOD, {**GOOD, "id": "b"}]))
    code, err = main_in_process("train", "sft", "--model", "tiny-llama", "--data", data, "--eval-data", data,
                                "--eval-every", "1", "--out", "run")
    assert_clean_error(code, err, "ok.jsonl:1", "names no task", tmp_path / "run")
    assert "field 'meta.task (record a)'" in err and "--eval-task" in err, err


def test_eval_names_a_record_whose_task_cannot_be_rebuilt(tmp_path, main_in_process, monkeypatch):
    """A task record's meta.task / meta.task_args that name no task, or a bad one, are named by file and line."""
    monkeypatch.chdir(tmp_path)
    cases = [({"task": "nope"}, "meta.task (record b)", "unknown task 'nope'"),
             ({"task": "jigsaw", "task_args": "grid=9x"}, "meta.task_args (record b)", "grid must look like"),
             ({"task": "jigsaw", "task_args": "foo=1"}, "meta.task_args (record b)", "unknown jigsaw argument"),
             ({"task": "jigsaw", "task_args": {"grid": "2x2"}}, "meta.task_args", "expected str, got dict"),
             ({"task": 3}, "meta.task", "expected str, got int")]
    for i, (meta, field, must) in enumerate(cases):
        data = write_records(tmp_path / f"t{i}.jsonl", [GOOD, {**GOOD, "id": "b", "meta": meta}])
        code, err = main_in_process("eval", "--model", "tiny-llama", "--task-data", str(data), "--probes",
                                    str(data), "--out", "ev")
        assert_clean_error(code, err, f"t{i}.jsonl:2", must, tmp_path / "ev")
        assert f"field '{field}'" in err, err
    # a null task is no task, as a missing one: both are scored by --task, whichever comes first
    data = write_records(tmp_path / "null.jsonl", [{**GOOD, "id": "b", "meta": {"task": None}}, GOOD])
    code, err = main_in_process("eval", "--model", "tiny-llama", "--task-data", str(data), "--probes", str(data),
                                "--out", "ev")
    assert code == 0, err


def test_cli_rejects_a_corrupt_checkpoint(tmp_path, main_in_process, monkeypatch):
    from dynamics.models import load_model

    monkeypatch.chdir(tmp_path)
    good = write_records(tmp_path / "good.jsonl", [GOOD, {**GOOD, "id": "b"}])
    load_model("tiny-llama").save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"not a model")
    out = tmp_path / "out"
    for args in (["eval", "--model", str(tmp_path / "ckpt"), "--no-task", "--probes", str(good), "--out", str(out)],
                 ["influence", "--ckpt", str(tmp_path / "ckpt"), "--train", str(good), "--probes", str(good),
                  "--out", str(out)]):
        assert_clean_error(*main_in_process(*args), "ckpt", "cannot load the model folder", out)


def test_cli_subprocess_prints_one_line_and_exits_2(tmp_path, cli):
    """End to end through the installed module: the interpreter's own stderr shows no traceback."""
    good, bad = bad_files(tmp_path)
    out = tmp_path / "out"
    trunc, must = bad["truncated.jsonl"]
    for args, name, why in [
        (["influence", "--ckpt", "tiny-llama", "--train", str(trunc), "--probes", str(good), "--out", str(out)],
         "truncated.jsonl", must),
        (["train", "sft", "--model", "tiny-llama", "--data", str(bad["empty.jsonl"][0]), "--out", str(out)],
         "empty.jsonl", "empty"),
    ]:
        res = cli(*args, cwd=tmp_path)
        assert_clean_error(res.returncode, res.stderr, name, why, out)


@pytest.mark.parametrize("text", ['{"step": ' + "9" * 5000 + "}", "[" * 100_000])
def test_analyses_reader_names_the_line_of_unreadable_json(tmp_path, text):
    from dynamics.analyses.loader import read_jsonl_table

    path = tmp_path / "metrics.jsonl"
    path.write_text(text + '\n{"step": 1}\n')
    with pytest.raises(DynamicsError, match=r"metrics\.jsonl:1: unreadable JSON"):
        read_jsonl_table(path, ("step",))


def test_read_parquet_while_another_writer_replaces_the_file(tmp_path):
    """A live run rewrites eval.parquet (atomically) while a reader polls it; every read returns one whole
    table. ``pd.read_parquet(path)`` opens the file twice and failed ~half of such reads (CI saw "Page was
    smaller (6) than expected (13)")."""

    import numpy as np
    import pandas as pd

    from dynamics.store import read_parquet

    tables = [pd.DataFrame({"step": np.arange(n) % 7, "x": np.arange(n) / 3}) for n in (10, 3000)]
    path = tmp_path / "eval.parquet"
    with _replaced_in_turn(path, tables):
        seen = {len(read_parquet(path)) for _ in range(400)}
    assert seen <= {10, 3000} and len(seen) == 2, seen  # both tables were read, each whole


def _influence_table(n_train: int, n_probes: int, steps: tuple[int, ...], seed: int, shuffle: bool = True):
    """A long table in `influence.parquet`'s format (rows shuffled unless told, a few cosines missing)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    per_step, rows = n_train * n_probes, len(steps) * n_train * n_probes
    train = np.array([f"t{i}" for i in range(n_train)], dtype=object)
    df = pd.DataFrame({"ckpt": np.repeat(np.array([f"ck{s}" for s in steps], dtype=object), per_step),
                       "step": np.repeat(steps, per_step), "train_id": np.tile(np.repeat(train, n_probes), len(steps)),
                       "probe_id": np.tile(np.array([f"p{j}" for j in range(n_probes)], dtype=object),
                                           len(steps) * n_train),
                       "kernel": rng.standard_normal(rows), "cosine": rng.uniform(-1, 1, rows),
                       "train_norm": np.repeat(rng.random(len(steps) * n_train) + 0.5, n_probes), "probe_norm": 1.0})
    df.loc[rng.random(rows) < 0.01, "cosine"] = np.nan
    return df.sample(frac=1, random_state=seed).reset_index(drop=True) if shuffle else df


def test_an_influence_table_is_reduced_one_batch_at_a_time(tmp_path):
    """`select --from-influence`, `compare` and `dynamics influence`'s closing summary reduce `influence.parquet` to
    per-sample means while reading it, a batch of rows at a time: the result equals the means over the whole table
    (the definition, computed here by pandas on all rows, whatever the rows' order), and a process reducing a
    4M-row table that way grows by a fraction of what reading it whole costs (peak RSS of each, in its own process)."""
    import subprocess

    import numpy as np
    import pandas as pd

    from dynamics.analyses.loader import per_train_sample_of_file
    from dynamics.influence import summarise

    df = _influence_table(60, 50, (12, 0, 4), seed=0)
    path = tmp_path / "influence.parquet"
    df.to_parquet(path, index=False, row_group_size=1_000)
    per = per_train_sample_of_file(path, batch_rows=97)  # a sample's rows spread over many batches and folds
    g = df.assign(abs_kernel=df.kernel.abs(), negative=(df.cosine < 0).astype(float)).groupby(
        ["ckpt", "step", "train_id"])
    expected = pd.DataFrame({"train_norm": g.train_norm.first(), "mean_abs_kernel": g.abs_kernel.mean(),
                             "mean_kernel": g.kernel.mean(), "mean_cosine": g.cosine.mean(),
                             "frac_negative": g.negative.mean(), "n_probes": g.probe_id.nunique()}).reset_index()
    pd.testing.assert_frame_equal(per, expected, check_exact=False, rtol=1e-10)
    summary = summarise(per)
    assert list(summary) == ["ck0", "ck4", "ck12"]  # in step order: the last one is the latest checkpoint
    for ckpt, s in summary.items():
        rows = df[df.ckpt == ckpt]
        mean_k = rows.groupby("train_id").kernel.mean()
        assert s["mean_abs_kernel"] == pytest.approx(rows.kernel.abs().mean(), rel=1e-10)
        assert s["mean_train_norm"] == pytest.approx(rows.drop_duplicates("train_id").train_norm.mean(), rel=1e-10)
        assert [r["train_id"] for r in s["harmful"]] == list(mean_k.nsmallest(5).index)
        assert [r["train_id"] for r in s["helpful"]] == list(mean_k.nlargest(5).index)
        assert s["harmful"][0]["kernel"] == pytest.approx(mean_k.min(), rel=1e-10)
    assert np.isfinite(per.mean_cosine).all()

    big = tmp_path / "big.parquet"
    _influence_table(2_000, 1_000, (0, 7), seed=1, shuffle=False).to_parquet(big, index=False,
                                                                               row_group_size=256_000)
    script = ("import sys\n"
              "from dynamics.analyses.loader import *\n"
              "def peak(): return int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
              "base = peak()\n"
              "per = per_train_sample_of_file(sys.argv[1], batch_rows=65_536) if sys.argv[2] == 'batches' else "
              "per_train_sample(read_parquet_table(sys.argv[1], INFLUENCE_COLUMNS, INFLUENCE_NUMERIC))\n"
              "print(len(per), peak() - base)\n")  # VmHWM: this process's peak RSS (kB), not its parent's
    grew = {}
    for how in ("batches", "whole"):
        out = subprocess.run([sys.executable, "-c", script, str(big), how], capture_output=True, text=True, check=True)
        n, grew[how] = map(int, out.stdout.split())
        assert n == 4_000
    assert grew["batches"] < grew["whole"] / 2, grew


def test_a_replaced_influence_table_is_reduced_whole(tmp_path):
    """The batched reader opens the file once: while a live run keeps replacing `influence.parquet` (atomically),
    every reduction is that of one of the two tables, never a mix of their batches."""
    from dynamics.analyses.loader import per_train_sample_of_file

    tables = [_influence_table(30, 40, (0,), seed=k) for k in (1, 2)]
    expected = set()
    for k, table in enumerate(tables):
        table.to_parquet(tmp_path / f"{k}.parquet", index=False)
        expected.add(tuple(per_train_sample_of_file(tmp_path / f"{k}.parquet").mean_kernel.round(12)))
    path = tmp_path / "influence.parquet"
    with _replaced_in_turn(path, tables):
        seen = {tuple(per_train_sample_of_file(path, batch_rows=100).mean_kernel.round(12)) for _ in range(60)}
    assert seen <= expected and len(seen) == 2, len(seen)


@contextlib.contextmanager
def _replaced_in_turn(path, tables):
    """Inside the block, a thread keeps replacing ``path`` by each of two tables in turn (atomically, as a live
    run rewrites its tables); the first is there on entry."""
    import threading

    from dynamics.store import atomic_path

    tables[0].to_parquet(path, index=False)
    stop = threading.Event()

    def rewrite() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            with atomic_path(path) as tmp:
                tables[i % 2].to_parquet(tmp, index=False)

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        yield
    finally:
        stop.set()
        writer.join()


def test_concat_parquet_holds_one_file_at_a_time(tmp_path, monkeypatch):
    """store.concat_parquet (how `dynamics influence` merges its shards) writes the files' rows in order into one
    table equal to their concatenation, reading one file at a time: Arrow's allocation when each later file is
    read does not grow with the files already written. A column all null in one file takes the others' type."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dynamics.store import concat_parquet

    n, paths = 20_000, []
    for k in range(6):
        df = pd.DataFrame({"train_id": [f"t{k}-{i}" for i in range(n)], "kernel": np.arange(n) * (k + 0.5),
                           "step": k, "note": None if k == 2 else "x"})
        paths.append(tmp_path / f"{k}.parquet")
        df.to_parquet(paths[-1], index=False)
    held, read_table = [], pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: held.append(pa.total_allocated_bytes()) or read_table(*a, **k))
    concat_parquet(paths, tmp_path / "all.parquet")
    monkeypatch.undo()
    one = pq.read_table(paths[0]).nbytes
    assert len(held) == 6 and max(held[1:]) - min(held[1:]) < one, (held, one)  # held all: 4 more at the last
    merged = pd.read_parquet(tmp_path / "all.parquet")
    expected = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    pd.testing.assert_frame_equal(merged.drop(columns="note"), expected.drop(columns="note"))
    assert merged["note"].isna().sum() == n and (merged["note"].dropna() == "x").sum() == 5 * n
    paths[3].write_bytes(paths[3].read_bytes()[:100])  # a damaged file: named, and nothing written
    with pytest.raises(DynamicsError, match="not a readable parquet file") as e:
        concat_parquet(paths, tmp_path / "again.parquet")
    assert e.value.file == str(paths[3]) and not list(tmp_path.glob("*again*"))


def test_a_probe_with_no_token_to_score_is_named(tmp_path, main_in_process, monkeypatch):
    """A probe whose target, its stored base response, is empty keeps no token under ``--tokens content``
    (select's default: the chat template's end-of-turn is not the answer's): the error names the probe's line
    and field; scoring every completion token works."""
    monkeypatch.chdir(tmp_path)
    ok = str(write_records(tmp_path / "ok.jsonl", [GOOD, {**GOOD, "id": "b"}]))
    probes = str(write_records(tmp_path / "probes.jsonl", [
        {**GOOD, "meta": {"base_response": "4"}}, {**GOOD, "id": "empty", "meta": {"base_response": ""}}]))
    select = ["select", "--data", ok, "--probes", probes, "--model", "tiny-llama", "--budget", "1", "--out", "k.jsonl"]
    code, err = main_in_process(*select)
    assert_clean_error(code, err, "probes.jsonl:2", "nothing is left to score", tmp_path / "k.jsonl")
    assert "field 'meta.base_response (record empty)'" in err, err
    code, err = main_in_process(*select, "--tokens", "all")
    assert code == 0 and (tmp_path / "k.jsonl").is_file(), err

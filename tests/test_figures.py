"""`dynamics figures`: every figure from a stored study, decodable and identical on a second run, inputs left
untouched, absent inputs skipped with a note, malformed ones a one-line error naming the file."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from dynamics.analyses.figures import FiguresConfig, make_figures
from dynamics.analyses.synthetic import write_study
from dynamics.errors import DynamicsError

FIGURES = ("learning_forgetting", "training_curves", "influence_magnitude", "influence_direction",
           "base_alignment", "rollout_sign", "knowledge_categories", "compare")


def digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return write_study(tmp_path_factory.mktemp("study"), n_train=16, n_probes=12, n_task=20, steps=(0, 10, 20, 30))


def run_figures(cli, study, out):
    res = cli("figures", "--runs", str(study), "--out", str(out))
    assert res.returncode == 0, res.stderr
    return res


def test_every_figure_is_written_decodable_and_regenerated_identically(study, tmp_path, cli):
    inputs = digests(study)
    out = tmp_path / "figures"
    res = run_figures(cli, study, out)
    for name in FIGURES:
        assert f"{name}: " in res.stdout
        with Image.open(out / f"{name}.png") as im:
            im.load()
            pixels = np.asarray(im.convert("L"))
        assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 300
        assert len(np.unique(pixels)) > 20  # not blank
        assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    readme = (out / "README.md").read_text()
    command = f"dynamics figures --runs {study} --out {out}"
    assert readme.count(f"`{command}`") >= len(FIGURES)
    for name in FIGURES:
        assert f"## {name}: " in readme and f"]({name}.png)" in readme
    findings = json.loads((out / "findings.json").read_text())
    verdicts = {c["key"]: c["verdict"] for f in findings.values() for c in f["claims"]}
    # the synthetic study has the study's effects built in
    for key in ("sft_learns_faster", "sft_forgets_more", "rft_smaller_train_norm", "rft_aligned",
                "rft_closer_to_base", "likelihood_predicts_magnitude", "positive_smaller_norm"):
        assert verdicts[key] == "held", (key, findings)
    assert "held: SFT learns the novel task faster than RFT" in res.stdout

    first = digests(out)
    make_figures(FiguresConfig(runs=study, out=out))  # what the command calls
    assert digests(out) == first  # idempotent, byte for byte
    assert digests(study) == inputs  # stored results are read, never rewritten


def test_absent_inputs_are_skipped_with_a_note(study, tmp_path, cli):
    only_runs = tmp_path / "study"
    shutil.copytree(study / "runs" / "sft", only_runs / "runs" / "sft")
    (only_runs / "runs" / "sft" / "eval.parquet").unlink()
    out = tmp_path / "figures"
    res = run_figures(cli, only_runs, out)
    assert "skipped influence_magnitude: no influence folder" in res.stdout
    assert "skipped base_alignment: no compare output" in res.stdout
    assert sorted(p.name for p in out.glob("*.png")) == ["knowledge_categories.png", "learning_forgetting.png",
                                                         "training_curves.png"]
    readme = (out / "README.md").read_text()
    assert "## Skipped" in readme and "- rollout_sign: no influence folder" in readme


def test_malformed_inputs_give_one_line_naming_the_file(study, tmp_path, cli):
    bad = tmp_path / "bad"
    shutil.copytree(study / "runs" / "rft", bad / "runs" / "rft")
    ev = bad / "runs" / "rft" / "eval.jsonl"
    lines = ev.read_text().splitlines()
    ev.write_text("\n".join([lines[0], lines[1][:-9], *lines[2:]]) + "\n")
    shutil.copytree(study / "influence" / "sft", bad / "influence" / "sft")
    (bad / "influence" / "sft" / "influence.parquet").write_bytes(b"not parquet")
    res = cli("figures", "--runs", str(bad), "--out", str(tmp_path / "figs"))
    assert res.returncode == 2 and f"{ev}:2: invalid JSON" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    ev.write_text("\n".join(lines) + "\n")
    res = cli("figures", "--runs", str(bad), "--out", str(tmp_path / "figs"))
    assert res.returncode == 2 and f"{bad / 'influence' / 'sft' / 'influence.parquet'}: not a readable parquet" \
        in res.stderr, res.stderr
    with pytest.raises(DynamicsError, match="folder not found"):
        make_figures(FiguresConfig(runs=tmp_path / "absent"))

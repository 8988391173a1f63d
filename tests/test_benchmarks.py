"""The influence benchmark's methods compute the same kernel: each against the naive loop (one backward per
sample, flatten, dot) on the tiny model at the smallest size, with what the project's own environment has
(the peer libraries live only in the benchmark environment, benchmarks/setup_peers.sh)."""

from __future__ import annotations

import functools
import json
import sys

import pytest
import torch

from benchmarks import methods
from benchmarks.influence import BY_NAME, Case, machine, run_case
from benchmarks.influence_core import make_records
from benchmarks.report import HAND_MARK, write_results
from dynamics.influence import InfluenceConfig, exact_kernel
from dynamics.models import load_model


@pytest.fixture(scope="module")
def tiny_inputs():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny kernels: one thread avoids spinning OpenMP waits on a shared CPU
    lm = load_model("tiny-llama", dtype="float64")
    train = make_records(lm.tokenizer, 4, 32, "t", 0)
    probes = make_records(lm.tokenizer, 2, 44, "p", 1)  # longer than the train samples: padding differs
    yield lm, methods.Inputs.of(lm, train, probes)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("scope", ["linear", "all"])
def test_every_exact_method_equals_the_naive_loop(tiny_inputs, scope):
    lm, inputs = tiny_inputs
    ref = methods.naive(lm, inputs, scope=scope)
    assert ref.shape == (4, 2) and ref.abs().max() > 0
    forced = [functools.partial(methods.dynamics_exact, contraction=c) for c in ("ghost", "dense")]
    for fn in (methods.dynamics_exact, methods.torch_func, *forced):
        K = fn(lm, inputs, scope=scope, batch_size=2)
        # the naive loop takes its log-softmax in fp32 (influence_core), hence 1e-6 and not fp64's 1e-12
        torch.testing.assert_close(K, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))


def test_linear_scope_counts_a_tied_head_as_a_head_only(tiny_inputs):
    lm, inputs = tiny_inputs
    linear, everything = (methods.dynamics_exact(lm, inputs, scope=s) for s in ("linear", "all"))
    assert not torch.allclose(linear, everything)  # the embedding's share is outside `linear`
    body = methods.dynamics_exact(lm, inputs, scope="body")
    assert methods.relative_error(body, linear)["rel_fro"] > 1e-3  # the head is outside `body`


def test_projected_features_estimate_the_kernel(tiny_inputs):
    """Random features: each entry's error is within a few √(2/k) of ‖g(u)‖‖g(o)‖ (the JL bound), k = 1024."""
    lm, inputs = tiny_inputs
    cfg = InfluenceConfig(params=methods.body_scope(lm.model), target="gold")
    exact, train_sq, probe_sq = exact_kernel(lm, inputs.train, inputs.probes, cfg)
    scale = train_sq.sqrt()[:, None] * probe_sq.sqrt()[None, :]
    jl = methods.dynamics_projected(lm, inputs, scope="body", projection="jl", proj_dim=1024)
    assert float(((jl - exact).abs() / scale).max()) < 5 * (2 / 1024) ** 0.5
    # kron on 32-wide layers projects each side by a square 32 x 32 Gaussian: unbiased, but far from
    # orthogonal, so one draw distorts every pair alike (errors of order ‖g(u)‖‖g(o)‖ itself)
    kron = methods.dynamics_projected(lm, inputs, scope="body", projection="kron", proj_dim=1024)
    assert 0 < float(((kron - exact).abs() / scale).max()) < 1


def test_benchmark_run_in_subprocesses_agrees_with_naive(tmp_path):
    """The driver itself: each method in its own process, errors against dynamics exact, ratios."""
    names = ["forward+backward (floor)", "dynamics exact linear", "naive loop linear"]
    rows = run_case(Case("tiny-llama", 4, 2, 32, batch_size=2, sweep="n_train"), [BY_NAME[n] for n in names],
                    cap=120, dead={}, log=lambda row: None, repeat=2)
    by = {r["method"]: r for r in rows}
    assert all(r["status"] == "ok" for r in rows), rows
    for r in rows:  # the row is the faster of two runs (the lower median)
        assert len(r["seconds_runs"]) == 2 and r["seconds"] == min(r["seconds_runs"])
    assert by["naive loop linear"]["rel_fro"] < 1e-5
    assert by["dynamics exact linear"]["rel_fro"] < 1e-5  # against the naive loop
    assert by["forward+backward (floor)"]["time_ratio"] > 0 and by["dynamics exact linear"]["extra_mb"] >= 0
    # RESULTS.md is rewritten from the rows; what follows the hand-written marker is kept
    results = tmp_path / "RESULTS.md"
    results.write_text(f"old tables\n{HAND_MARK}\n## Notes\nby hand\n")
    write_results([{"machine": machine(), "command": "cmd", "started": "now", "minutes": 1.0, "rows": rows}],
                  results, tmp_path / "fig.png")
    text = results.read_text()
    assert "old tables" not in text and "| dynamics exact linear |" in text
    assert text.endswith(f"{HAND_MARK}\n## Notes\nby hand\n")
    # runs merged from two machines: each command names its own
    other = {**machine(), "cpu": "Another CPU"}
    write_results([{"machine": machine(), "command": "cmd-a", "started": "now", "minutes": 1.0, "rows": rows},
                   {"machine": other, "command": "cmd-b", "started": "later", "minutes": 2.0, "rows": []}],
                  results, tmp_path / "fig.png")
    lines = results.read_text().splitlines()
    assert any("cmd-a" in x and machine()["cpu"] in x for x in lines)
    assert any("cmd-b" in x and "Another CPU" in x for x in lines)


def test_projection_error_over_draws(tmp_path, monkeypatch):
    """benchmarks/projection_error.py: one error per seed and method, each draw its own (different errors), all
    small on the tiny model (kron keeps its 32-wide sides exactly)."""
    from benchmarks import projection_error

    out = tmp_path / "err.json"
    monkeypatch.setattr(sys, "argv", ["x", "--model", "tiny-llama", "--train", "4", "--tokens", "32", "--seeds", "2",
                                      "--methods", "kron,jl", "--json", str(out)])
    projection_error.main()
    errors = json.loads(out.read_text())["errors"]
    assert set(errors) == {"kron", "jl"} and all(len(e) == 2 for e in errors.values())
    assert errors["jl"][0] != errors["jl"][1]
    assert max(errors["kron"]) < 0.05 and max(errors["jl"]) < 0.5


def test_warm_worker_times_the_second_call(tmp_path, monkeypatch):
    """``--warm``: the worker calls the method once untimed, then times a second call; the cuDNN variant computes
    the same kernel (on CPU there is no cuDNN attention, so it is the same code path)."""
    import gc

    from benchmarks.influence import worker, write_inputs

    case = Case("tiny-llama", 4, 2, 32, batch_size=2, sweep="n_train", warm=True)
    write_inputs(case, tmp_path)
    calls = []
    original = methods.dynamics_exact
    monkeypatch.setattr(methods, "dynamics_exact", lambda *a, **k: calls.append(k) or original(*a, **k))
    kernels = {}
    try:
        for name in ["dynamics exact linear", "dynamics exact linear cudnn"]:
            out = tmp_path / name.replace(" ", "_")
            out.mkdir()
            worker(BY_NAME[name], case, tmp_path, out)
            assert json.loads((out / "result.json").read_text())["seconds"] > 0
            kernels[name] = torch.load(out / "K.pt")
    finally:
        gc.unfreeze()
    assert [k.get("cudnn_attention", False) for k in calls] == [False, False, True, True]
    assert methods.relative_error(*kernels.values())["rel_fro"] < 1e-6

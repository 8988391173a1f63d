"""Live interference monitor: its kernels equal dynamics influence, its predictions follow measured changes,
and for GRPO the push of each rollout follows its advantage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dynamics.influence import InfluenceConfig, compute
from dynamics.models import load_model
from dynamics.store import read_jsonl_rows
from dynamics.train.monitor import InterferenceMonitor, MonitorConfig
from dynamics.train.run import run_trainer
from dynamics.train.sft import SFTRunConfig, build_sft_trainer

TRAIN = [{"id": f"t{i}", "prompt": [{"role": "user", "content": "abc " * (i + 1)}],
          "completion": [{"role": "assistant", "content": "xy" * (i % 3 + 1)}]} for i in range(8)]
PROBES = [{"id": f"p{i}", "prompt": "q" * (2 * i + 1), "completion": "answer"[: i + 2]} for i in range(3)]


def _sft(tmp_path, model, params, steps, lr, records=TRAIN, probes=PROBES, batch=4, bf16=False, refresh=1,
         callbacks=(), monitor=True, accumulate=1, lora_r=0, checkpoint_every=0, **monitor_options):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "probes.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probes))
    cfg = SFTRunConfig(output_dir=str(tmp_path / "run"), model=model, max_steps=steps,
                       per_device_train_batch_size=batch, learning_rate=lr, optim="sgd", lr_scheduler_type="constant",
                       seed=0, max_grad_norm=0.0, bf16=bf16, gradient_accumulation_steps=accumulate,
                       lora_r=lora_r, checkpoint_every=checkpoint_every)
    trainer, resume = build_sft_trainer(cfg, records=records)
    mon = None
    if monitor:
        mon = InterferenceMonitor(MonitorConfig(probes=str(tmp_path / "probes.jsonl"), refresh=refresh,
                                                target="gold", params=params, **monitor_options), load_model(model),
                                  tmp_path / "run",
                                  records=records)
        mon.attach(trainer)
    for cb in callbacks:
        trainer.add_callback(cb)
    run_trainer(trainer, cfg, resume, trainer.run_info)
    return mon


def _sft_with_monitor(tmp_path, *args, **kwargs):
    _sft(tmp_path, *args, **kwargs)
    return read_jsonl_rows(tmp_path / "run" / "monitor.jsonl")


def _grads_with_and_without_monitor(tmp_path, params="linear", **kw):
    """Every gradient the optimizer sees, per step, in the same SFT run without and with the monitor."""
    from transformers import TrainerCallback

    grads = {"plain": [], "mon": []}

    class Grads(TrainerCallback):
        def __init__(self, key):
            self.key = key

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads[self.key].append(
                {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    _sft(tmp_path / "plain", "tiny-llama", params, callbacks=[Grads("plain")], monitor=False, **kw)
    mon = _sft(tmp_path / "mon", "tiny-llama", params, callbacks=[Grads("mon")], **kw)
    return grads["plain"], grads["mon"], mon


def _assert_same_grads(plain, mon, atol=1e-6):
    """Equal per parameter and step within fp32 rounding (``atol`` relative to the largest entry: a few ulps of it,
    since the monitor sums the per-sample gradients in another order than autograd's GEMM)."""
    import torch

    for a, b in zip(plain, mon, strict=True):
        assert a.keys() == b.keys()
        for n in a:
            torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=atol * a[n].abs().max().item())


def test_monitor_kernels_equal_influence(tmp_path):
    rows = _sft_with_monitor(tmp_path, "tiny-llama", "linear", steps=2, lr=1e-3)
    assert rows[0]["step"] == 0 and "measured_logp" in rows[0]
    first = rows[1]  # step 1 ran on the base weights
    by_id = {r["id"]: r for r in TRAIN}
    df = compute(load_model("tiny-llama"), [by_id[i] for i in first["samples"]], PROBES,
                 InfluenceConfig(target="gold"))
    expected = df["kernel"].to_numpy().reshape(len(first["samples"]), len(PROBES))
    np.testing.assert_allclose(np.array(first["kernel"]), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert first["top_harmful"] and {"id", "mean_push"} <= set(first["top_harmful"][0])


def test_monitor_under_bf16_contracts_in_bf16_within_its_error(tmp_path):
    """Under --bf16 the probe store and the contraction are bf16 (the precision of the step being forecast):
    kernels within a few percent of the fp32 influence kernel (docs/numerics.md)."""
    rows = _sft_with_monitor(tmp_path, "tiny-llama", "linear", steps=1, lr=1e-3, bf16=True)
    first = rows[1]
    by_id = {r["id"]: r for r in TRAIN}
    df = compute(load_model("tiny-llama"), [by_id[i] for i in first["samples"]], PROBES,
                 InfluenceConfig(target="gold"))
    expected = df["kernel"].to_numpy().reshape(len(first["samples"]), len(PROBES))
    got = np.array(first["kernel"])
    assert not np.array_equal(got, expected)  # a bf16 computation, not a copy of the fp32 one
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.02
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_fp32_run_whose_store_fits_its_budget_only_in_bf16(tmp_path, dtype):
    """fp32 training, with a memory budget that holds the whole probe store in bf16 but not in fp32: ``auto`` keeps
    the store in bf16 (every layer materialised; kernels within bf16's error of the fp32 influence kernel),
    ``float32`` keeps fp32 (the rest in the exact ghost form). Either way the weight gradients the monitor forms
    are autograd's, in fp32."""

    full = _sft_with_monitor(tmp_path / "full", "tiny-llama", "linear", steps=1, lr=1e-3, dtype="float32")
    full_gib = full[0]["materialised_gib"]
    assert full[0]["store_dtype"] == "float32" and full_gib > 0
    plain, grads, mon = _grads_with_and_without_monitor(tmp_path, steps=2, lr=1e-2, refresh=100, dtype=dtype,
                                                        max_memory_gb=0.75 * full_gib)
    rows = read_jsonl_rows(tmp_path / "mon" / "run" / "monitor.jsonl")
    by_id = {r["id"]: r for r in TRAIN}
    df = compute(load_model("tiny-llama"), [by_id[i] for i in rows[1]["samples"]], PROBES,
                 InfluenceConfig(target="gold"))
    expected = df["kernel"].to_numpy().reshape(len(rows[1]["samples"]), len(PROBES))
    got = np.array(rows[1]["kernel"])
    if dtype == "auto":
        assert rows[0]["store_dtype"] == "bfloat16"
        assert rows[0]["materialised_gib"] == pytest.approx(full_gib / 2, rel=1e-3)  # the whole store, in bf16
        assert not np.array_equal(got, expected)
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.02
    else:
        assert rows[0]["store_dtype"] == "float32" and rows[0]["materialised_gib"] < 0.75 * full_gib
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert mon.owned
    _assert_same_grads(plain, grads)


def test_predicted_change_follows_measured_on_default_model(tmp_path):
    """Each step's predicted per-probe change ⟨g(o), Δθ⟩ against the change measured after the step."""
    probes = [{"id": "fr", "prompt": "What is the capital of France?", "completion": "Paris."},
              {"id": "add", "prompt": "What is 2 + 3?", "completion": "5"},
              {"id": "sky", "prompt": "What colour is the sky?", "completion": "Blue."},
              {"id": "cat", "prompt": "What animal says meow?", "completion": "A cat."}]
    train = [{"id": f"j{i}", "prompt": f"Order the pieces {'BAC'[i % 3]} {'CAB'[i % 3]} {'ABC'[i % 3]}.",
              "completion": ["A B C", "B C A", "C A B"][i % 3]} for i in range(6)]
    rows = _sft_with_monitor(tmp_path, "default", "all", steps=3, lr=1e-5, records=train, probes=probes, batch=2)
    pred, meas = [], []
    for before, after in zip(rows, rows[1:], strict=False):
        pred += after["predicted_dlogp_per_probe"]
        meas += list(np.array(after["measured_logp_per_probe"]) - np.array(before["measured_logp_per_probe"]))
    assert len(pred) == 12
    assert np.corrcoef(pred, meas)[0, 1] > 0.9


def test_predictions_carried_to_the_next_step_equal_the_update_product(tmp_path):
    """Between refreshes a step's prediction rides on the next step's contraction (the last step's, and a
    checkpointed step's, on a pass of its own): every step's ⟨g(o), Δθ⟩ equals the brute-force probe gradients at
    the base weights dotted with the parameter change the step made. A checkpoint's row is on disk when the
    checkpoint is (a run resumed from it would not redo that step)."""
    import torch
    from influence_reference import reference_grads, untied_copy
    from transformers import TrainerCallback

    from dynamics.gradients import scope_parameters

    base = untied_copy(load_model("tiny-llama"))
    names = list(scope_parameters(base.model, "linear"))  # reference_grads' order (the head untied from the embedding)
    snaps = []

    class Snapshot(TrainerCallback):
        def _take(self, model):
            snaps.append(torch.cat([model.get_parameter(n).detach().reshape(-1).clone() for n in names]))

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self._take(model)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self._take(model)

        def on_save(self, args, state, control, **kwargs):
            saved.append((state.global_step, [r["step"] for r in read_jsonl_rows(tmp_path / "run" / "monitor.jsonl")]))

    saved = []
    rows = _sft_with_monitor(tmp_path, "tiny-llama", "linear", steps=4, lr=1e-2, refresh=4, callbacks=[Snapshot()],
                             checkpoint_every=2)
    G = reference_grads(base, PROBES, "linear").double()  # (P, n) at the base weights, the store's until step 4
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and "measured_logp" in rows[4]
    assert saved == [(2, [0, 1, 2]), (4, [0, 1, 2, 3, 4])]
    for k in (1, 2, 3, 4):
        expected = (G @ (snaps[k] - snaps[k - 1]).double()).numpy()
        assert np.abs(expected).max() > 0
        np.testing.assert_allclose(rows[k]["predicted_dlogp_per_probe"], expected, rtol=1e-3,
                                   atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("case", [{}, {"accumulate": 2}, {"lora_r": 4}, {"bf16": True}],
                         ids=["full", "accumulate", "lora", "bf16"])
def test_monitor_forms_the_weight_gradients_autograd_would(tmp_path, case):
    """The linear weights the monitor materialises per sample get their gradient from it (Σ_u ∇L_u; autograd
    skips their weight GEMM): every gradient the optimizer sees equals that of the same run without the monitor
    (with gradient accumulation, on a LoRA adapter; under bf16 autocast within bf16 rounding)."""

    params = "lora" if "lora_r" in case else "linear"
    plain, grads, mon = _grads_with_and_without_monitor(tmp_path, params, steps=2, lr=1e-2, batch=2, **case)
    assert len(mon.owned) >= (2 * 2 * 7 if params == "lora" else 2 * 7)  # every linear layer of both blocks
    assert set(mon.owned) <= set(grads[0])
    assert not set(mon.store.lowrank) & mon.owned  # no ghost terms kept beside the rows of owned layers
    if not case.get("bf16"):
        _assert_same_grads(plain, grads)
        return
    for a, b in zip(plain, grads, strict=True):
        assert a.keys() == b.keys()
        for n in a:
            assert (b[n] - a[n]).norm() <= 0.02 * a[n].norm(), n


def test_layers_materialised_during_training_are_owned_from_the_next_step(tmp_path, monkeypatch):
    """A plan that leaves every layer in ghost form at the refresh (as for GRPO, whose rollouts are not known
    then): a batch that the materialised contraction pays off for materialises a layer, and from the next step on
    the monitor forms that layer's weight gradient, so autograd does not form it a second time. Every gradient
    still equals that of the run without the monitor, and the store drops the ghost terms of the layers it owns."""

    import dynamics.train.monitor as monitor
    from dynamics.gradients import FormPlan

    monkeypatch.setattr(monitor, "plan_forms", lambda rec, *a, **k: FormPlan(dict.fromkeys(rec.uses, "lowrank"), 0))
    owned, kept, begin = [], [], monitor.InterferenceMonitor.on_step_begin

    def spy(self, *args, **kwargs):
        begin(self, *args, **kwargs)
        owned.append(set(self.owned))
        kept.append(set(self.store.lowrank))

    monkeypatch.setattr(monitor.InterferenceMonitor, "on_step_begin", spy)
    long_rows = [{**r, "prompt": [{"role": "user", "content": "abc " * 40}]} for r in TRAIN]
    plain, grads, _ = _grads_with_and_without_monitor(tmp_path, steps=3, lr=1e-2, batch=4, records=long_rows,
                                                      refresh=100)
    assert owned[0] == set() and len(owned[1]) >= 2 * 7  # materialised by step 1's batch, owned from step 2
    assert owned[1] <= kept[0] and not kept[1] & owned[1]
    _assert_same_grads(plain, grads)



def test_the_weights_at_a_steps_start_are_held_once(tmp_path, monkeypatch):
    """A carried step's Δθ = θ_now − θ_before is taken from the buffers holding θ_before, which then take θ_now for
    the next step: one copy of the watched weights is held, not two (the predictions equal the update products:
    test_predictions_carried_to_the_next_step_equal_the_update_product)."""
    import dynamics.train.monitor as monitor

    held, end = [], monitor.InterferenceMonitor.on_step_end

    def spy(self, *args, **kwargs):
        end(self, *args, **kwargs)
        held.append({n: t.data_ptr() for n, t in self._before.items()})

    monkeypatch.setattr(monitor.InterferenceMonitor, "on_step_end", spy)
    mon = _sft(tmp_path, "tiny-llama", "linear", steps=3, lr=1e-2, refresh=100)
    assert len(held) == 3 and held[0].keys() == mon.engine.recorder.params.keys()
    assert held[0] == held[1] == held[2]

@pytest.fixture(scope="module")
def counting_task():
    """A task whose reward varies between samples of a random model (so GRPO advantages are non-zero)."""
    from dataclasses import dataclass, field

    def reward(completions, **kwargs):
        from dynamics.data import text_of

        return [float(text_of(c).count("a")) for c in completions]

    @dataclass
    class Counting:
        name: str = "count-a"
        max_new_tokens: int = 8
        reward_funcs: list = field(default_factory=lambda: [reward])

        def build(self, n, seed):
            return [{"id": f"q{i}", "prompt": [{"role": "user", "content": f"say a {i}"}], "answer": "a"}
                    for i in range(n)]

        def score(self, text, answer):
            r = float(text.count("a"))
            return {"accuracy": float(r > 0), "hit": r, "format": 0.0, "total": r}

    return Counting()


def test_grpo_push_follows_advantage(tmp_path, counting_task):
    from dynamics.train.rft import RFTRunConfig, build_rft_trainer

    (tmp_path / "probes.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBES))
    cfg = RFTRunConfig(output_dir=str(tmp_path / "run"), model="tiny-llama", max_steps=2, learning_rate=1e-4,
                       per_device_train_batch_size=8, num_generations=8, max_completion_length=8, beta=0.0,
                       n_prompts=4, temperature=1.0, seed=0)
    trainer, resume = build_rft_trainer(cfg, task=counting_task)
    mon = InterferenceMonitor(MonitorConfig(probes=str(tmp_path / "probes.jsonl"), refresh=1, target="gold"),
                              load_model("tiny-llama"), tmp_path / "run")
    mon.attach(trainer)
    run_trainer(trainer, cfg, resume, trainer.run_info)
    rows = [r for r in read_jsonl_rows(tmp_path / "run" / "monitor.jsonl") if r.get("samples")]
    assert all(r["mean_abs_kernel"] is None for r in rows)  # GRPO: pushes, not plain kernels
    first = rows[0]  # step 1: the policy gradient at the base weights, ratio 1, no KL
    assert all(":s1:" in s for s in first["samples"])  # rows are known by their rollout ids
    # the same rollouts' plain kernels at the base weights, from their generated token ids
    from dynamics.data import Encoded
    from dynamics.influence import encode_probes, exact_kernel

    base = load_model("tiny-llama")
    cfg_i = InfluenceConfig(target="gold")
    enc = [Encoded(ids, [0] * n + [1] * (len(ids) - n)) for ids, n in (mon.tokens_by_id[s] for s in first["samples"])]
    K, _, _ = exact_kernel(base, enc, encode_probes(base, PROBES, cfg_i), cfg_i)
    adv = np.array(first["advantages"])
    push = np.array(first["push_mean_per_sample"])
    k_mean = K.numpy().mean(1)
    moving = np.abs(adv) > 0.1
    assert moving.sum() >= 2
    # push(u) = c * A_u * K(u) with one positive c for the step: its sign follows the advantage (times K)
    ratio = push[moving] / (adv[moving] * k_mean[moving])
    assert (ratio > 0).all()
    np.testing.assert_allclose(ratio, ratio.mean(), rtol=1e-3)
    assert np.allclose(push[~moving], 0, atol=1e-6 * np.abs(push).max())


@pytest.mark.parametrize("extra", [[], ["--lora", "4"], ["--bf16"], ["--monitor-max-memory", "0"]],
                         ids=["full", "lora", "bf16", "ghost-only"])
def test_train_command_runs_the_monitor(cli, tmp_path, extra):
    """`dynamics train sft --monitor probes.jsonl`: a row per step, the base measurement, refreshes on schedule;
    a LoRA run contracts the adapter's gradients (the only ones its backward computes); under bf16 autocast the
    captured bf16 factors are contracted in fp32; `--monitor-max-memory 0` keeps every probe gradient in ghost
    form (nothing materialised), where the default budget materialises some layers of the full model."""
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN))
    (tmp_path / "probes.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBES))
    args = ["train", "sft", "--model", "tiny-llama", "--data", str(tmp_path / "train.jsonl"), "--max-steps", "3",
            "--batch-size", "4", "--lr", "1e-3", "--monitor", str(tmp_path / "probes.jsonl"),
            "--monitor-refresh", "2", "--out", str(tmp_path / "run")]
    r = cli(*args, *extra)
    assert r.returncode == 0, r.stderr
    rows = read_jsonl_rows(tmp_path / "run" / "monitor.jsonl")
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    assert [("measured_logp" in row) for row in rows] == [True, False, True, False]
    steps = rows[1:]
    assert all(len(row["samples"]) == 4 and set(row["samples"]) <= {t["id"] for t in TRAIN} for row in steps)
    assert all(np.isfinite(row["predicted_dlogp"]) and row["mean_abs_kernel"] > 0 for row in steps)
    assert rows[2]["measured_logp_per_probe"] != rows[0]["measured_logp_per_probe"]  # refreshed after training
    if "--monitor-max-memory" in extra or not extra:  # (LoRA's small factors are cheaper to contract in ghost form)
        assert (rows[0]["materialised_gib"] == 0) == bool(extra)
    # (forecast accuracy is checked at a small SGD step in test_predicted_change_follows_measured_on_default_model)


def test_help_texts_state_the_monitor_defaults(cli_params):
    """The monitor's defaults live in MonitorConfig; the CLI's and the run config's help texts repeat them."""
    from dataclasses import fields

    from dynamics.train.run import RunOptions

    cfg = MonitorConfig(probes="p")
    memory, refresh = f"default {cfg.max_memory_gb:g};", f"default {cfg.refresh})"
    run = {f.name: f for f in fields(RunOptions)}
    assert memory in run["monitor_max_memory"].metadata["help"] and run["monitor_refresh"].default == cfg.refresh
    for kind in ("sft", "rft"):
        params = cli_params("train", kind)
        assert memory in params["monitor_max_memory"].help and refresh in params["monitor_refresh"].help, kind

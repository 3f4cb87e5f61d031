"""Tests of the sweep engine: numerics against a plain per-replica loop, one trace, divergence,
checkpoint/resume (in-process and with a real SIGKILL), 1, 2, 4 and 8 devices (no collectives).

All engine runs use a synthetic dataset (random 28x28x1 images, 10 classes) and the "small" CNN,
so that they test the engine, not the data; the paper's data paths are tested in test_data.py.
Compilation dominates the run time on CPU: the tests share module-scoped runs where they can.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnorm import config as config_lib
from jaxnorm import data as data_lib
from jaxnorm import checkpoint, engine, models, replica, results

REPO = Path(__file__).resolve().parents[1]

# Tolerances: the engine vmaps the train step over replicas, the reference runs one replica at a time;
# XLA may order float32 reductions differently in the two programs, so results agree to rounding
# (~1e-7 relative per op) amplified over a few Adam steps. Adam's update m/sqrt(v) is ~sign(g) for
# the first steps, so differences do not grow beyond ~1e-5 relative in the 10-20 steps used here.
RTOL, ATOL = 2e-4, 2e-5


def synthetic(n_train=400, n_test=150, seed=0) -> data_lib.Dataset:
    """A learnable synthetic 10-class dataset: class-dependent mean images plus noise."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(10, 28, 28, 1)).astype(np.float32)
    y_tr = rng.integers(0, 10, n_train).astype(np.int32)
    y_te = rng.integers(0, 10, n_test).astype(np.int32)
    x_tr = (means[y_tr] + 2.0 * rng.normal(size=(n_train, 28, 28, 1))).astype(np.float32)
    x_te = (means[y_te] + 2.0 * rng.normal(size=(n_test, 28, 28, 1))).astype(np.float32)
    return data_lib.Dataset(name="fashion_mnist", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                            num_classes=10, source="synthetic")


BASE = dict(arch="cnn", dataset="fashion_mnist", size="small", P=[40, 72], seeds=2, epochs=3, batch_size=16,
            test_subset=0, eval_batch=64, margin_epochs=[3], checkpoint_minutes=0.0, replicas_per_device=4)


def cfg_of(**kw) -> config_lib.SweepConfig:
    return config_lib.from_dict({**BASE, **kw})


_REF = {}


def _reference_fns(cfg, ds):
    key = (cfg.arch, cfg.size, cfg.conv_impl, cfg.lr)
    if key not in _REF:
        model = models.get_model(cfg.arch, ds.input_shape, ds.num_classes, size=cfg.size, conv_impl=cfg.conv_impl)
        tx = optax.adam(cfg.lr)

        @jax.jit
        def step(params, opt, x, y, w):
            def loss_fn(p):
                logits, _ = model.apply({"params": p}, x, train=True)
                ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
                return jnp.sum(w * ce) / jnp.sum(w)

            g = jax.grad(loss_fn)(params)
            u, opt = tx.update(g, opt, params)
            return optax.apply_updates(params, u), opt

        _REF[key] = (model, tx, step, jax.jit(lambda p, x: model.apply({"params": p}, x, train=False)[0]))
    return _REF[key]


def reference_run(cfg, ds, P, seed, steps=None):
    """One replica trained by a plain loop: optax.adam(lr), one jitted step per batch, no vmap
    (``steps`` optimizer steps; default: all of them, epochs * ceil(P / batch_size))."""
    model, tx, step, predict = _reference_fns(cfg, ds)
    key_data = replica.replica_key_data(cfg.sweep_seed, P, seed)
    k_init, _ = jax.random.split(jax.random.wrap_key_data(jnp.asarray(key_data), impl="threefry2x32"))
    params = model.init(k_init)["params"]
    opt = tx.init(params)
    subset = data_lib.subset_indices(cfg.sweep_seed, seed, P, ds.n_train)
    for s in range(cfg.epochs * -(-P // cfg.batch_size) if steps is None else steps):
        idx, w = replica.batch_indices(subset, key_data, s, cfg.batch_size)
        params, opt = step(params, opt, ds.x_train[idx], ds.y_train[idx], w)
    logits = np.asarray(predict(params, ds.x_test), np.float64)
    y = ds.y_test
    ce = -(logits[np.arange(len(y)), y] - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1))
           - logits.max(1))
    others = np.where(np.eye(10, dtype=bool)[y], -np.inf, logits).max(1)
    margins = logits[np.arange(len(y)), y] - others
    err = (logits.argmax(1) != y).mean()
    return params, dict(test_loss=ce.mean(), test_error=err, margins=margins)


def final_slot_params(run_dir, n_slots):
    """Params of each slot in the run's final checkpoint (host arrays, leading slot axis)."""
    path = checkpoint.directory(run_dir)
    step, meta = checkpoint.latest_meta(path)
    assert meta["finished"] and meta["n_slots"] == n_slots
    model = models.get_model("cnn", (28, 28, 1), 10, size="small")
    tx = replica.make_optimizer("adam")
    abstract = jax.eval_shape(jax.vmap(lambda k, l: replica.init(model, tx, k, l)),
                              jax.ShapeDtypeStruct((n_slots, 2), jnp.uint32), jax.ShapeDtypeStruct((n_slots,), jnp.float32))
    return checkpoint.restore_state(path, step, abstract).variables["params"]


@pytest.fixture(scope="module")
def ds():
    return synthetic()


@pytest.fixture(scope="module")
def base_run(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    summary = engine.run(cfg_of(), out, quiet=True, dataset=ds)
    return out, summary


def _assert_same_numbers(a, b, rtol=1e-5, atol=1e-6):
    num = [c for c in a.columns if c.startswith(("test_", "train_"))]
    np.testing.assert_allclose(a[num].to_numpy(float), b[num].to_numpy(float), rtol=rtol, atol=atol)
    # Norms: power iteration with tol 1e-5, evaluated in sub-batches that may group replicas
    # differently (another program): agreement to 1e-4 relative.
    nrm = [c for c in a.columns if c.startswith(("spectral", "norm/"))]
    np.testing.assert_allclose(a[nrm].to_numpy(float), b[nrm].to_numpy(float), rtol=max(rtol, 1e-4))


def _strip(df):
    return df.drop(columns=["wall_time"]).reset_index(drop=True)


def _assert_same_run(run_dir, ref_dir, rtol=1e-5, atol=1e-6):
    """The same rows (P, seed, epoch, step) in the same order, and the same numbers to tolerance."""
    a, b = _strip(results.load(run_dir)), _strip(results.load(ref_dir))
    assert list(a[["P", "seed", "epoch", "step"]].itertuples(index=False)) == \
        list(b[["P", "seed", "epoch", "step"]].itertuples(index=False))
    _assert_same_numbers(a, b, rtol=rtol, atol=atol)


def test_engine_matches_plain_per_replica_loop(base_run, ds):
    out, summary = base_run
    cfg = cfg_of()
    df = results.load(out)
    assert summary["finished"] == 4 and summary["diverged"] == 0
    # 4 jobs in 4 slots, never refilled: slot r holds job r of the LPT order at the end.
    final = final_slot_params(out, 4)
    jobs = engine.schedule_lib.make_jobs(cfg.P, range(cfg.seeds), cfg.epochs, cfg.batch_size, cfg.eval_epochs())
    predict = _reference_fns(cfg, ds)[3]
    for r, job in enumerate(jobs):
        P, seed = job.P, job.seed
        ref_params, ref = reference_run(cfg, ds, P, seed)
        got = jax.tree.map(lambda a: a[r], final)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
        row = df[(df.P == P) & (df.seed == seed) & (df.epoch == cfg.epochs)].iloc[0]
        assert row.step == cfg.epochs * -(-P // cfg.batch_size)
        np.testing.assert_allclose(row.test_loss, ref["test_loss"], rtol=1e-4)
        np.testing.assert_allclose(row.test_error, ref["test_error"], atol=1.5 / ds.n_test)  # one flip
        m = results.load_margins(out, P, seed, cfg.epochs)
        assert m.shape == (ds.n_test,) and m.dtype == np.float32
        np.testing.assert_allclose(m, ref["margins"], rtol=1e-3, atol=1e-4)
        # Train error: on the replica's own subset.
        sub = data_lib.subset_indices(cfg.sweep_seed, seed, P, ds.n_train)
        err = float((np.asarray(predict(got, ds.x_train[sub])).argmax(1) != ds.y_train[sub]).mean())
        assert abs(row.train_error - err) <= 1.5 / P


def test_results_table_has_one_row_per_replica_and_eval_point(base_run):
    out, _ = base_run
    df = results.load(out)
    cfg = cfg_of()
    assert len(df) == 4 * len(cfg.eval_epochs())
    for col in ("arch", "dataset", "P", "seed", "epoch", "step", "test_error", "test_loss", "train_error",
                "train_loss", "spectral_complexity", "wall_time", "replica", "diverged"):
        assert col in df.columns
    layers = [l.name for l in models.get_model("cnn", (28, 28, 1), 10, size="small").layout]
    for name in layers:
        assert f"norm/{name}/spec" in df.columns and f"norm/{name}/l21" in df.columns
    assert (df.spectral_complexity > 0).all() and not df.diverged.any()
    assert sorted(df.epoch.unique()) == list(cfg.eval_epochs())
    # the saved config and versions
    saved = config_lib.from_json((out / "config.json").read_text())
    assert saved == cfg
    v = json.loads((out / "versions.json").read_text())
    assert {"jax", "jaxlib", "flax", "optax", "numpy", "python"} <= set(v)


def test_train_step_is_traced_once(base_run):
    _, summary = base_run
    # 4 jobs in 4 slots, never compacted (too few steps left): one slot count, one trace of each
    # program (the engine's run is the first in this process to use them).
    assert summary["traces"] == {"train": 1, "init": 1, "norms": 1, "eval_test": 1, "eval_train": 1}


def test_simulated_schedule_is_the_trained_one(base_run):
    # The engine and the idle-fraction simulator run the same event loop (SlotPool.next_dispatch).
    _, summary = base_run
    cfg = cfg_of()
    sim = engine.schedule_lib.simulate_idle_fraction(cfg.P, cfg.seeds, cfg.epochs, cfg.batch_size, cfg.eval_epochs(),
                                                     n_slots=summary["slots"], steps_per_dispatch=summary["steps_per_dispatch"])
    assert (sim["busy_steps"], sim["idle_steps"]) == (summary["busy_replica_steps"], summary["idle_replica_steps"])


def test_summary_times_training_norms_and_metrics(base_run):
    _, summary = base_run
    sec = summary["seconds_by_part"]
    assert set(sec) == set(engine.SECONDS)
    assert sec["train"] > 0 and sec["eval_norms"] > 0 and sec["eval_metrics"] > 0
    assert sum(sec.values()) <= summary["wall_time"] + 0.1  # disjoint parts of the run's wall time
    cfg = cfg_of()
    assert summary["train_images_per_s"] == pytest.approx(
        summary["busy_replica_steps"] * cfg.batch_size / sec["train"], rel=1e-2)
    assert summary["norm_fraction"] == pytest.approx(sec["eval_norms"] / sec["train"], rel=1e-2, abs=1e-4)


def test_resumed_summary_adds_the_earlier_segments_seconds(two_ckpt_run, ds, tmp_path):
    run_dir, _ = _copy_run(two_ckpt_run, tmp_path / "run")
    meta = json.loads((run_dir / "checkpoints" / "2" / "meta.json").read_text())
    before = meta["seconds_by_part"]
    assert before["train"] > 0 and before["eval_norms"] > 0
    summary = engine.run(cfg_of(**TWO_CKPT), run_dir, quiet=True, dataset=ds)
    for k, v in before.items():
        assert summary["seconds_by_part"][k] >= round(v, 2) - 0.01, k


def test_rerun_of_finished_sweep_is_noop(base_run, ds):
    out, _ = base_run
    before = (out / "results.csv").read_bytes()
    summary = engine.run(cfg_of(), out, quiet=True, dataset=ds)
    assert summary["noop"]
    assert (out / "results.csv").read_bytes() == before


def test_config_mismatch_with_run_dir_is_a_clear_error(base_run, ds):
    out, _ = base_run
    with pytest.raises(engine.RunDirMismatch, match=r"epochs: 3 in the run dir vs 4 now"):
        engine.run(cfg_of(epochs=4), out, quiet=True, dataset=ds)
    with pytest.raises(ValueError, match="no run to resume"):
        engine.run(cfg_of(), out / "nothing", resume=True, quiet=True, dataset=ds)


def test_bad_input_leaves_no_run_directory(ds, tmp_path):
    # P above the training-set size, and data that is not there: a clear error, nothing written.
    with pytest.raises(ValueError, match="P values \\[401\\] exceed the 400 training examples"):
        engine.run(cfg_of(P=[40, 401]), tmp_path / "a", quiet=True, dataset=ds)
    with pytest.raises(data_lib.DataNotFoundError, match="mnist"):
        engine.run(cfg_of(dataset="mnist", data_dir=str(tmp_path / "empty")), tmp_path / "b", quiet=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_diverged_replica_is_flagged_and_others_are_untouched(base_run, ds, tmp_path):
    out0, _ = base_run
    cfg = cfg_of(lr_overrides=[{"P": 72, "seed": 1, "lr": 1e38}])
    summary = engine.run(cfg, tmp_path, quiet=True, dataset=ds)
    assert summary["diverged"] == 1
    df, df0 = results.load(tmp_path), results.load(out0)
    bad = df[(df.P == 72) & (df.seed == 1)]
    assert bad.diverged.sum() == 1 and bad.diverged.iloc[-1]
    assert np.isnan(bad[bad.diverged].test_error).all()
    good = df[~((df.P == 72) & (df.seed == 1))]
    good0 = df0[~((df0.P == 72) & (df0.seed == 1))]
    num = [c for c in good.columns if c.startswith(("test_", "train_"))]
    # Training is the same program with the same inputs per lane: losses and errors agree to rounding.
    np.testing.assert_allclose(good[num].to_numpy(float), good0[num].to_numpy(float), rtol=1e-6, atol=1e-6)
    # The norms are evaluated in sub-batches whose size changes once the diverged replica is gone
    # (another compiled program), and warm-started power iteration stops at tol = 1e-5: agreement
    # to 1e-4 relative.
    nrm = [c for c in good.columns if c.startswith(("spectral", "norm/"))]
    np.testing.assert_allclose(good[nrm].to_numpy(float), good0[nrm].to_numpy(float), rtol=1e-4)


def test_checkpoint_resume_equals_uninterrupted(base_run, ds, tmp_path):
    out0, _ = base_run
    # One step per dispatch (the base run has 8: results must not depend on it) and a checkpoint
    # every epoch. Stop after 7 dispatches without the final checkpoint: results.csv then holds
    # rows written after the last checkpoint, which the resume must trim and redo.
    cfg = cfg_of(checkpoint_epochs=1, steps_per_dispatch=1)
    r = engine.run(cfg, tmp_path, quiet=True, dataset=ds, stop_after_dispatches=7)
    assert r == {"stopped": True}
    assert (tmp_path / "checkpoints").exists()
    engine.run(cfg, tmp_path, quiet=True, dataset=ds)
    _assert_same_run(tmp_path, out0)


def test_out_of_device_memory_says_what_to_lower(base_run, ds, tmp_path):
    eng = engine.Engine(cfg_of(), tmp_path, dataset=ds)

    def oom(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes")

    eng.p = eng.p._replace(train=oom)
    with pytest.raises(MemoryError, match=r"4 replicas per device.*Lower --replicas-per-device"):
        eng.run()


def test_results_round_trip_and_torn_line(tmp_path):
    w = results.Writer(tmp_path / "results.csv", results.columns(["conv1"]))
    rows = [dict(arch="cnn", dataset="mnist", size="small", P=89, seed=s, replica=89000 + s, epoch=e, step=2 * e,
                 test_error=0.1 + 1e-9 * e, test_loss=1 / 3, train_error=0.0, train_loss=2 ** -20,
                 spectral_complexity=12345.678901234567, wall_time=1.5, diverged=False, lr=1e-3,
                 **{"norm/conv1/spec": 1.0000001, "norm/conv1/l21": 7e-12}) for s in range(2) for e in range(3)]
    rows.append(dict(arch="cnn", dataset="mnist", size="small", P=89, seed=2, replica=89002, epoch=1, step=2,
                     wall_time=2.0, diverged=True, lr=1.0))
    w.append(rows)
    with open(tmp_path / "results.csv", "a") as f:
        f.write("cnn,mnist,small,89,3")  # a crash in the middle of a write
    df = results.load(tmp_path)
    assert len(df) == len(rows)
    ok = df[~df.diverged]
    assert ok.test_loss.iloc[0] == 1 / 3 and ok.spectral_complexity.iloc[0] == 12345.678901234567  # exact repr
    assert ok["norm/conv1/l21"].iloc[0] == 7e-12 and ok.train_loss.iloc[0] == 2 ** -20
    assert df.diverged.sum() == 1 and np.isnan(df[df.diverged].test_error).all()
    assert df.P.dtype == np.int64 and df.epoch.dtype == np.int64


# ------------------------------------------------------------------------------------------------
# eval_schedule = "log_steps": evaluations at log-spaced optimizer steps per P (issue 15)
# ------------------------------------------------------------------------------------------------

# P = 40 and 200 at batch 16: 3 and 13 steps per epoch, 9 and 39 steps; 12 log-spaced points dedup
# to 8 and 11 distinct steps (+ step 0), most of them off epoch boundaries; margins at epoch 3 (the last step).
LOG_STEPS = dict(P=[40, 200], epochs=3, eval_schedule="log_steps", eval_points=12)


def _geomspace_grid(total: int, points: int) -> list[int]:
    return [int(x) for x in np.unique(np.round(np.geomspace(1, total, points)))]


@pytest.fixture(scope="module")
def log_steps_run(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("log_steps")
    summary = engine.run(cfg_of(**LOG_STEPS), out, quiet=True, dataset=ds)
    assert summary["finished"] == 4 and summary["diverged"] == 0
    return out


def test_log_steps_rows_are_at_the_step_grid_with_exact_epochs(log_steps_run):
    df = results.load(log_steps_run)
    assert df.epoch.dtype == np.float64 and df.step.dtype == np.int64
    for (P, seed), g in df.groupby(["P", "seed"]):
        spe = -(-P // 16)
        grid = [0] + _geomspace_grid(3 * spe, 12)  # margin epoch 3 is the last step, already there
        assert list(g.step) == grid, (P, seed)
        np.testing.assert_array_equal(g.epoch.to_numpy(), np.asarray(grid) / spe)  # step / steps per epoch
    assert [len(g) for _, g in df.groupby("P")] == [2 * 9, 2 * 12]  # P = 40, 200
    # P = 200 is evaluated 7 times inside its first epoch (13 steps), an epoch schedule once.
    assert sorted(df[(df.P == 200) & (df.seed == 0) & (df.step > 0) & (df.step <= 13)].step) == \
        [1, 2, 3, 4, 5, 7, 10]
    # Margins only at epoch boundaries listed in margin_epochs (epoch 3), under the integer epoch.
    assert sorted(p.name for p in (log_steps_run / "margins").iterdir()) == \
        [f"P{P}_s{s}_e3.npy" for P in (200, 40) for s in (0, 1)]


def test_log_steps_evaluates_the_network_of_that_step(log_steps_run, ds):
    # Off an epoch boundary the row is the network after exactly `step` steps: a plain loop trained
    # for that many steps gives the same test loss (tolerance: see RTOL above).
    df = results.load(log_steps_run)
    cfg = cfg_of(**LOG_STEPS)
    for P, seed, step in ((200, 1, 7), (40, 0, 4)):
        row = df[(df.P == P) & (df.seed == seed) & (df.step == step)].iloc[0]
        assert row.epoch == step / -(-P // 16) and not float(row.epoch).is_integer()
        _, ref = reference_run(cfg, ds, P, seed, steps=step)
        np.testing.assert_allclose(row.test_loss, ref["test_loss"], rtol=1e-4)


def test_log_steps_results_go_through_the_analysis(log_steps_run):
    from jaxnorm import analysis

    df = analysis.clean(results.load(log_steps_run))
    curves = analysis.mean_curves(df)
    # Seeds of one P share the step grid: the seed mean has one point per step, in step order.
    assert [len(c) for c in curves.values()] == [9, 12]
    assert all(np.all(np.diff(c["epoch"].to_numpy()) > 0) for c in curves.values())
    opt = analysis.optima(df)
    assert set(opt.epoch_end) == {3} and all(isinstance(v, (int, float)) for v in opt.epoch_opt)
    assert {(r.P, r.seed): r.epoch_opt for r in opt.itertuples()} == {
        (P, s): analysis._epoch_value(g.sort_values("spectral_complexity", kind="stable").epoch.iloc[
            analysis.curve_optimum(g.sort_values("spectral_complexity", kind="stable").spectral_complexity.to_numpy(),
                                   g.sort_values("spectral_complexity", kind="stable").test_error.to_numpy(),
                                   "vertex")["index"]]) for (P, s), g in df.groupby(["P", "seed"])}


def test_log_steps_checkpoint_resume_equals_uninterrupted(log_steps_run, ds, tmp_path):
    # One step per dispatch, a checkpoint every epoch; stopped after 20 of 39 dispatches without a final
    # checkpoint (rows past the last one are trimmed and redone by the resume).
    cfg = cfg_of(**LOG_STEPS, checkpoint_epochs=1, steps_per_dispatch=1)
    assert engine.run(cfg, tmp_path, quiet=True, dataset=ds, stop_after_dispatches=20) == {"stopped": True}
    assert any(p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir())
    engine.run(cfg, tmp_path, quiet=True, dataset=ds)
    _assert_same_run(tmp_path, log_steps_run)


# ------------------------------------------------------------------------------------------------
# Verified resume: checksums of state.npz and of the results prefix in each checkpoint (issue 13)
# ------------------------------------------------------------------------------------------------

# Two periodic checkpoints (one step per dispatch, a checkpoint every epoch), stopped after 12
# dispatches without a final one: results.csv holds rows past checkpoint 2 (as after a SIGKILL).
TWO_CKPT = dict(checkpoint_epochs=1, steps_per_dispatch=1)


@pytest.fixture(scope="module")
def two_ckpt_run(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ckpt")
    assert engine.run(cfg_of(**TWO_CKPT), out, quiet=True, dataset=ds, stop_after_dispatches=12) == {"stopped": True}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1", "2"]
    return out


def _copy_run(src: Path, dst: Path) -> tuple[Path, dict]:
    """A copy of a run directory and the results mark of each of its checkpoints ({step: meta["results"]})."""
    shutil.copytree(src, dst)
    ck = dst / "checkpoints"
    return dst, {int(p.name): json.loads((p / "meta.json").read_text())["results"] for p in ck.iterdir()}


def _snapshot(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()
            and not p.name.startswith(".lock-")}


def _resume_to_reference(run_dir, ds, ref_dir, capsys, cfg_kw=TWO_CKPT) -> str:
    """Reruns ``run_dir`` to the end; checks no NUL byte and the reference rows; returns stderr."""
    summary = engine.run(cfg_of(**cfg_kw), run_dir, quiet=True, dataset=ds)
    assert not summary.get("noop")
    assert b"\0" not in (run_dir / "results.csv").read_bytes()
    _assert_same_run(run_dir, ref_dir)
    return capsys.readouterr().err


def test_results_cut_past_the_newest_checkpoint_resumes_from_it(base_run, two_ckpt_run, ds, tmp_path, capsys):
    run_dir, marks = _copy_run(two_ckpt_run, tmp_path / "run")
    with open(run_dir / "results.csv", "r+b") as f:  # `truncate -s -7 results.csv`: rows past step 2 only
        f.truncate(f.seek(0, 2) - 7)
    assert (run_dir / "results.csv").stat().st_size > marks[2]["size"]
    err = _resume_to_reference(run_dir, ds, base_run[0], capsys)
    assert "warning" not in err


def test_results_cut_right_after_a_checkpoint_falls_back_never_pads(base_run, two_ckpt_run, ds, tmp_path, capsys):
    # Killed right after checkpoint 2 (results.csv ends at its mark), then `truncate -s -7`: the
    # file is 7 bytes shorter than checkpoint 2 covers. Old behaviour: 7 NUL bytes, two rows merged.
    run_dir, marks = _copy_run(two_ckpt_run, tmp_path / "run")
    with open(run_dir / "results.csv", "r+b") as f:
        f.truncate(marks[2]["size"] - 7)
    err = _resume_to_reference(run_dir, ds, base_run[0], capsys)
    lines = [l for l in err.splitlines() if l.startswith("warning")]
    assert len(lines) == 1 and f"checkpoints/2: {str(run_dir / 'results.csv')!r} is 7 bytes shorter" in lines[0]
    assert lines[0].endswith("using step 1")


def test_edited_results_prefix_falls_back_to_the_checkpoint_before(base_run, two_ckpt_run, ds, tmp_path, capsys):
    run_dir, marks = _copy_run(two_ckpt_run, tmp_path / "run")
    with open(run_dir / "results.csv", "r+b") as f:  # one byte changed between the two marks
        f.seek((marks[1]["size"] + marks[2]["size"]) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(b"7" if b != b"7" else b"8")
    err = _resume_to_reference(run_dir, ds, base_run[0], capsys)
    assert "checkpoints/2: " in err and "differs from what the checkpoint recorded" in err and "using step 1" in err


def test_garbled_state_npz_falls_back_to_the_older_checkpoint(base_run, two_ckpt_run, ds, tmp_path, capsys):
    # 4 KiB of random bytes inside the newest checkpoint's state (old behaviour: a false diverged row).
    run_dir, _ = _copy_run(two_ckpt_run, tmp_path / "run")
    state = run_dir / "checkpoints" / "2" / "state.npz"
    with open(state, "r+b") as f:
        f.seek(state.stat().st_size // 2)
        f.write(np.random.default_rng(0).bytes(4096))
    err = _resume_to_reference(run_dir, ds, base_run[0], capsys)
    assert f"warning: checkpoint {run_dir / 'checkpoints' / '2'}: state.npz does not match its checksum; " \
           f"using step 1" in err.splitlines()


def test_garbage_meta_json_falls_back_to_the_older_checkpoint(base_run, two_ckpt_run, ds, tmp_path, capsys):
    run_dir, _ = _copy_run(two_ckpt_run, tmp_path / "run")
    (run_dir / "checkpoints" / "2" / "meta.json").write_bytes(np.random.default_rng(1).bytes(300))
    err = _resume_to_reference(run_dir, ds, base_run[0], capsys)
    assert "checkpoints/2: meta.json does not parse" in err and "using step 1" in err


def test_no_verifying_checkpoint_is_a_one_line_refusal_that_changes_nothing(two_ckpt_run, ds, tmp_path, capsys):
    from jaxnorm import cli
    run_dir, marks = _copy_run(two_ckpt_run, tmp_path / "run")
    (run_dir / "checkpoints" / "2" / "meta.json").write_text("{")
    with open(run_dir / "checkpoints" / "1" / "state.npz", "r+b") as f:
        f.seek(1000)
        f.write(b"\xff" * 64)
    before = _snapshot(run_dir)
    code = cli.guard(lambda argv: engine.run(cfg_of(**TWO_CKPT), run_dir, quiet=True, dataset=ds), [])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: no checkpoint of ") and "checkpoints/2: meta.json does not parse" in err[0]
    assert "checkpoints/1: state.npz does not match its checksum" in err[0] and "--overwrite" in err[0]
    assert _snapshot(run_dir) == before  # nothing deleted, truncated or padded
    # A results file shorter than every checkpoint covers: the same refusal.
    run2, _ = _copy_run(two_ckpt_run, tmp_path / "run2")
    with open(run2 / "results.csv", "r+b") as f:
        f.truncate(marks[1]["size"] - 7)
    before = _snapshot(run2)
    with pytest.raises(checkpoint.NoValidCheckpoint, match="7 bytes shorter"):
        engine.run(cfg_of(**TWO_CKPT), run2, quiet=True, dataset=ds)
    assert _snapshot(run2) == before


def test_finished_run_with_short_results_is_never_nothing_to_do(base_run, two_ckpt_run, ds, tmp_path, capsys):
    # Finished with an older checkpoint kept: the cut results fail the final checkpoint, the run
    # resumes from the one before and ends with the uninterrupted rows (old: "nothing to do", 11 of 12 rows).
    run_dir, _ = _copy_run(two_ckpt_run, tmp_path / "run")
    engine.run(cfg_of(**TWO_CKPT), run_dir, quiet=True, dataset=ds)
    with open(run_dir / "results.csv", "r+b") as f:
        f.truncate(f.seek(0, 2) - 7)
    err = _resume_to_reference(run_dir, ds, base_run[0], capsys)
    assert "is 7 bytes shorter" in err and "using step" in err
    # The base run kept only its final checkpoint: refused, nothing changed.
    run2, _ = _copy_run(base_run[0], tmp_path / "base")
    with open(run2 / "results.csv", "r+b") as f:
        f.truncate(f.seek(0, 2) - 7)
    before = _snapshot(run2)
    with pytest.raises(checkpoint.NoValidCheckpoint, match="7 bytes shorter"):
        engine.run(cfg_of(), run2, quiet=True, dataset=ds)
    assert _snapshot(run2) == before


def test_each_process_verifies_its_own_shard(base_run, ds, tmp_path, capsys):
    # Two shards written in-process (process_index/process_count, no jax.distributed): a garbled
    # checkpoint of shard 1 makes shard 1 fall back; shard 0 is untouched by it.
    kw = dict(quiet=True, dataset=ds, process_count=2, stop_after_dispatches=12)
    for i in range(2):
        engine.run(cfg_of(**TWO_CKPT), tmp_path, process_index=i, **kw)
    steps = sorted(p.name for p in (tmp_path / "checkpoints" / "p1").iterdir())
    assert len(steps) == 2
    (tmp_path / "checkpoints" / "p1" / steps[-1] / "meta.json").write_text("[]")
    capsys.readouterr()
    for i in range(2):
        engine.run(cfg_of(**TWO_CKPT), tmp_path, quiet=True, dataset=ds, process_index=i, process_count=2)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and f"checkpoints/p1/{steps[-1]}: meta.json lacks the checksums" in err
    assert b"\0" not in (tmp_path / "results.p1.csv").read_bytes()
    _assert_same_run(tmp_path, base_run[0])


def test_writer_truncate_never_grows_a_file(tmp_path):
    w = results.Writer(tmp_path / "results.csv", ["a", "b"])
    w.append([dict(a=1, b=2)])
    size = w.size()
    with pytest.raises(ValueError, match=f"holds {size} bytes, fewer than the {size + 7} to keep; refusing to pad"):
        w.truncate(size + 7)
    assert w.size() == size and b"\0" not in (tmp_path / "results.csv").read_bytes()
    w.truncate(size - 4)
    assert w.size() == size - 4


# ------------------------------------------------------------------------------------------------
# Subprocess tests: SIGKILL + rerun, and several devices
# ------------------------------------------------------------------------------------------------

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import jax
    jax.config.update("jax_compilation_cache_dir", {cache!r})
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from test_engine import synthetic, cfg_of
    from jaxnorm import engine
    cfg = cfg_of(**json.loads(sys.argv[2]))
    run_kw = json.loads(sys.argv[3])
    if "distributed" in run_kw:  # [coordinator address, process count, process id]
        addr, n, i = run_kw.pop("distributed")
        jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=i)
    s = engine.run(cfg, sys.argv[1], quiet=True, dataset=synthetic(), **run_kw)
    print(json.dumps({{"devices": jax.local_device_count(), **s}}))
""")
COLLECTIVES = re.compile(r"\b(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)(-start)?\(")


def _script(tmp_path, cache) -> Path:
    p = tmp_path / "run_sweep.py"
    p.write_text(SCRIPT.format(tests=str(Path(__file__).parent), cache=str(cache)))
    return p


def _sweep(script, run_dir, kw: dict | None = None, devices: int | None = None, run_kw: dict | None = None,
           dump: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs the sweep script in a fresh interpreter on ``devices`` CPU devices (``dump``: XLA's dump folder)."""
    args = [sys.executable, str(script), str(run_dir), json.dumps(kw or {}), json.dumps(run_kw or {})]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    flags = f"--xla_force_host_platform_device_count={devices}" if devices else ""
    if dump is not None:
        flags += f" --xla_dump_to={dump} --xla_dump_hlo_as_text"
    if flags:
        env["XLA_FLAGS"] = flags.strip()
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _summary(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _sigkill_after_checkpoints(proc, run_dir, min_rows: int, poll: float = 0.05, timeout: float = 300) -> None:
    """SIGKILLs ``proc`` once ``run_dir`` holds two checkpoint steps and more than ``min_rows`` result lines."""
    deadline, killed = time.time() + timeout, False
    while time.time() < deadline and proc.poll() is None:
        ck = run_dir / "checkpoints"
        steps = [p for p in ck.iterdir() if p.name.isdigit()] if ck.exists() else []
        rows = (run_dir / "results.csv").read_text().count("\n") if (run_dir / "results.csv").exists() else 0
        if len(steps) >= 2 and rows > min_rows:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(poll)
    proc.wait()
    assert killed, "the run finished before it could be killed; " + proc.stderr.read().decode()[-2000:]


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(base_run, tmp_path):
    out0, _ = base_run
    script = _script(tmp_path, tmp_path / "cache")
    run_dir = tmp_path / "run"
    kw = dict(checkpoint_epochs=1)
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), json.dumps(kw), "{}"],
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Kill it once a checkpoint exists and more rows have been written after it.
    _sigkill_after_checkpoints(proc, run_dir, min_rows=8)
    _summary(_sweep(script, run_dir, kw, timeout=600))
    _assert_same_run(run_dir, out0)


@pytest.mark.slow
def test_log_steps_sigkill_then_rerun_equals_uninterrupted(log_steps_run, tmp_path):
    script = _script(tmp_path, tmp_path / "cache")
    run_dir = tmp_path / "run"
    kw = dict(LOG_STEPS, checkpoint_epochs=1, steps_per_dispatch=1)
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), json.dumps(kw), "{}"],
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _sigkill_after_checkpoints(proc, run_dir, min_rows=20, poll=0.02)
    _summary(_sweep(script, run_dir, kw, timeout=600))
    _assert_same_run(run_dir, log_steps_run)


# A sweep that exercises every multi-device path: 20 jobs in 2 slots per device (refills), with 2
# steps per dispatch a compaction on 1, 2, 4 and 8 devices (compact_min_steps=0; the grid was picked
# with jaxnorm.schedule), evaluations at epochs 0, 1, 2 with margins at 2, a checkpoint every epoch.
LADDER = dict(P=[40, 48, 56, 72], seeds=5, epochs=2, margin_epochs=[2], replicas_per_device=2, checkpoint_epochs=1,
              steps_per_dispatch=2)
LADDER_RUN = dict(compact_min_steps=0)


@pytest.fixture(scope="module")
def ladder_run(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("ladder")
    summary = engine.run(cfg_of(**LADDER), out, quiet=True, dataset=ds, **LADDER_RUN)
    assert summary["devices"] == 1 and summary["slots"] == 2 and summary["compactions"] >= 1
    return out


def _check_devices(ladder_run, tmp_path, n: int):
    # The 1-device run takes the slots one by one (lax.map), n devices n pairs at once, evaluations
    # in other sub-batches: different programs, so agreement is to float tolerance, not bits.
    dump = tmp_path / "xla"
    info = _summary(_sweep(_script(tmp_path, tmp_path / "cache"), tmp_path / "run", LADDER, devices=n,
                           run_kw=LADDER_RUN, dump=dump))
    assert info["devices"] == n and info["slots"] == 2 * n and info["finished"] == 20 and info["compactions"] >= 1
    _assert_same_run(tmp_path / "run", ladder_run, rtol=RTOL, atol=ATOL)
    for e in (2,):
        for P, s in ((40, 0), (72, 4)):
            np.testing.assert_allclose(results.load_margins(tmp_path / "run", P, s, e),
                                       results.load_margins(ladder_run, P, s, e), rtol=1e-3, atol=1e-4)
    # Replicas never communicate: no compiled program of the run holds a collective (issue 12: an
    # all-gather from gathering due slots with a replicated index deadlocked 4 devices on 2 cores).
    hlo = sorted(dump.glob("*after_optimizations.txt"))
    assert len(hlo) >= 6
    found = {f.name: COLLECTIVES.findall(f.read_text()) for f in hlo}
    assert not any(found.values()), {k: v for k, v in found.items() if v}


def test_two_devices_match_one_with_refills_compaction_and_no_collectives(ladder_run, tmp_path):
    _check_devices(ladder_run, tmp_path, 2)


@pytest.mark.slow
@pytest.mark.parametrize("n", [4, 8])
def test_four_and_eight_devices_match_one(ladder_run, tmp_path, n):
    _check_devices(ladder_run, tmp_path, n)


def test_run_started_on_one_device_resumes_on_two(base_run, tmp_path):
    # `--cpu-devices` may change between a run and its resume (another machine, another choice):
    # the resumed run must give the same rows and numbers to float tolerance.
    out0, _ = base_run
    script = _script(tmp_path, tmp_path / "cache")
    run_dir = tmp_path / "run"
    kw = dict(checkpoint_epochs=1)
    first = _summary(_sweep(script, run_dir, kw, devices=1, run_kw=dict(stop_after_dispatches=2)))
    assert first["stopped"]
    assert any(p.name.isdigit() for p in (run_dir / "checkpoints").iterdir())  # something to resume from
    rows_before = (run_dir / "results.csv").read_text().count("\n")
    rest = _summary(_sweep(script, run_dir, kw, devices=2))
    assert rest["devices"] == 2
    assert 1 < rows_before < (run_dir / "results.csv").read_text().count("\n")
    _assert_same_run(run_dir, out0, rtol=RTOL, atol=ATOL)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_processes(script, run_dir, kw: dict, run_kw: dict) -> list[dict]:
    """One sweep on 2 processes of jax.distributed on localhost (1 CPU device each)."""
    addr = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(run_dir), json.dumps(kw),
                               json.dumps({**run_kw, "distributed": [addr, 2, i]})],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def test_two_processes_of_jax_distributed_resume_and_merge_to_the_one_process_rows(base_run, tmp_path):
    # Issue 12: every process runs the same command, takes jobs[i::2], writes its own shard of the
    # one run directory; a rerun of the same command on every process resumes; results.load merges.
    out0, _ = base_run
    script = _script(tmp_path, tmp_path / "cache")
    run_dir = tmp_path / "run"
    kw = dict(checkpoint_epochs=1)
    first = _two_processes(script, run_dir, kw, dict(stop_after_dispatches=2))
    assert all(s["stopped"] for s in first)
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"p0", "p1"}
    rest = _two_processes(script, run_dir, kw, {})
    assert sorted((s["process_index"], s["process_count"], s["jobs"], s["finished"]) for s in rest) == \
        [(0, 2, 2, 2), (1, 2, 2, 2)]
    shards = [results._read(run_dir / f"results.p{i}.csv") for i in range(2)]
    # LPT order (72, 0), (72, 1), (40, 0), (40, 1): process 0 takes jobs 0 and 2, process 1 jobs 1 and 3.
    assert [sorted(set(zip(d.P, d.seed))) for d in shards] == [[(40, 0), (72, 0)], [(40, 1), (72, 1)]]
    _assert_same_run(run_dir, out0, rtol=RTOL, atol=ATOL)
    # The same directory run by one process is another layout: a clear error, nothing touched.
    with pytest.raises(engine.RunDirMismatch, match="another number of processes"):
        engine.run(cfg_of(**kw), run_dir, quiet=True, dataset=synthetic())


@pytest.mark.parametrize("argv, message", [
    (["--num-processes", "2"], "go with --distributed"),
    (["--distributed", "--overwrite"], "delete the run directory first"),
])
def test_distributed_flags_are_checked_at_the_edge(argv, message, capsys, tmp_path):
    from jaxnorm import sweep

    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--arch", "cnn", "--dataset", "fashion_mnist", "--out", str(tmp_path / "x"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_distributed_needs_all_three_explicit_settings_or_none():
    from jaxnorm import sweep

    assert "go together" in sweep.init_distributed(coordinator_address="127.0.0.1:1234")
    assert "allowed: 0 .. 1" in sweep.init_distributed("127.0.0.1:1234", 2, 5)

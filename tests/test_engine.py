"""Tests of the sweep engine: numerics against a plain per-replica loop, one trace, divergence,
checkpoint/resume (in-process and with a real SIGKILL), 1 vs 8 devices, the schedule.

All engine runs use a synthetic dataset (random 28x28x1 images, 10 classes) and the "small" CNN,
so that they test the engine, not the data; the paper's data paths are tested in test_data.py.
Compilation dominates the run time on CPU: the tests share module-scoped runs where they can.
"""

from __future__ import annotations

import json
import os
import signal
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
from jaxnorm import engine, models, results

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


def reference_run(cfg, ds, P, seed):
    """One replica trained by a plain loop: optax.adam(lr), one jitted step per batch, no vmap."""
    model, tx, step, predict = _reference_fns(cfg, ds)
    key = jax.random.wrap_key_data(jnp.asarray(engine.replica_key_data(cfg.sweep_seed, P, seed)),
                                   impl="threefry2x32")
    k_model, _ = jax.random.split(key)
    params = model.init(k_model)["params"]
    opt = tx.init(params)

    subset = data_lib.subset_indices(cfg.sweep_seed, seed, P, ds.n_train)
    spe = -(-P // cfg.batch_size)
    for s in range(cfg.epochs * spe):
        idx, w = engine.batch_indices(subset, cfg.sweep_seed, P, seed, s, cfg.batch_size)
        params, opt = step(params, opt, ds.x_train[idx], ds.y_train[idx], w)
    logits = np.asarray(predict(params, ds.x_test), np.float64)
    y = ds.y_test
    ce = -(logits[np.arange(len(y)), y] - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1))
           - logits.max(1))
    others = np.where(np.eye(10, dtype=bool)[y], -np.inf, logits).max(1)
    margins = logits[np.arange(len(y)), y] - others
    err = (logits.argmax(1) != y).mean()
    return params, dict(test_loss=ce.mean(), test_error=err, margins=margins)


@pytest.fixture(scope="module")
def ds():
    return synthetic()


@pytest.fixture(scope="module")
def base_run(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    box = []
    summary = engine.run(cfg_of(), out, quiet=True, dataset=ds, engine_out=box)
    return out, summary, box[0]


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
    out, summary, eng = base_run
    cfg = cfg_of()
    df = results.load(out)
    assert summary["finished"] == 4 and summary["diverged"] == 0
    for P in (40, 72):
        for seed in (0, 1):
            ref_params, ref = reference_run(cfg, ds, P, seed)
            got = eng.final[(P, seed)]["params"]
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref_params)):
                np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
            row = df[(df.P == P) & (df.seed == seed) & (df.epoch == cfg.epochs)].iloc[0]
            assert row.step == cfg.epochs * -(-P // cfg.batch_size)
            np.testing.assert_allclose(row.test_loss, ref["test_loss"], rtol=1e-4)
            np.testing.assert_allclose(row.test_error, ref["test_error"], atol=1.5 / ds.n_test)  # one flip
            m = results.load_margins(out, P, seed, cfg.epochs)
            assert m.shape == (ds.n_test,) and m.dtype == np.float32
            np.testing.assert_allclose(m, ref["margins"], rtol=1e-3, atol=1e-4)


def test_results_table_has_one_row_per_replica_and_eval_point(base_run):
    out, _, _ = base_run
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
    assert {"jax", "flax", "optax", "orbax_checkpoint"} <= set(v)


def test_train_error_is_measured_on_the_replicas_subset(base_run, ds):
    out, _, eng = base_run
    cfg = cfg_of()
    df = results.load(out)
    predict = _reference_fns(cfg, ds)[3]
    for (P, seed), variables in eng.final.items():
        sub = data_lib.subset_indices(cfg.sweep_seed, seed, P, ds.n_train)
        logits = predict(variables["params"], ds.x_train[sub])
        err = float((np.asarray(logits).argmax(1) != ds.y_train[sub]).mean())
        row = df[(df.P == P) & (df.seed == seed) & (df.epoch == cfg.epochs)].iloc[0]
        assert abs(row.train_error - err) <= 1.5 / P


def test_train_step_is_traced_once(base_run):
    _, _, eng = base_run
    # 4 jobs in 4 slots, never compacted (too few steps left): one slot count, one trace.
    assert eng.trace_count["train"] == 1


def test_rerun_of_finished_sweep_is_noop(base_run, ds):
    out, _, _ = base_run
    before = (out / "results.csv").read_bytes()
    summary = engine.run(cfg_of(), out, quiet=True, dataset=ds)
    assert summary["noop"]
    assert (out / "results.csv").read_bytes() == before


def test_config_mismatch_with_run_dir_is_a_clear_error(base_run, ds):
    out, _, _ = base_run
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
    out0, _, _ = base_run
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
    out0, _, _ = base_run
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
    eng = engine.Engine(cfg_of(), tmp_path, dataset=ds, quiet=True)

    def oom(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes")

    eng._train = oom
    with pytest.raises(MemoryError, match=r"4 replicas per device.*Lower --replicas-per-device"):
        eng.run()


def test_results_round_trip_and_torn_line(tmp_path):
    cols = list(engine.BASE_COLUMNS) + ["norm/conv1/spec", "norm/conv1/l21"]
    w = engine._Results(tmp_path / "results.csv", cols)
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
# The schedule
# ------------------------------------------------------------------------------------------------


def test_scheduler_gives_every_job_exactly_its_steps():
    ev = config_lib.eval_epochs(5, "log", 1, 4, True)
    jobs = engine.make_jobs([10, 50, 200, 333], range(3), 5, 16, ev)
    sched = engine.Scheduler(jobs, 4, 3, compact_min_steps=0)
    evaluated = {j.index: [] for j in jobs}
    while True:
        sched.fill()
        due = sched.due_for_eval()
        for r in due:
            evaluated[sched.slot_job[r]].append(sched.slot_pos[r])
        sched.mark_evaluated(due)
        if sched.release_finished() and sched.queue:
            continue
        if sched.done():
            break
        keep = sched.compaction()
        if keep is not None:
            sched.apply_compaction(keep)
        n = sched.plan()
        assert (n <= 3).all()
        sched.advance(n)
    assert sched.busy_steps == sum(j.total_steps for j in jobs)
    for j in jobs:
        assert evaluated[j.index] == list(j.eval_steps)
    assert sched.n_slots < 4  # compacted during the drain


def test_slot_ladder_terminates_with_strictly_decreasing_multiples():
    for n_dev in (1, 2, 3, 4, 8):
        for n_slots in range(1, 70):
            lad = engine.slot_ladder(n_slots, n_dev)  # used to loop forever, e.g. (4, 2), (16, 8)
            assert lad[-1] == n_dev and all(s % n_dev == 0 for s in lad)
            assert all(a > b for a, b in zip(lad, lad[1:]))
    assert engine.slot_ladder(8, 1) == [8, 6, 4, 3, 2, 1] and engine.slot_ladder(4, 2) == [4, 2]


def test_equal_jobs_in_equal_slots_never_idle():
    r = engine.simulate_idle_fraction([64], 8, 10, 16, range(11), n_slots=8, steps_per_dispatch=1)
    assert r["idle_fraction"] == 0.0 and r["busy_steps"] == 8 * 10 * 4


def test_idle_fraction_under_ten_percent_on_a_paper_grid():
    # CIFAR ResNet/ViT grid of Appendix E (the worst of bench_engine.py --idle at K = 16), eval every
    # epoch, automatic slot count; 100 epochs instead of 1000 to keep the simulation fast (the idle
    # fraction is a ratio of per-epoch quantities: 1000 epochs gives 5.3%, see the bench).
    P, epochs, B = config_lib.CIFAR_DEEP_P, 100, 128
    ev = config_lib.eval_epochs(epochs, "every", 1, 60, True)
    jobs = engine.make_jobs(P, range(5), epochs, B, ev)
    R = engine.choose_slots(jobs, 0, 1, "gpu")
    r = engine.simulate_idle_fraction(P, 5, epochs, B, ev, R, steps_per_dispatch=16)
    assert r["idle_fraction"] < 0.10


# ------------------------------------------------------------------------------------------------
# Subprocess tests: SIGKILL + rerun, and 1 vs 8 devices
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
    stop = int(sys.argv[3]) if len(sys.argv) > 3 else None
    s = engine.run(cfg, sys.argv[1], quiet=True, dataset=synthetic(), stop_after_dispatches=stop)
    print(json.dumps({{"devices": jax.device_count(), **s}}))
""")


def _script(tmp_path, cache) -> Path:
    p = tmp_path / "run_sweep.py"
    p.write_text(SCRIPT.format(tests=str(Path(__file__).parent), cache=str(cache)))
    return p


def _sweep(script, run_dir, kw: str = "{}", devices: int | None = None, stop: int | None = None,
           timeout: int = 180) -> subprocess.CompletedProcess:
    """Runs the sweep script in a fresh interpreter (``devices`` CPU devices, stop after ``stop`` dispatches)."""
    args = [sys.executable, str(script), str(run_dir), kw] + ([str(stop)] if stop else [])
    return subprocess.run(args, env=_env(devices), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _env(devices: int | None = None) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(base_run, tmp_path):
    out0, _, _ = base_run
    script = _script(tmp_path, tmp_path / "cache")
    run_dir = tmp_path / "run"
    kw = json.dumps(dict(checkpoint_epochs=1))
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), kw], env=_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Kill it once a checkpoint exists and more rows have been written after it.
    deadline = time.time() + 300
    killed = False
    while time.time() < deadline and proc.poll() is None:
        ck = run_dir / "checkpoints"
        steps = [p for p in ck.iterdir() if p.name.isdigit()] if ck.exists() else []
        rows = (run_dir / "results.csv").read_text().count("\n") if (run_dir / "results.csv").exists() else 0
        if len(steps) >= 2 and rows > 8:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    proc.wait()
    assert killed, "the run finished before it could be killed; " + proc.stderr.read().decode()[-2000:]
    done = _sweep(script, run_dir, kw, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_run(run_dir, out0)


@pytest.mark.slow
def test_one_and_eight_devices_give_the_same_results(base_run, tmp_path):
    out0, _, _ = base_run
    script = _script(tmp_path, tmp_path / "cache")
    # 8 devices, 1 replica slot per device: R = 8 slots (4 jobs + 4 masked dummies), replicas batched
    # by vmap; the 1-device reference has R = 4 slots run by lax.map (the CPU default). Different
    # programs, so agreement is to float tolerance, not bits.
    kw = json.dumps(dict(replicas_per_device=1, replica_axis="vmap"))
    done = _sweep(script, tmp_path / "run8", kw, devices=8, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["devices"] == 8 and info["slots"] == 8
    _assert_same_run(tmp_path / "run8", out0, rtol=RTOL, atol=ATOL)


def test_two_devices_default_replica_axis_finishes_and_matches_one_device(base_run, tmp_path):
    # Regression: with >1 device the sweep hung (1) in slot_ladder (rounding up to a multiple of the
    # device count undid the shrink: 4 -> 3 -> 4, forever) and (2) in the first evaluation (the norms'
    # power-iteration while_loop, SPMD-partitioned over the sharded replica axis, deadlocked on a
    # collective). Default replica axis ("map" on CPU), 2 devices x 2 slots; base_run: 1 device x 4.
    out0, _, _ = base_run
    script = _script(tmp_path, tmp_path / "cache")
    done = _sweep(script, tmp_path / "run2", devices=2)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["devices"] == 2 and info["slots"] == 4
    _assert_same_run(tmp_path / "run2", out0, rtol=RTOL, atol=ATOL)


def test_run_started_on_one_device_resumes_on_two(base_run, tmp_path):
    # `--cpu-devices` may change between a run and its resume (another machine, another choice):
    # the resumed run must give the same rows and numbers to float tolerance.
    out0, _, _ = base_run
    script = _script(tmp_path, tmp_path / "cache")
    run_dir = tmp_path / "run"
    kw = json.dumps(dict(checkpoint_epochs=1))
    first = _sweep(script, run_dir, kw, devices=1, stop=2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert '"stopped": true' in first.stdout
    assert any(p.name.isdigit() for p in (run_dir / "checkpoints").iterdir())  # something to resume from
    rows_before = (run_dir / "results.csv").read_text().count("\n")
    rest = _sweep(script, run_dir, kw, devices=2)
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert json.loads(rest.stdout.strip().splitlines()[-1])["devices"] == 2
    assert 1 < rows_before < (run_dir / "results.csv").read_text().count("\n")
    _assert_same_run(run_dir, out0, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------------------
# Data order
# ------------------------------------------------------------------------------------------------


def test_each_epoch_visits_the_subset_once_without_replacement():
    sub = np.arange(500, 537, dtype=np.int32)  # P = 37, B = 8: 5 steps, the last one with 5 examples
    for epoch in range(3):
        seen, weights = [], []
        for b in range(5):
            idx, w = engine.batch_indices(sub, 0, 37, 0, epoch * 5 + b, 8)
            seen += list(idx[w > 0])
            weights.append(w.sum())
        assert sorted(seen) == list(sub) and weights == [8, 8, 8, 8, 5]
    a, _ = engine.batch_indices(sub, 0, 37, 0, 0, 8)
    b, _ = engine.batch_indices(sub, 0, 37, 0, 5, 8)
    assert (a != b).any()  # a new order each epoch


def test_vectorized_dispatch_batches_equal_the_step_by_step_definition():
    class Stub:  # the attributes _slot_batches reads
        cfg = config_lib.from_dict(dict(P=[37], seeds=1, epochs=4, batch_size=8))
        jobs = engine.make_jobs([37], [0], 4, 8, (0, 4))
        _order_cache: dict = {}

        def _subset(self, j):
            return np.arange(100, 137, dtype=np.int32)

    stub = Stub()
    for pos, n in ((0, 1), (3, 9), (4, 16)):  # within, across one and across several epoch boundaries
        idx, w = engine.Engine._slot_batches(stub, 0, pos, n)
        for k in range(n):
            ri, rw = engine.batch_indices(stub._subset(0), 0, 37, 0, pos + k, 8)
            np.testing.assert_array_equal(idx[k], ri)
            np.testing.assert_array_equal(w[k], rw)

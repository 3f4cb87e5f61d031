"""Cost of logging the norms (jaxnorm.norms.evaluate: R_A with its certified bounds and the norm zoo) once,
against one training epoch: the cost of evaluating every epoch (eval_every=1), an upper bound on the cost at
the paper's own schedule (the authors' train/training.py logs at the ~40 distinct epochs of
np.logspace(0, log10(T), 50) over T = 500 or 1000 epochs). A sweep measures the cost at its real schedule:
summary.json's seconds_by_part.eval_norms and norm_fraction (jaxnorm.engine).

For each architecture, R replicas are trained together as the engine does on CPU (K = 8 Adam steps per dispatch
in a ``lax.scan``, ``lax.map`` over replicas; ``--replica-axis vmap`` for the accelerator formulation), batch 64,
lr 1e-3, each replica drawing its own batches from a shared pool of P examples, and we time:

  * one training epoch at P (= P / batch steps; with ``--steps N`` only N steps are timed and the epoch is
    extrapolated linearly -- steps have static shapes, so their cost is constant);
  * one norm evaluation of all R replicas (``norms.evaluate``: R_A, the certified upper bounds, the zoo incl. the
    distances from initialization and the path norm; jit + vmap, no host round trip), cold (random start
    vectors, run to ``--tol``) and warm (started from the state of the previous evaluation, after the timed
    training steps moved the weights);
  * the power-iteration counts of both (max over replicas, per conv layer) and each conv's certified relative
    gap spec_upper / spec - 1 (max over replicas) after the warm evaluation.

The last table prints warm/epoch and, the issue-11 criterion (< 10%), the fraction of training time spent on
norm logging at the paper's own schedule: the paper trains CNNs for 500 epochs and ResNets and ViTs for 1000
(Appendix E) and its authors' code evaluates at the distinct epochs of ``np.logspace(0, log10(T), 50)`` (40 for
T = 500, 42 for T = 1000), so ``paper = (cold + (n - 1) warm) / (T epoch)``, from this run's measured cold
evaluation, warm evaluation after ``--steps`` of training and epoch.

Data are synthetic (Gaussian images, random labels): timings do not depend on the values.

Usage:
  python bench/bench_norms.py                       # cnn, resnet, vit, R=16, P=4096, 32x32x3, paper size
  python bench/bench_norms.py --arch cnn --steps 64 --R 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnorm import norms
from jaxnorm.config import SweepConfig
from jaxnorm.models import get_model


def _timeit(fn, repeats):
    """(min wall seconds over ``repeats`` calls, last output). The minimum, not the median: on a shared machine
    (2 cores, load average ~10 while this was written) single timings of the same pure call varied 50-fold;
    the minimum is the least contended estimate of the cost, and it is taken the same way for training and norms."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best, out


def make_train_chunk(model, tx, batch, p, k_steps, replica_axis):
    """K Adam steps per dispatch for every replica, as the engine runs them: a ``lax.scan`` over the K steps of
    one replica, then ``lax.map`` ("map", the engine's CPU default: unbatched convs one replica after another)
    or ``jax.vmap`` ("vmap", its accelerator default) over replicas. (params, other, opt_state, key) per replica."""

    def loss_fn(params, other, x, y):
        logits, new_state = model.apply({"params": params, **other}, x, True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_state

    def chunk(params, other, opt_state, key, pool_x, pool_y):
        def step(carry, k):
            params, other, opt_state = carry
            idx = jax.random.randint(k, (batch,), 0, p)
            (loss, new_state), g = jax.value_and_grad(loss_fn, has_aux=True)(params, other, pool_x[idx], pool_y[idx])
            updates, opt_state = tx.update(g, opt_state, params)
            return (optax.apply_updates(params, updates), {**other, **new_state}, opt_state), loss

        (params, other, opt_state), losses = jax.lax.scan(step, (params, other, opt_state),
                                                          jax.random.split(key, k_steps))
        return params, other, opt_state, losses[-1]

    if replica_axis == "map":
        f = lambda params, other, opt, keys, px, py: jax.lax.map(  # noqa: E731
            lambda a: chunk(*a, px, py), (params, other, opt, keys))
    else:
        f = jax.vmap(chunk, in_axes=(0, 0, 0, 0, None, None))
    return jax.jit(f)


def bench_arch(arch, args):
    model = get_model(arch, tuple(args.input_shape), args.classes, size=args.size)
    r = args.R
    keys = jax.random.split(jax.random.PRNGKey(0), r)
    variables = jax.jit(jax.vmap(model.init))(keys)
    params = variables["params"]
    other = {k: v for k, v in variables.items() if k != "params"}
    tx = optax.adam(1e-3)
    opt_state = jax.jit(jax.vmap(tx.init))(params)
    rng = np.random.default_rng(0)
    pool_x = jnp.asarray(rng.normal(size=(args.P,) + tuple(args.input_shape)), jnp.float32)
    pool_y = jnp.asarray(rng.integers(0, args.classes, size=(args.P,)), jnp.int32)
    step = make_train_chunk(model, tx, args.batch, args.P, args.K, args.replica_axis)
    steps_per_epoch = args.P // args.batch
    n_steps = min(args.steps or steps_per_epoch, steps_per_epoch)

    # --- norms, cold start (before training) ---
    opts = dict(definition=args.definition, norm_layers=args.norm_layers, attention=args.attention, tol=args.tol,
                max_iters=args.max_iters, dense_method=args.dense_method, conv_bound=args.conv_bound,
                krylov=args.krylov)
    apply_fn = lambda v, x: model.apply(v, x, False)[0]  # noqa: E731

    def one(v, s):
        return norms.evaluate(v, model.layout, s, apply_fn=apply_fn, input_shape=model.input_shape, **opts)

    f = jax.jit(jax.vmap(one))
    v_init = {"params": params, **other}
    state0 = jax.jit(jax.vmap(lambda k, v: norms.init_norm_state(model.layout, k, init_variables=v)))(keys, v_init)
    t = time.perf_counter()
    f_c = f.lower(v_init, state0).compile()
    t_compile_norm = time.perf_counter() - t
    t_cold, res = _timeit(lambda: f_c(v_init, state0), args.repeats)
    state = res.state
    cold_iters = np.asarray(state["iters"]).max(axis=0)

    # --- training ---
    k = jax.random.PRNGKey(1)
    t = time.perf_counter()
    params, other, opt_state, loss = step(params, other, opt_state, jax.random.split(k, r), pool_x, pool_y)
    jax.block_until_ready(loss)
    t_compile_step = time.perf_counter() - t
    n_chunks = max(1, n_steps // args.K)
    chunk_times = []
    for i in range(n_chunks):
        ks = jax.random.split(jax.random.fold_in(k, i + 1), r)
        t = time.perf_counter()
        params, other, opt_state, loss = step(params, other, opt_state, ks, pool_x, pool_y)
        jax.block_until_ready(loss)
        chunk_times.append(time.perf_counter() - t)
    n_steps = n_chunks * args.K
    t_steps = sum(chunk_times)
    t_epoch = min(chunk_times) / args.K * steps_per_epoch  # the least contended chunk, as for the norms

    # --- norms, warm start after those training steps ---
    v = {"params": params, **other}
    t_warm, res = _timeit(lambda: f_c(v, state), args.repeats)  # pure: each repeat does the same work
    warm_state = res.state
    warm_iters = np.asarray(warm_state["iters"]).max(axis=0)
    # Steady state: the warm evaluation of the next epoch (weights unchanged) runs min_iters.
    t_warm2, _ = _timeit(lambda: f_c(v, warm_state), args.repeats)

    stateful = [l.name for l in model.layout if l.kind in ("conv", "dense")]
    conv_idx = [i for i, l in enumerate(l for l in model.layout if l.kind in ("conv", "dense")) if l.kind == "conv"]
    print(f"\n== {arch} (size={args.size}, input {tuple(args.input_shape)}, R={r}, P={args.P}, batch {args.batch}, "
          f"{len(model.layout)} layout entries, norm_layers={args.norm_layers}, attention={args.attention}, "
          f"tol={args.tol}, conv_bound={args.conv_bound}, krylov={args.krylov})")
    print(f"compile: norm {t_compile_norm:.1f} s, train step {t_compile_step:.1f} s")
    print(f"train: {n_chunks} dispatches of {args.K} steps in {t_steps:.2f} s (fastest {min(chunk_times):.3f} s) -> "
          f"epoch ({steps_per_epoch} steps) {t_epoch:.2f} s")
    for what, tw in (("cold start", t_cold), (f"warm start after {n_steps} steps", t_warm),
                     ("warm, converged state", t_warm2)):
        print(f"norm eval, {what}: {tw * 1e3:.1f} ms ({100 * tw / t_epoch:.2f}% of an epoch)")
    print("conv layers: power iterations (max over replicas) cold -> warm; certified gap spec_upper/spec - 1 (max):")
    for i in conv_idx:
        name = stateful[i]
        gap = max(float(np.max(np.asarray(p["spec_upper"]) / np.asarray(p["spec"]) - 1))
                  for n, p in res.parts.items() if n == name) if name in res.parts else float("nan")
        print(f"  {name:28s} {int(cold_iters[i]):5d} -> {int(warm_iters[i]):3d}   gap {gap:.2e}")
    print(f"max certified gap {float(np.max(res.max_gap)):.2e}; unconverged readings {int(np.sum(res.unconverged))}")
    print(f"R_A (replica 0) after training: {float(res.total[0]):.4g}  in [{float(res.total[0]):.4g}, "
          f"{float(res.total_upper[0]):.4g}]")
    print("zoo (replica 0): " + ", ".join(f"{k} {float(x[0]):.4g}" for k, x in res.zoo.items()))
    epochs = PAPER_EPOCHS[arch]
    n_eval = paper_eval_count(epochs)
    paper = (t_cold + (n_eval - 1) * t_warm) / (epochs * t_epoch)
    return dict(arch=arch, epoch_s=t_epoch, cold_s=t_cold, warm_s=t_warm, warm2_s=t_warm2, paper=paper,
                paper_epochs=epochs, paper_evals=n_eval)


PAPER_EPOCHS = {"cnn": 500, "resnet": 1000, "vit": 1000}  # paper, Appendix E


def paper_eval_count(epochs: int) -> int:
    """Distinct evaluation epochs of the authors' schedule, ``np.logspace(0, log10(T), 50)`` as integers."""
    return len(np.unique(np.logspace(0, np.log10(epochs), 50).astype(int)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["cnn", "resnet", "vit"], choices=["cnn", "resnet", "vit"])
    ap.add_argument("--size", default="paper", choices=["paper", "small"])
    ap.add_argument("--input-shape", type=int, nargs=3, default=[32, 32, 3])
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--R", type=int, default=16)
    ap.add_argument("--P", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=0, help="training steps to time (0: a whole epoch)")
    ap.add_argument("--K", type=int, default=8, help="steps per dispatch (the engine's CPU default: 8)")
    ap.add_argument("--replica-axis", default="map", choices=["map", "vmap"],
                    help="replicas of the training step: the engine's CPU default 'map', or 'vmap'")
    ap.add_argument("--definition", default="paper", choices=list(norms.DEFINITIONS))
    ap.add_argument("--norm-layers", default="fold", choices=list(norms.NORM_LAYERS))
    ap.add_argument("--attention", default="stacked", choices=list(norms.ATTENTIONS))
    ap.add_argument("--dense-method", default=SweepConfig.dense_method, choices=list(norms.DENSE_METHODS),
                    help="dense spectral norms; default: the sweep's (jaxnorm.config)")
    ap.add_argument("--conv-bound", default="exact", choices=list(norms.CONV_BOUNDS),
                    help="certified upper bound of conv norms (jaxnorm.norms module docstring)")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--max-iters", type=int, default=500)
    ap.add_argument("--krylov", type=int, default=norms.KRYLOV, help="Lanczos cycle length (0: power iteration)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    load0 = os.getloadavg()
    rows = [bench_arch(a, args) for a in args.arch]
    print(f"\nload average before the run: {load0}; after: {os.getloadavg()}")
    print("arch     epoch_s  norm_cold_ms  norm_warm_ms  norm_converged_ms  warm/epoch  converged/epoch  "
          "paper schedule")
    for r in rows:
        print(f"{r['arch']:8s} {r['epoch_s']:7.2f}  {r['cold_s'] * 1e3:12.1f}  {r['warm_s'] * 1e3:12.1f}  "
              f"{r['warm2_s'] * 1e3:17.1f}  {100 * r['warm_s'] / r['epoch_s']:9.2f}%  "
              f"{100 * r['warm2_s'] / r['epoch_s']:14.2f}%  {100 * r['paper']:6.2f}% "
              f"({r['paper_evals']} evaluations in {r['paper_epochs']} epochs)")


if __name__ == "__main__":
    main()

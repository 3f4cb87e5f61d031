"""Throughput of a vmapped Adam train step of LeNet-5 under each conv implementation.

Why: ``jax.vmap`` over replicas with per-replica conv kernels lowers to a grouped
convolution, which XLA:CPU runs slowly (jax issues #15339, #26568); the engine
trains R replicas in one step, so ``jaxnorm.models`` offers convolutions as
patches + (batched) matmul. This script measures, in one run, images/s of:

  plain        one plain Flax LeNet-5 (nn.Conv, nn.max_pool, nn.Dense), no vmap,
               one model per dispatch (the baseline);
  vmap/<impl>  ``jax.vmap`` over R replicas of a train step of
               ``get_model("cnn", (28, 28, 1), 10, conv_impl=impl)``;
  map/<impl>   ``jax.lax.map`` (a loop inside one program) over R replicas;
  assembly     the patch matrix of LeNet-5's conv1 (5x5 taps of a [64, 28, 28, 1] batch) built
               by one concatenate of 25 slices vs two concatenates of 5 (what ``models`` does),
               and channels-first (taps on the leading axis) as "phase" does.

Batch 64 per replica, 28x28x1, 10 classes, Adam lr 1e-3, float32, random data.
Ratios are relative to ``plain``. Timings on a loaded machine are noisy: run it
alone when numbers matter.

Usage: python bench/bench_conv.py [--replicas 1 4 16] [--seconds 3] [--impls xla patches im2col phase]
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxnorm import models as M

BATCH = 64
SHAPE = (28, 28, 1)
K = 10


class PlainLeNet5(nn.Module):
    """The same LeNet-5 written with stock Flax layers."""

    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(nn.relu(nn.Conv(6, (5, 5), padding="SAME")(x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.relu(nn.Conv(16, (5, 5), padding="VALID")(x)), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120)(x))
        x = nn.relu(nn.Dense(84)(x))
        return nn.Dense(K)(x)


def make_step(apply_fn, opt):
    """(params, opt_state, x [B,H,W,C], y [B]) -> (params, opt_state, loss) for one replica."""

    def step(params, opt_state, x, y):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def time_step(step, params, opt_state, x, y, seconds: float) -> tuple[float, float, float]:
    """Returns (compile+first-call seconds, steps per wall second, steps per process-CPU second).

    The CPU-second rate is less sensitive to other processes sharing the machine.
    """
    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, x, y)
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - t0
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        params, opt_state, loss = step(params, opt_state, x, y)
        n += 1
        if n % 2 == 0:
            jax.block_until_ready(loss)
            if time.perf_counter() - t0 >= seconds:
                break
    jax.block_until_ready(loss)
    return compile_s, n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--impls", nargs="+", default=["xla", "patches", "im2col", "phase"])
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per configuration")
    ap.add_argument("--no-map", action="store_true", help="skip the lax.map variants")
    args = ap.parse_args()
    for impl in args.impls:
        if impl not in M.CONV_IMPLS[1:]:
            raise ValueError(f"--impls {impl!r}; allowed: {M.CONV_IMPLS[1:]}")

    opt = optax.adam(1e-3)
    key = jax.random.key(0)
    print(f"backend={jax.default_backend()} devices={jax.devices()} auto->{M.resolve_conv_impl('auto')}")
    rows = []

    plain = PlainLeNet5()
    p = plain.init(key, jnp.zeros((1,) + SHAPE))["params"]
    x = jax.random.normal(key, (BATCH,) + SHAPE)
    y = jax.random.randint(key, (BATCH,), 0, K)
    step = jax.jit(make_step(lambda p, x: plain.apply({"params": p}, x), opt), donate_argnums=(0, 1))
    c, sps, spc = time_step(step, p, opt.init(p), x, y, args.seconds)
    base, base_cpu = sps * BATCH, spc * BATCH
    rows.append(("plain (no vmap)", 1, c, base, base_cpu))

    variants = [(f"vmap/{impl}", impl, "vmap") for impl in args.impls]
    if not args.no_map:
        variants += [(f"map/{impl}", impl, "map") for impl in args.impls if impl != "im2col"]
    for label, impl, how in variants:
        model = M.get_model("cnn", SHAPE, K, conv_impl=impl)
        one = make_step(lambda p, x, model=model: model.apply({"params": p}, x, True)[0], opt)
        for r in args.replicas:
            keys = jax.random.split(key, r)
            params = jax.vmap(lambda k: model.init(k)["params"])(keys)
            opt_state = jax.vmap(opt.init)(params)
            xs = jax.random.normal(key, (r, BATCH) + SHAPE)
            ys = jax.random.randint(key, (r, BATCH), 0, K)
            if how == "vmap":
                fn = jax.vmap(one)
            else:
                fn = lambda p, s, x, y: jax.lax.map(lambda a: one(*a), (p, s, x, y))  # noqa: E731
            c, sps, spc = time_step(jax.jit(fn, donate_argnums=(0, 1)), params, opt_state, xs, ys, args.seconds)
            rows.append((label, r, c, sps * r * BATCH, spc * r * BATCH))

    assembly = patch_assembly(args.seconds)
    print(f"\nLeNet-5 (paper size), {SHAPE}, {K} classes, batch {BATCH}/replica, Adam step")
    print(f"{'variant':<18}{'R':>4}{'compile s':>11}{'images/s':>11}{'x plain':>9}{'img/CPU-s':>11}{'x plain':>9}")
    for label, r, c, ips, ipc in rows:
        print(f"{label:<18}{r:>4}{c:>11.1f}{ips:>11.0f}{ips / base:>9.2f}{ipc:>11.0f}{ipc / base_cpu:>9.2f}")
    print("\nconv1 patch assembly, [64, 28, 28, 1] -> 25 taps, microseconds per call:")
    one = assembly["one concatenate of 25 (NHWC)"]
    for label, us in assembly.items():
        print(f"  {label:<40}{us:>9.1f}{one / us:>7.2f}x")


def patch_assembly(seconds: float) -> dict[str, float]:
    """Microseconds to build conv1's patches three ways (same values, different XLA programs)."""
    x = jax.random.normal(jax.random.key(0), (BATCH, 32, 32, 1))  # padded 28x28 input

    def one_concat(x):
        return jnp.concatenate([x[:, i:i + 28, j:j + 28] for i in range(5) for j in range(5)], axis=-1)

    def two_concats(x):
        xw = jnp.concatenate([x[:, :, j:j + 28] for j in range(5)], axis=-1)
        return jnp.concatenate([xw[:, i:i + 28] for i in range(5)], axis=-1)

    out = {}
    variants = [("one concatenate of 25 (NHWC)", one_concat, x), ("two concatenates of 5 (NHWC)", two_concats, x),
                ("channels-first, leading axis (phase)", lambda z: M._cf_patches(z, (5, 5), ((0, 0), (0, 0))),
                 jnp.transpose(x, (3, 0, 1, 2)))]
    for label, fn, arg in variants:
        fn = jax.jit(fn)
        jax.block_until_ready(fn(arg))
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            jax.block_until_ready(fn(arg))
            n += 1
        out[label] = (time.perf_counter() - t0) / n * 1e6
    return out


if __name__ == "__main__":
    main()

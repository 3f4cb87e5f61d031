"""Benchmark of the perceptron branch (jaxnorm.theory + jaxnorm.perceptron).

Prints
  1. the wall time of a 100-point replica curve eps(lambda) at one alpha, after compilation;
  2. free-norm GD throughput (seed-steps/s) at N=1000, alpha=5 (P=5000): 8 seeds vmapped in one
     compiled call, the CPU default (``replica_batch="auto"``: cache-sized chunks mapped inside one
     compiled call) and the same 8 seeds one at a time from Python, measured interleaved in one
     run (so a shared, loaded machine affects all alike), and their ratios.

Usage: python bench/bench_perceptron.py [--n 1000] [--alpha 5] [--steps 500] [--seeds 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np


def _time(fn):
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - t0


def bench_theory(alpha: float, num: int = 100, repeats: int = 3) -> dict:
    from jaxnorm import theory

    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        lams = np.logspace(-2, 2, num)
        compile_s = _time(lambda: theory.logistic_error(lams, alpha))
        runs = [_time(lambda: theory.logistic_error(lams, alpha)) for _ in range(repeats)]
    finally:
        jax.config.update("jax_enable_x64", previous)
    return {"first_call_s": compile_s, "curve_s": min(runs), "num": num}


def bench_gd(n: int, alpha: float, steps: int, seeds: int, repeats: int) -> dict:
    from jaxnorm import perceptron as pc

    key = jax.random.key(0)

    def run(batch, k=key, n_seeds=seeds):
        return lambda: pc.simulate_free_norm(k, n, alpha, n_seeds=n_seeds, steps=steps, n_record=4,
                                             replica_batch=batch).eps

    modes = {
        f"vmapped over {seeds} seeds": run(None),
        f"lax.map, chunks of {pc.default_replica_batch(n, int(round(alpha * n)), 'cpu')} (CPU auto)":
            run("auto"),
        "one seed at a time (Python loop)":
            lambda: [run(None, jax.random.fold_in(key, s), 1)() for s in range(seeds)],
    }
    for fn in modes.values():  # compile every shape
        _time(fn)
    times = {name: [] for name in modes}
    for _ in range(repeats):  # interleaved, so that load on the shared machine hits all alike
        for name, fn in modes.items():
            times[name].append(_time(fn))
    return {name: seeds * steps / min(t) for name, t in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--alpha", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} (shared machine: numbers are indicative)")
    th = bench_theory(args.alpha)
    print(f"theory: {th['num']}-point eps(lambda) curve at alpha={args.alpha:g}: "
          f"{th['curve_s']:.2f} s after compilation (first call incl. compile {th['first_call_s']:.1f} s)")
    gd = bench_gd(args.n, args.alpha, args.steps, args.seeds, args.repeats)
    print(f"free-norm GD, N={args.n}, alpha={args.alpha:g} (P={int(round(args.alpha * args.n))}), "
          f"{args.steps} steps x {args.seeds} seeds (best of {args.repeats}):")
    for name, rate in gd.items():
        print(f"  {name:<40s}: {rate:9.0f} seed-steps/s")
    names = list(gd)
    print(f"  ratio vmapped / one-at-a-time: {gd[names[0]] / gd[names[2]]:.2f}x; "
          f"CPU-auto / one-at-a-time: {gd[names[1]] / gd[names[2]]:.2f}x")
    return th, gd


if __name__ == "__main__":
    main()

"""Benchmark of the sweep engine's training throughput (and of its schedule's idle fraction).

    python bench/bench_engine.py [--quick] [--replicas 1,4,16,64] [--steps 96] [--out bench/engine.json]
    python bench/bench_engine.py --idle        # idle replica-steps of the schedule on the paper's P grids

Throughput = training images per second summed over replicas, LeNet-5 (size "paper") on
Fashion-MNIST, batch 64, Adam, float32, for R = 1, 4, 16, 64 replicas, all measured in one run:

  engine[axis,K,U,conv]  jaxnorm.engine's own train path (host batch indices -> device gather ->
                    the replicas' steps, batched by vmap or looped by lax.map inside the dispatch
                    (replica_axis), K steps per dispatch as a lax.scan unrolled U times, conv_impl conv),
                    on one XLA CPU device;
  engine[...] xN dev  the same with the host split into N = min(cores, R) XLA CPU devices
                    (``python -m jaxnorm.sweep --cpu-devices N``), measured in a child process (the
                    device count is fixed when JAX starts) during the same run;
  (a) loop-jit      one model at a time, a plain jitted Flax/optax step, one dispatch per step;
  (b) vmap-jit      jax.vmap of that plain step over R models ("xla" convolutions), one dispatch per step;
  (c) torch         a plain PyTorch per-model training loop of the same LeNet-5 (torch.set_num_threads = cores).

Also: achieved GFLOP/s (analytic LeNet-5 FLOPs: forward MACs x 2 x 3 for forward + backward) against
the float32 matmul peak measured in the same run (a 1024^3 jnp.dot). Ratios are only meaningful within
one run; on a machine shared with other jobs the absolute figures are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxnorm import config as config_lib  # noqa: E402
from jaxnorm import data as data_lib  # noqa: E402
from jaxnorm import engine, models, schedule  # noqa: E402

B = 64
# LeNet-5 on 28x28x1 ("SAME" conv1): multiply-accumulates per image, forward.
MACS = 28 * 28 * 6 * 25 + 10 * 10 * 16 * 25 * 6 + 400 * 120 + 120 * 84 + 84 * 10
FLOP_PER_IMAGE = 2 * MACS * 3  # forward + backward ~ 3x forward


def _dataset(synthetic: bool):
    if not synthetic:
        try:
            return data_lib.load("fashion_mnist")
        except Exception as err:  # noqa: BLE001
            print(f"(Fashion-MNIST not found: {err}; synthetic data of the same shape)", file=sys.stderr)
    rng = np.random.default_rng(0)
    return data_lib.Dataset(name="fashion_mnist", x_train=rng.normal(size=(60000, 28, 28, 1)).astype(np.float32),
                            y_train=rng.integers(0, 10, 60000).astype(np.int32),
                            x_test=rng.normal(size=(1000, 28, 28, 1)).astype(np.float32),
                            y_test=rng.integers(0, 10, 1000).astype(np.int32), num_classes=10)


def matmul_peak(n: int = 1024, reps: int = 10) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


WINDOWS = 3  # timed windows per measurement; the median is reported (the machine's speed drifts)


def median_rate(window: Callable[[], int], windows: int = WINDOWS) -> float:
    """Median over ``windows`` calls of images / second, ``window()`` returning the images it trained."""
    rates = []
    for _ in range(windows):
        t = time.perf_counter()
        images = window()
        rates.append(images / (time.perf_counter() - t))
    return float(np.median(rates))


def bench_engine(ds, R: int, steps: int, K: int, unroll: int, conv_impl: str, axis: str = "vmap") -> float:
    """Images/s of the engine's train path for R replicas (no evaluation in the timed window)."""
    cfg = config_lib.from_dict(dict(arch="cnn", dataset="fashion_mnist", size="paper", P=[48000], seeds=R,
                                    epochs=1, batch_size=B, replicas_per_device=R, steps_per_dispatch=K,
                                    scan_unroll=unroll, conv_impl=conv_impl, eval_at_init=False,
                                    replica_axis=axis,
                                    checkpoint_minutes=0.0))
    eng = engine.Engine(cfg, "/tmp/_bench_engine_unused", dataset=ds)
    pool = eng.pool
    first = pool.next_dispatch()
    slots = eng._init(eng.p.empty(pool.n_slots), first.rounds[0].new)
    put = lambda a: jax.device_put(a, eng.sharded)

    def dispatch(slots):
        n = pool.next_dispatch().steps  # no evaluation before epoch 1 (eval_at_init=False)
        idx, w, act = eng._batches(n)
        slots = eng.p.train(slots, eng.x_train, eng.y_train, put(idx), put(w), put(act))
        pool.advance(n)
        return slots, int(n.sum())

    state = {"slots": dispatch(slots)[0]}  # compile
    jax.block_until_ready(state["slots"])
    n_disp = max(2, steps // K // WINDOWS)

    def window():
        done = 0
        for _ in range(n_disp):
            state["slots"], k = dispatch(state["slots"])
            np.asarray(state["slots"].diverged)  # the engine reads the divergence flags after every dispatch
            done += k
        return done * B

    return median_rate(window)


ENGINE_VARIANTS = [(8, 1, "phase", "map"), (8, 8, "phase", "map"), (1, 1, "phase", "map"),
                   (8, 1, "patches", "map"), (8, 1, "xla", "map"), (8, 1, "phase", "vmap")]
DEFAULT_VARIANT = ENGINE_VARIANTS[0]  # the CPU defaults of jaxnorm.engine / jaxnorm.models


def _label(K, U, conv, axis) -> str:
    return f"engine[{axis},K={K},U={U},{conv}]"


def engine_on_all_cores(R: int, steps: int, synthetic: bool) -> tuple[int, float | None]:
    """The default engine variant with the host split into min(cores, R) XLA CPU devices, as
    ``python -m jaxnorm.sweep --cpu-devices N`` does (child process); (1, None) when that is one device."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = min(n, R)
    if n == 1:
        return 1, None
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"}
    cmd = [sys.executable, __file__, "--engine-only", str(R), "--steps", str(steps)] + (["--synthetic"] if synthetic else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        return n, None
    return n, float(out.stdout.strip().splitlines()[-1])


def derive(res: dict, peak: float) -> dict:
    """Adds the ratios to a row of measurements. "engine default" is what ``python -m jaxnorm.sweep``
    runs on this machine: the default variant on JAX's one CPU device."""
    default = res[_label(*DEFAULT_VARIANT)]
    best = max(v for k, v in res.items() if k.startswith("engine[") and v is not None)
    for name, v in (("engine default", default), ("engine best", best)):
        res[f"{name} / (b)"] = v / res["(b) vmap-jit"]
        res[f"{name} / (c)"] = v / res["(c) torch"] if res["(c) torch"] else None
    res["engine default GFLOP/s"] = default * FLOP_PER_IMAGE / 1e9
    res["engine default % of peak"] = 100 * default * FLOP_PER_IMAGE / 1e9 / peak
    return res


def _plain_step(model):
    tx = optax.adam(1e-3)

    def step(params, opt, x, y):
        def loss_fn(p):
            logits, _ = model.apply({"params": p}, x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        g = jax.grad(loss_fn)(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt

    return tx, step


def bench_loop_jit(ds, R: int, steps: int) -> float:
    model = models.get_model("cnn", (28, 28, 1), 10, size="paper", conv_impl="xla")
    tx, step = _plain_step(model)
    step = jax.jit(step)
    ps = [model.init(jax.random.key(r))["params"] for r in range(R)]
    os_ = [tx.init(p) for p in ps]
    x, y = jnp.asarray(ds.x_train[:B]), jnp.asarray(ds.y_train[:B])
    ps[0], os_[0] = step(ps[0], os_[0], x, y)
    jax.block_until_ready(ps[0])
    rng = np.random.default_rng(0)
    n = max(2, steps // max(1, R // 4) // WINDOWS)

    def window():
        for _ in range(n):
            for r in range(R):
                i = rng.integers(0, 60000 - B)
                ps[r], os_[r] = step(ps[r], os_[r], ds.x_train[i:i + B], ds.y_train[i:i + B])
        jax.block_until_ready(ps)
        return n * R * B

    return median_rate(window)


def bench_vmap_jit(ds, R: int, steps: int) -> float:
    model = models.get_model("cnn", (28, 28, 1), 10, size="paper", conv_impl="xla")
    tx, step = _plain_step(model)
    vstep = jax.jit(jax.vmap(step))
    ps = jax.vmap(lambda k: model.init(k)["params"])(jax.random.split(jax.random.key(0), R))
    os_ = jax.vmap(tx.init)(ps)
    rng = np.random.default_rng(0)

    def batch():
        i = rng.integers(0, 60000 - B, R)
        idx = i[:, None] + np.arange(B)
        return ds.x_train[idx], ds.y_train[idx]

    state = {"p": vstep(ps, os_, *batch())}
    jax.block_until_ready(state["p"])
    n = max(2, steps // max(1, R // 4) // WINDOWS)

    def window():
        for _ in range(n):
            state["p"] = vstep(*state["p"], *batch())
        jax.block_until_ready(state["p"])
        return n * R * B

    return median_rate(window)


def bench_torch(ds, R: int, steps: int) -> float | None:
    try:
        import torch
        from torch import nn
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)

    def lenet():
        return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
                             nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(),
                             nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))

    nets = [lenet() for _ in range(R)]
    opts = [torch.optim.Adam(n.parameters(), lr=1e-3) for n in nets]
    x_all = torch.from_numpy(np.ascontiguousarray(ds.x_train.transpose(0, 3, 1, 2)))
    y_all = torch.from_numpy(ds.y_train.astype(np.int64))
    loss_fn = nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)

    def step(r):
        i = int(rng.integers(0, 60000 - B))
        opts[r].zero_grad(set_to_none=True)
        loss = loss_fn(nets[r](x_all[i:i + B]), y_all[i:i + B])
        loss.backward()
        opts[r].step()

    for r in range(R):
        step(r)
    n = max(2, steps // max(1, R // 4) // WINDOWS)

    def window():
        for _ in range(n):
            for r in range(R):
                step(r)
        return n * R * B

    return median_rate(window)


def idle_report() -> list[dict]:
    """Idle replica-step fraction of the engine's schedule on the paper's P grids (Appendix E)."""
    grids = {"MNIST (all archs), CNN": (config_lib.MNIST_P, 500, 64),
             "MNIST, ResNet/ViT": (config_lib.MNIST_P, 1000, 128),
             "CIFAR CNN": (config_lib.CIFAR_CNN_P, 500, 64),
             "CIFAR ResNet/ViT": (config_lib.CIFAR_DEEP_P, 1000, 128)}
    rows = []
    for name, (P, epochs, bs) in grids.items():
        ev = config_lib.eval_epochs(epochs, "every", 1, 60, True)
        for seeds in (5, 10):
            jobs = schedule.make_jobs(P, range(seeds), epochs, bs, ev)
            for backend in ("cpu", "gpu"):
                K = engine.default_steps_per_dispatch(backend)
                R = engine.choose_slots(jobs, 0, 1, backend)
                r = schedule.simulate_idle_fraction(P, seeds, epochs, bs, ev, R, K)
                rows.append(dict(grid=name, seeds=seeds, slots=R, steps_per_dispatch=K,
                                 idle_fraction=round(r["idle_fraction"], 4)))
                print(f"{name:24s} seeds={seeds:2d} slots={R:3d} K={K:2d}  idle={r['idle_fraction']:.2%}",
                      flush=True)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replicas", default="1,4,16,64")
    ap.add_argument("--steps", type=int, default=96, help="timed steps per replica and configuration")
    ap.add_argument("--quick", action="store_true", help="R = 1,4,16 and 10 steps")
    ap.add_argument("--synthetic", action="store_true", help="synthetic data instead of Fashion-MNIST")
    ap.add_argument("--idle", action="store_true", help="only the idle-fraction report")
    ap.add_argument("--out", default="bench/engine.json")
    ap.add_argument("--engine-only", type=int, metavar="R", help=argparse.SUPPRESS)  # child of engine_on_all_cores
    args = ap.parse_args(argv)
    if args.engine_only:
        print(bench_engine(_dataset(args.synthetic), args.engine_only, args.steps, *DEFAULT_VARIANT))
        return {}
    if args.idle:
        rows = idle_report()
        Path(args.out).with_name("engine_idle.json").write_text(json.dumps(rows, indent=2))
        return {"idle": rows}
    Rs = [1, 4, 16] if args.quick else [int(r) for r in args.replicas.split(",")]
    steps = 10 if args.quick else args.steps
    ds = _dataset(args.synthetic)
    peak = matmul_peak()
    print(f"backend={jax.default_backend()} devices={jax.device_count()} cores={os.cpu_count()} "
          f"float32 matmul peak={peak:.1f} GFLOP/s; LeNet-5 {FLOP_PER_IMAGE / 1e6:.2f} MFLOP per training image")
    rows = []
    for R in Rs:
        res = {"R": R}
        for K, U, conv, axis in ENGINE_VARIANTS:
            res[_label(K, U, conv, axis)] = bench_engine(ds, R, steps, K, U, conv, axis)
        n_dev, multi = engine_on_all_cores(R, steps, args.synthetic)
        if n_dev > 1:
            res[_label(*DEFAULT_VARIANT) + f" x{n_dev} dev"] = multi
        res["(a) loop-jit"] = bench_loop_jit(ds, R, steps)
        res["(b) vmap-jit"] = bench_vmap_jit(ds, R, steps)
        res["(c) torch"] = bench_torch(ds, R, steps)
        derive(res, peak)
        rows.append(res)
        print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()), flush=True)
    out = dict(backend=jax.default_backend(), devices=jax.device_count(), cores=os.cpu_count(),
               matmul_peak_gflops=peak, flop_per_image=FLOP_PER_IMAGE, batch=B, steps=steps, rows=rows,
               load_average=os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()

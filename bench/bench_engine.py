"""Benchmark of the sweep engine's training throughput (and of its schedule's idle fraction).

    python bench/bench_engine.py [--arch cnn|resnet|vit|all] [--quick] [--replicas 1,4,16] [--steps N]
    python bench/bench_engine.py --idle        # idle replica-steps of the schedule on the paper's P grids
    python bench/bench_engine.py --idle-cost --arch resnet   # what an idle replica-step costs
    python bench/bench_engine.py --arch resnet --replicas 16 --defaults-only --out bench/engine_defaults.json

Throughput = training images per second summed over replicas, paper-size models on Fashion-MNIST
(28x28x1), batch 64, Adam (AdamW, no weight decay, for the ViT: the paper's optimizers), float32,
for R replicas, all measured side by side in one run:

  engine[axis,K,U,conv]  jaxnorm.engine's own train path (host batch indices -> device gather ->
                    the replicas' steps, batched by vmap or looped by lax.map inside the dispatch
                    (replica_axis), K steps per dispatch as a lax.scan unrolled U times, conv_impl conv),
                    on one XLA CPU device;
  engine[...] xN dev  the default variant with the host split into N = min(cores, R) XLA CPU devices
                    (``python -m jaxnorm.sweep --cpu-devices N``), measured in a child process (the
                    device count is fixed when JAX starts) during the same run;
  (a) loop-jit      one model at a time, a plain jitted Flax/optax step ("xla" convolutions), one
                    dispatch per step;
  (b) vmap-jit      jax.vmap of that plain step over R models, one dispatch per step;
  (c) torch         a plain PyTorch per-model training loop of the same architecture (same layer
                    shapes and initialisation; torch.set_num_threads = cores).

The first engine variant of each architecture is the engine's CPU default (checked at start-up
against jaxnorm.engine / jaxnorm.models). Also: achieved GFLOP/s (XLA's cost analysis of one forward
pass x 3 for forward + backward) against the float32 matmul peak measured in the same run (a 1024^3
jnp.dot). Ratios are only meaningful within one run; on a machine shared with other jobs the
absolute figures are noisy. Results: bench/engine.json (one entry per architecture).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxnorm import config as config_lib  # noqa: E402
from jaxnorm import data as data_lib  # noqa: E402
from jaxnorm import engine, models, replica, schedule  # noqa: E402

B = 64
ARCHS = ("cnn", "resnet", "vit")
# Engine variants (K steps per dispatch, scan unroll U, conv_impl, replica_axis); the first is the
# CPU default. Default replica counts and timed steps per replica keep each architecture to minutes.
VARIANTS = {
    "cnn": [(8, 1, "phase", "map"), (8, 8, "phase", "map"), (1, 1, "phase", "map"), (8, 1, "patches", "map"),
            (8, 1, "canonical", "map"), (8, 1, "phase", "vmap")],
    # Plain "xla" convs are left out: inside the scan/map loops XLA:CPU runs their gradient convs
    # 17-25x slower (models.canonical_conv; ~18 images/s), which would take most of the run.
    "resnet": [(8, 1, "canonical", "map"), (1, 1, "canonical", "map"), (8, 1, "patches", "map"),
               (8, 1, "canonical", "vmap")],
    "vit": [(8, 1, "patches", "map"), (1, 1, "patches", "map"), (8, 1, "patches", "vmap")],
}
REPLICAS = {"cnn": "1,4,16,64", "resnet": "1,4,16", "vit": "1,4,16"}
STEPS = {"cnn": 96, "resnet": 12, "vit": 24}


def check_defaults() -> None:
    """The first variant of each architecture must be what the engine runs by default on a CPU."""
    for arch, variants in VARIANTS.items():
        K, U, conv, axis = variants[0]
        actual = (engine.default_steps_per_dispatch("cpu", arch), 1, models.resolve_conv_impl("auto", "cpu", arch),
                  engine.default_replica_axis("cpu"))
        if actual != (K, U, conv, axis):
            raise SystemExit(f"bench_engine: the default variant of {arch} is {(K, U, conv, axis)} but the "
                             f"engine's CPU default is {actual}; update VARIANTS")


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


def flop_per_image(arch: str, size: str = "paper") -> float:
    """Training FLOPs per image: XLA's cost analysis of a batch-64 forward pass, x 3 (fwd + bwd)."""
    model = models.get_model(arch, (28, 28, 1), 10, size=size, conv_impl="xla")
    x = jnp.zeros((B, 28, 28, 1))
    variables = model.module.init(jax.random.key(0), x[:1], train=False)
    cost = jax.jit(lambda v, x: model.module.apply(v, x, train=False)).lower(variables, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return 3 * float(cost["flops"]) / B


WINDOWS = 3  # timed windows per measurement; the median is reported (the machine's speed drifts)


def median_rate(window: Callable[[], int], windows: int = WINDOWS) -> float:
    """Median over ``windows`` calls of images / second, ``window()`` returning the images it trained."""
    rates = []
    for _ in range(windows):
        t = time.perf_counter()
        images = window()
        rates.append(images / (time.perf_counter() - t))
    return float(np.median(rates))


def _config(arch: str, R: int, size: str = "paper", **engine_keys):
    return config_lib.from_dict(dict(arch=arch, dataset="fashion_mnist", size=size, P=[48000], seeds=R,
                                     epochs=1, batch_size=B, eval_at_init=False, checkpoint_minutes=0.0,
                                     **engine_keys))


def bench_engine(ds, arch: str, R: int, steps: int, K: int, unroll: int, conv_impl: str, axis: str,
                 size: str = "paper", active_steps: int | None = None) -> float:
    """Images/s of the engine's train path for R replicas (no evaluation in the timed window).

    ``active_steps``: each slot trains only the first ``active_steps`` of the K steps of a dispatch
    and idles for the rest, as a slot does when it stops at an evaluation step; the rate then counts
    the dispatch's K steps per slot (busy and idle alike), so that it compares with all-active
    dispatches as time per dispatch.
    """
    cfg = _config(arch, R, size, replicas_per_device=R, steps_per_dispatch=K, scan_unroll=unroll,
                  conv_impl=conv_impl, replica_axis=axis)
    eng = engine.Engine(cfg, "/tmp/_bench_engine_unused", dataset=ds)
    pool = eng.pool
    first = pool.next_dispatch()
    slots = eng._init(eng.p.empty(pool.n_slots), first.rounds[0].new)
    put = lambda a: jax.device_put(a, eng.sharded)

    def dispatch(slots):
        n = pool.next_dispatch().steps  # no evaluation before epoch 1 (eval_at_init=False)
        idx, w, act = eng._batches(n)
        if active_steps is not None:
            act = act.copy()
            act[:, active_steps:] = False
        slots = eng.p.train(slots, eng.x_train, eng.y_train, put(idx), put(w), put(act))
        pool.advance(n)
        return slots, int(n.sum())

    state = {"slots": dispatch(slots)[0]}  # compile
    jax.block_until_ready(state["slots"])
    n_disp = max(1, -(-steps // K // WINDOWS))

    def window():
        done = 0
        for _ in range(n_disp):
            state["slots"], k = dispatch(state["slots"])
            np.asarray(state["slots"].diverged)  # the engine reads the divergence flags after every dispatch
            done += k
        return done * B

    return median_rate(window)


def _label(K, U, conv, axis) -> str:
    return f"engine[{axis},K={K},U={U},{conv}]"


def engine_on_all_cores(arch: str, R: int, steps: int, synthetic: bool) -> tuple[int, float | None]:
    """The default engine variant with the host split into min(cores, R) XLA CPU devices, as
    ``python -m jaxnorm.sweep --cpu-devices N`` does (child process); (1, None) when that is one device."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = min(n, R)
    if n == 1:
        return 1, None
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"}
    cmd = [sys.executable, __file__, "--arch", arch, "--engine-only", str(R), "--steps", str(steps)]
    out = subprocess.run(cmd + (["--synthetic"] if synthetic else []), env=env, capture_output=True, text=True,
                         timeout=3600)
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        return n, None
    return n, float(out.stdout.strip().splitlines()[-1])


def derive(arch: str, res: dict, peak: float, flops: float) -> dict:
    """Adds the ratios to a row of measurements. "engine default" is what ``python -m jaxnorm.sweep``
    runs on this machine: the default variant on JAX's one CPU device."""
    default = res[_label(*VARIANTS[arch][0])]
    best = max(v for k, v in res.items() if k.startswith("engine[") and v is not None)
    multi = {k: v for k, v in res.items() if k.startswith(_label(*VARIANTS[arch][0]) + " x") and v is not None}
    for name, v in (("engine default", default), ("engine best", best), *multi.items()):
        if res.get("(b) vmap-jit"):
            res[f"{name} / (b)"] = v / res["(b) vmap-jit"]
        res[f"{name} / (c)"] = v / res["(c) torch"] if res["(c) torch"] else None
    res["engine default GFLOP/s"] = default * flops / 1e9
    res["engine default % of peak"] = 100 * default * flops / 1e9 / peak
    return res


# --------------------------------------------------------------------------- #
# Baselines: plain Flax steps, and PyTorch
# --------------------------------------------------------------------------- #
def _plain_step(arch: str):
    """A plain Flax/optax train step of the paper-size model, ("xla" convolutions, BatchNorm in
    training mode for the ResNet) with the engine's optimizer for ``arch``."""
    cfg = _config(arch, 1)
    model = models.get_model(arch, (28, 28, 1), 10, size="paper", conv_impl="xla")
    tx = replica.make_optimizer(cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.adam_eps)
    import optax

    def init(key):
        v = model.module.init(key, jnp.zeros((1, 28, 28, 1)), train=False)
        return v, tx.init(v["params"])

    def step(v, opt, x, y):
        def loss_fn(p):
            logits, upd = model.module.apply({**v, "params": p}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

        g, upd = jax.grad(loss_fn, has_aux=True)(v["params"])
        u, opt = tx.update(g, opt, v["params"])
        return {**v, **upd, "params": optax.apply_updates(v["params"], u)}, opt

    return init, step


def _n_windowed(steps: int, R: int) -> int:
    """Steps per replica in each timed window of the one-model-at-a-time baselines."""
    return max(1, -(-steps // max(1, R // 4) // WINDOWS))


def bench_loop_jit(ds, arch: str, R: int, steps: int) -> float:
    init, step = _plain_step(arch)
    step = jax.jit(step)
    states = [init(jax.random.key(r)) for r in range(R)]
    x, y = jnp.asarray(ds.x_train[:B]), jnp.asarray(ds.y_train[:B])
    states[0] = step(*states[0], x, y)
    jax.block_until_ready(states[0])
    rng = np.random.default_rng(0)
    n = _n_windowed(steps, R)

    def window():
        for _ in range(n):
            for r in range(R):
                i = rng.integers(0, 60000 - B)
                states[r] = step(*states[r], ds.x_train[i:i + B], ds.y_train[i:i + B])
        jax.block_until_ready(states)
        return n * R * B

    return median_rate(window)


def bench_vmap_jit(ds, arch: str, R: int, steps: int) -> float:
    init, step = _plain_step(arch)
    vstep = jax.jit(jax.vmap(step))
    state = jax.vmap(init)(jax.random.split(jax.random.key(0), R))
    rng = np.random.default_rng(0)

    def batch():
        i = rng.integers(0, 60000 - B, R)
        idx = i[:, None] + np.arange(B)
        return ds.x_train[idx], ds.y_train[idx]

    box = {"s": vstep(*state, *batch())}
    jax.block_until_ready(box["s"])
    n = _n_windowed(steps, R)

    def window():
        for _ in range(n):
            box["s"] = vstep(*box["s"], *batch())
        jax.block_until_ready(box["s"])
        return n * R * B

    return median_rate(window)


def torch_model(arch: str, size: str = "paper"):
    """The PyTorch twin of ``models.get_model(arch, (28, 28, 1), 10, size)``: same layer shapes, PyTorch's default initialisation as jaxnorm.models follows it (Kaiming-normal ResNet
    convs, Xavier-uniform attention, N(0, 0.02^2) [CLS] and position embeddings)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    w = models.WIDTHS[arch][size]
    if arch == "cnn":
        (c1, c2), (f1, f2) = w["conv"], w["fc"]
        return nn.Sequential(nn.Conv2d(1, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(c1, c2, 5),
                             nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(25 * c2, f1), nn.ReLU(),
                             nn.Linear(f1, f2), nn.ReLU(), nn.Linear(f2, 10))

    def conv3(cin, cout, stride=1):
        c = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        nn.init.kaiming_normal_(c.weight, mode="fan_in", nonlinearity="relu")
        return c

    class Block(nn.Module):  # basic block, option-A shortcut
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1, self.b1 = conv3(cin, cout, stride), nn.BatchNorm2d(cout)
            self.c2, self.b2 = conv3(cout, cout), nn.BatchNorm2d(cout)
            self.stride, self.extra = stride, cout - cin

        def forward(self, x):
            y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
            s = x
            if self.stride != 1 or self.extra:
                s = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
            return F.relu(y + s)

    class ResNet20(nn.Module):
        def __init__(self):
            super().__init__()
            widths = w["widths"]
            self.conv, self.bn = conv3(1, widths[0]), nn.BatchNorm2d(widths[0])
            blocks, cin = [], widths[0]
            for s, width in enumerate(widths):
                for b in range(w["blocks"]):
                    blocks.append(Block(cin, width, 2 if (s > 0 and b == 0) else 1))
                    cin = width
            self.blocks, self.fc = nn.Sequential(*blocks), nn.Linear(widths[-1], 10)

        def forward(self, x):
            return self.fc(self.blocks(F.relu(self.bn(self.conv(x)))).mean((2, 3)))

    class ViT(nn.Module):  # pre-LN encoder blocks, exact GELU (paper size: patch 4, width 64, depth 6, 4 heads)
        def __init__(self):
            super().__init__()
            d, p = w["dim"], w["patch"]
            self.embed = nn.Conv2d(1, d, p, p)
            self.cls = nn.Parameter(0.02 * torch.randn(1, 1, d))
            self.pos = nn.Parameter(0.02 * torch.randn(1, (28 // p) ** 2 + 1, d))
            layer = nn.TransformerEncoderLayer(d, w["heads"], w["mlp"], dropout=0.0, activation="gelu",
                                               batch_first=True, norm_first=True, layer_norm_eps=1e-5)
            self.encoder = nn.TransformerEncoder(layer, w["depth"], enable_nested_tensor=False)
            self.norm, self.head = nn.LayerNorm(d, eps=1e-5), nn.Linear(d, 10)

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos
            return self.head(self.norm(self.encoder(t))[:, 0])

    return ResNet20() if arch == "resnet" else ViT()


def bench_torch(ds, arch: str, R: int, steps: int, size: str = "paper", device: str = "cpu") -> float | None:
    """Images/s of a PyTorch per-model loop over R nets on ``device`` ("cpu" or "cuda"); None without torch."""
    try:
        import torch
        from torch import nn
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = _config(arch, 1, size)
    nets = [torch_model(arch, size).to(device) for _ in range(R)]
    if cfg.optimizer == "adamw":
        opts = [torch.optim.AdamW(n.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay) for n in nets]
    else:
        opts = [torch.optim.Adam(n.parameters(), lr=cfg.lr) for n in nets]
    x_all = torch.from_numpy(np.ascontiguousarray(ds.x_train.transpose(0, 3, 1, 2))).to(device)
    y_all = torch.from_numpy(ds.y_train.astype(np.int64)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
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
    sync()
    n = _n_windowed(steps, R)

    def window():
        for _ in range(n):
            for r in range(R):
                step(r)
        sync()
        return n * R * B

    return median_rate(window)


def idle_report() -> list[dict]:
    """Idle replica-step fraction of the engine's schedule on the paper's P grids (Appendix E)."""
    grids = {"MNIST (all archs), CNN": (config_lib.MNIST_P, 500, 64, "cnn"),
             "MNIST, ResNet/ViT": (config_lib.MNIST_P, 1000, 128, "resnet"),
             "CIFAR CNN": (config_lib.CIFAR_CNN_P, 500, 64, "cnn"),
             "CIFAR ResNet/ViT": (config_lib.CIFAR_DEEP_P, 1000, 128, "resnet")}
    rows = []
    for name, (P, epochs, bs, arch) in grids.items():
        ev = config_lib.eval_epochs(epochs, "every", 1, 60, True)
        for seeds in (5, 10):
            jobs = schedule.make_jobs(P, range(seeds), epochs, bs, ev)
            for backend in ("cpu", "gpu"):
                K = engine.default_steps_per_dispatch(backend, arch)
                R = engine.choose_slots(jobs, 0, 1, backend)
                r = schedule.simulate_idle_fraction(P, seeds, epochs, bs, ev, R, K)
                rows.append(dict(grid=name, seeds=seeds, slots=R, steps_per_dispatch=K,
                                 idle_fraction=round(r["idle_fraction"], 4)))
                print(f"{name:24s} seeds={seeds:2d} slots={R:3d} K={K:2d}  idle={r['idle_fraction']:.2%}",
                      flush=True)
    return rows


def idle_cost(ds, arch: str, R: int, steps: int) -> dict:
    """Time per dispatch with every slot busy vs with each slot busy for only k of its K steps (the
    default variant, and the same with vmap over replicas), side by side. An inactive step is a
    ``lax.cond`` branch (``replica.make_train_step``): under lax.map it should cost ~nothing, so the
    time ratio should approach k / K; under vmap the cond becomes a select and the ratio stays ~1."""
    K, U, conv, axis = VARIANTS[arch][0]
    out = {"R": R, "K": K}
    # ResNet-20 vmapped over replicas runs at ~50 images/s on the CPU (grouped convs): one such reading
    # takes over 15 minutes, and its cond is the same select as the other nets', so it is left out.
    slow_vmap = arch == "resnet" and jax.default_backend() == "cpu"
    axes = (axis,) if slow_vmap else (axis, "vmap" if axis == "map" else "map")
    for ax in axes:
        full = bench_engine(ds, arch, R, steps, K, U, conv, ax)
        for k in (K // 2, 1):
            part = bench_engine(ds, arch, R, steps, K, U, conv, ax, active_steps=k)
            out[f"{ax}: time per dispatch, {k} of {K} steps busy / all busy"] = full / part
        print(f"  {arch} " + "  ".join(f"{k} = {v:.3f}" for k, v in out.items() if k.startswith(ax)), flush=True)
    return out


def bench_arch(ds, arch: str, Rs: list[int], steps: int, peak: float, synthetic: bool,
               defaults_only: bool = False) -> dict:
    """One row per R: the engine's formulations (only its default with ``defaults_only``), the default
    on all cores, and the baselines (only the PyTorch twin with ``defaults_only``)."""
    flops = flop_per_image(arch)
    print(f"== {arch}: {flops / 1e6:.2f} MFLOP per training image", flush=True)
    rows = []
    for R in Rs:
        res = {"R": R}
        for K, U, conv, axis in VARIANTS[arch][:1] if defaults_only else VARIANTS[arch]:
            res[_label(K, U, conv, axis)] = bench_engine(ds, arch, R, steps, K, U, conv, axis)
        n_dev, multi = engine_on_all_cores(arch, R, steps, synthetic)
        if n_dev > 1:
            res[_label(*VARIANTS[arch][0]) + f" x{n_dev} dev"] = multi
        if not defaults_only:
            res["(a) loop-jit"] = bench_loop_jit(ds, arch, R, steps)
            res["(b) vmap-jit"] = bench_vmap_jit(ds, arch, R, steps)
        res["(c) torch"] = bench_torch(ds, arch, R, steps)
        derive(arch, res, peak, flops)
        rows.append(res)
        print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()), flush=True)
    return dict(flop_per_image=flops, steps=steps, rows=rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="all", choices=ARCHS + ("all",))
    ap.add_argument("--replicas", default=None, help="comma-separated R (default per architecture: "
                    + "; ".join(f"{a} {r}" for a, r in REPLICAS.items()) + ")")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per replica and configuration "
                    "(default per architecture: " + ", ".join(f"{a} {s}" for a, s in STEPS.items()) + ")")
    ap.add_argument("--quick", action="store_true", help="R = 1,4 and a few steps")
    ap.add_argument("--synthetic", action="store_true", help="synthetic data instead of Fashion-MNIST")
    ap.add_argument("--idle", action="store_true", help="only the idle-fraction report")
    ap.add_argument("--idle-cost", action="store_true", help="only the cost of idle replica-steps "
                    "(time per dispatch, part of the K steps inactive vs all active; bench/engine_idle_cost.json)")
    ap.add_argument("--defaults-only", action="store_true", help="only the engine's default formulation (one "
                    "device and all cores) and the PyTorch twin: minutes instead of the hour that ResNet-20's "
                    "vmapped variants take on a 2-core CPU")
    ap.add_argument("--out", default="bench/engine.json")
    ap.add_argument("--engine-only", type=int, metavar="R", help=argparse.SUPPRESS)  # child of engine_on_all_cores
    args = ap.parse_args(argv)
    check_defaults()
    archs = list(ARCHS) if args.arch == "all" else [args.arch]
    if args.engine_only:
        print(bench_engine(_dataset(args.synthetic), archs[0], args.engine_only, args.steps, *VARIANTS[archs[0]][0]))
        return {}
    if args.idle:
        rows = idle_report()
        Path(args.out).with_name("engine_idle.json").write_text(json.dumps(rows, indent=2))
        return {"idle": rows}
    ds = _dataset(args.synthetic)
    if args.idle_cost:
        R = int((args.replicas or "16").split(",")[-1])
        rows = {a: idle_cost(ds, a, R, args.steps or STEPS[a]) for a in archs}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).with_name("engine_idle_cost.json").write_text(json.dumps(
            dict(rows, measured=time.strftime("%Y-%m-%d %H:%M"), load_average=os.getloadavg()), indent=2))
        return rows
    peak = matmul_peak()
    print(f"backend={jax.default_backend()} devices={jax.device_count()} cores={os.cpu_count()} "
          f"float32 matmul peak={peak:.1f} GFLOP/s", flush=True)
    out_path = Path(args.out)
    out = json.loads(out_path.read_text()) if out_path.exists() else {}
    out = out if "archs" in out else {"archs": {}}  # older single-architecture files are replaced
    for arch in archs:
        Rs = [1, 4] if args.quick else [int(r) for r in (args.replicas or REPLICAS[arch]).split(",")]
        steps = max(4, STEPS[arch] // 8) if args.quick else (args.steps or STEPS[arch])
        out["archs"][arch] = bench_arch(ds, arch, Rs, steps, peak, args.synthetic, args.defaults_only)
        out["archs"][arch].update(matmul_peak_gflops=peak, load_average=os.getloadavg(), batch=B,
                                  backend=jax.default_backend(), devices=jax.device_count(), cores=os.cpu_count(),
                                  defaults_only=args.defaults_only, measured=time.strftime("%Y-%m-%d %H:%M"))
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()

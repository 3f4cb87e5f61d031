"""Certified conv bounds on one trained paper-size model: the circular-embedding bound vs the exact test
(jaxnorm.norms, ``conv_bound``), plain power iteration vs Lanczos cycles (``krylov``), per conv: certified gap
spec_upper / spec - 1 and products with A, R_A's interval, and the time of a cold evaluation, a warm one with
the same weights and a warm one after ``--steps`` more training steps, for one replica.

The model is trained for ``--steps`` Adam steps (lr 1e-3, batch 64) on Gaussian images with random labels, then
evaluated cold; trained ``--steps`` more, then evaluated warm from the first evaluation's state.

Usage:
  python bench/bench_conv_bound.py --arch resnet --steps 16 --tol 1e-3
  python bench/bench_conv_bound.py --arch resnet --input-shape 28 28 1 --krylov 8 0 --conv-bound circulant exact
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnorm import norms
from jaxnorm.models import get_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet", choices=["cnn", "resnet", "vit"])
    ap.add_argument("--input-shape", type=int, nargs=3, default=[32, 32, 3])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--krylov", type=int, nargs="+", default=[norms.KRYLOV],
                    help="Lanczos cycle lengths to compare (0: plain power iteration)")
    ap.add_argument("--conv-bound", nargs="+", default=list(norms.CONV_BOUNDS[::-1]), choices=list(norms.CONV_BOUNDS))
    args = ap.parse_args(argv)
    shape = tuple(args.input_shape)
    model = get_model(args.arch, shape, 10, size="paper")
    v = model.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(args.steps, 64) + shape), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=(args.steps, 64)))
    tx = optax.adam(1e-3)

    def step(c, b):
        v, o = c

        def loss(p):
            lg, new = model.apply({**v, "params": p}, b[0], True)
            return optax.softmax_cross_entropy_with_integer_labels(lg, b[1]).mean(), new

        (_, new), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
        u, o = tx.update(g, o, v["params"])
        return ({**v, **new, "params": optax.apply_updates(v["params"], u)}, o), None

    train = jax.jit(lambda c: jax.lax.scan(step, c, (x, y))[0])
    c1 = train((v, tx.init(v["params"])))
    v1, v2 = c1[0], train(c1)[0]
    st = norms.init_norm_state(model.layout, jax.random.PRNGKey(1))
    conv = [i for i, l in enumerate(l for l in model.layout if l.kind in ("conv", "dense")) if l.kind == "conv"]
    conv_names = [l.name for l in model.layout if l.kind == "conv"]
    print(f"{args.arch}, input {shape}, {args.steps} + {args.steps} Adam steps, tol {args.tol}; jax {jax.__version__}")
    for cb in args.conv_bound:
        for k in args.krylov:
            f = jax.jit(lambda v, s: norms.evaluate(v, model.layout, s, zoo=False, conv_bound=cb, tol=args.tol,
                                                    dense_method="power", krylov=k))
            c = f.lower(v1, st).compile()
            times, res = [], []
            for vv, ss in ((v1, st), (v1, None), (v2, None)):  # cold; warm, same weights; warm, trained on
                ss = res[0].state if ss is None else ss
                t = time.perf_counter()
                res.append(jax.block_until_ready(c(vv, ss)))
                times.append(time.perf_counter() - t)
            print(f"\n{cb}, krylov {k}: cold {times[0]:.2f} s, warm same weights {times[1]:.2f} s, warm after "
                  f"{args.steps} more steps {times[2]:.2f} s")
            for r, what in ((res[0], "cold"), (res[2], "warm, trained on")):
                print(f"  {what}: R_A in [{float(r.total):.5g}, {float(r.total_upper):.5g}] "
                      f"(+{float(r.total_upper) / float(r.total) - 1:.2%}); max gap {float(r.max_gap):.2e}; "
                      f"unconverged {int(r.unconverged)}")
            for i, n in zip(conv, conv_names):
                gaps = [float(r.parts[n]["spec_upper"]) / float(r.parts[n]["spec"]) - 1 for r in (res[0], res[2])]
                its = [int(r.state["iters"][i]) for r in (res[0], res[2])]
                print(f"  {n:28s} products cold {its[0]:4d} warm {its[1]:4d}   gap cold {gaps[0]:.2e} "
                      f"warm {gaps[1]:.2e}   spec {float(res[2].parts[n]['spec']):.6g}")


if __name__ == "__main__":
    main()

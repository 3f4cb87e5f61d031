"""Certified conv bounds on one trained paper-size model: the circular-embedding bound vs the exact test
(jaxnorm.norms, ``conv_bound``), per conv: certified gap spec_upper / spec - 1, R_A's interval, and the time of
a cold and of a warm (same weights) evaluation of one replica.

The model is trained for ``--steps`` Adam steps (lr 1e-3, batch 64) on Gaussian images with random labels.

Usage:
  python bench/bench_conv_bound.py --arch resnet --steps 16 --tol 1e-3
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
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args(argv)
    model = get_model(args.arch, (32, 32, 3), 10, size="paper")
    v = model.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(args.steps, 64, 32, 32, 3)), jnp.float32)
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

    (v, _), _ = jax.jit(lambda v: jax.lax.scan(step, (v, tx.init(v["params"])), (x, y)))(v)
    st = norms.init_norm_state(model.layout, jax.random.PRNGKey(1))
    out = {}
    for cb in norms.CONV_BOUNDS[::-1]:  # circulant, then exact
        f = jax.jit(lambda v, s: norms.evaluate(v, model.layout, s, zoo=False, conv_bound=cb, tol=args.tol,
                                                dense_method="power"))
        c = f.lower(v, st).compile()
        t = time.perf_counter()
        r = jax.block_until_ready(c(v, st))
        tc = time.perf_counter() - t
        t = time.perf_counter()
        jax.block_until_ready(c(v, r.state))
        tw = time.perf_counter() - t
        out[cb] = r
        print(f"{cb}: cold {tc:.1f} s, warm (same weights) {tw:.1f} s; R_A in [{float(r.total):.5g}, "
              f"{float(r.total_upper):.5g}] (+{float(r.total_upper) / float(r.total) - 1:.2%}); "
              f"max gap {float(r.max_gap):.2e}; unconverged {int(r.unconverged)}", flush=True)
    conv = {l.name for l in model.layout if l.kind == "conv"}
    for n, b in out["exact"].parts.items():
        if n in conv:
            a = out["circulant"].parts[n]
            print(f"  {n:24s} circulant gap {float(a['spec_upper']) / float(a['spec']) - 1:.2e}   "
                  f"exact gap {float(b['spec_upper']) / float(b['spec']) - 1:.2e}   spec {float(b['spec']):.5g}")


if __name__ == "__main__":
    main()

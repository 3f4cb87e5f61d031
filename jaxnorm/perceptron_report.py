"""Figures 1, 2 and 6 (left) of the paper for the perceptron, with their data.

``run(out_dir, alpha=5.0)`` writes into ``out_dir``:

* ``fig1_free_norm.{png,pdf}`` -- paper Fig. 1: the free-norm GD trajectory ``eps`` vs
  ``lambda(t) = |w(t)|/sqrt(N)`` (coloured by step t, log colour scale; thin lines: seeds; thick:
  seed average at equal t) over the replica curve ``eps(lambda)`` of the fixed-norm problem, with
  finite-N fixed-norm minimizers (Riemannian Newton on the sphere) as open circles and horizontal lines
  at the Hebb, Bayes and maximal-stability errors.
* ``fig2_scaling.{png,pdf}`` -- paper Fig. 2: (a) ``eps(lambda)`` for several alphas with stars at
  ``(lambda_opt, eps_opt)``; (b) ``eps/eps_opt`` vs ``lambda/lambda_opt``, insets
  ``lambda_opt(alpha)`` and ``eps_opt(alpha)`` on log-log axes with power-law fits.
* ``fig6_margins.{png,pdf}`` -- paper Fig. 6 (left): replica margin distributions ``P(Delta)`` of
  the storage problem (random labels) at alpha = 0.4 for several lambda (lines), over histograms
  of the training margins of finite-N fixed-norm minimizers (Riemannian Newton, N = 1000).
* data: ``free_norm.npz`` + ``free_norm.csv`` (one row per seed and recorded step),
  ``fixed_norm_sim.csv``, ``theory_eps_lambda.csv`` (all alphas of Fig. 1 and 2),
  ``theory_optimum.csv``, ``margins.npz``, ``summary.json``.

Run: ``python -m jaxnorm.perceptron_report --alpha 5 --out DIR`` (``--quick`` for a smoke run).
The replica theory runs in float64 (``jax_enable_x64`` is switched on for the duration of ``run``
and restored afterwards); the simulations run in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm import cli, perceptron, rundir

__all__ = ["run", "main"]

FIG2_ALPHAS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
INSET_ALPHAS = tuple(np.round(np.logspace(0, 2, 9), 3))
FIG6_ALPHA = 0.4
FIG6_LAMS = (0.1, 0.5, 2.0, 10.0)


# ----------------------------------------------------------------------------- theory wrappers


def _theory():
    from jaxnorm import theory  # imported lazily: the report must not fail at import time
    return theory


def _eps_curve(lams: np.ndarray, alpha: float) -> np.ndarray:
    """Replica ``eps(lambda)`` at one alpha, [L] float64 (nan where the solver did not converge)."""
    th = _theory()
    try:
        eps = np.asarray(th.logistic_error(jnp.asarray(lams, jnp.float64), float(alpha)), float)
        if eps.shape == lams.shape:
            return eps
    except Exception:  # noqa: BLE001 -- fall back to one solve per lambda
        pass
    return np.array([float(th.logistic_error(float(l), float(alpha))) for l in lams])


def _scalar(fn, alpha):
    return float(np.asarray(fn(float(alpha))))


def _optima(alphas: Sequence[float], num_grid: int) -> dict:
    """{alpha: (lam_opt, eps_opt)} from one vectorized ``theory.optimal_lambda`` call."""
    a = np.asarray(sorted(set(float(v) for v in alphas)))
    lam, eps = _theory().optimal_lambda(jnp.asarray(a, jnp.float64), num_grid=num_grid)
    return {float(k): (float(l), float(e)) for k, l, e in zip(a, np.asarray(lam), np.asarray(eps))}


def _margin_densities(lams: Sequence[float], alpha: float) -> dict:
    """Replica margin distributions of the storage problem: {lam: (Delta [M], P(Delta) [M])}."""
    d, p = _theory().margin_distribution(jnp.asarray(lams, jnp.float64), float(alpha), teacher=False)
    d, p = np.asarray(d, float), np.asarray(p, float)
    return {float(l): (d[i], p[i]) for i, l in enumerate(lams)}


# ----------------------------------------------------------------------------- data writing


def _write_csv(path: str, header: Sequence[str], rows) -> None:
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for r in rows:
            f.write(",".join(f"{v:.8g}" if isinstance(v, float) else str(v) for v in r) + "\n")


def _save(fig, out_dir: str, name: str) -> list[str]:
    paths = []
    for ext in ("png", "pdf"):
        p = os.path.join(out_dir, f"{name}.{ext}")
        fig.savefig(p, dpi=150 if ext == "png" else None, bbox_inches="tight")
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------- figures


def _fig1(free, theory_lams, theory_eps, fixed, lines, alpha, n):
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.colors import LogNorm

    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    ax.plot(theory_lams, theory_eps, color="tab:blue", lw=2.2, zorder=3,
            label=r"fixed norm, replica theory ($N\to\infty$)")
    if fixed is not None:
        ax.plot(fixed.lams, fixed.eps.mean(1), "o", mfc="none", mec="tab:blue", mew=1.3, ms=6,
                zorder=4, label=f"fixed norm, minimizer (N={fixed.n})")
    steps = free.steps.astype(float)
    norm = LogNorm(vmin=steps[0], vmax=steps[-1])
    cmap = plt.get_cmap("plasma")
    lam, eps = free.lam[0], free.eps[0]  # [S, K]
    for s in range(lam.shape[0]):
        ax.plot(lam[s], eps[s], color="0.6", lw=0.5, alpha=0.5, zorder=1)
    lm, em = lam.mean(0), eps.mean(0)
    pts = np.stack([lm, em], -1)
    seg = np.stack([pts[:-1], pts[1:]], 1)
    lc = LineCollection(seg, cmap=cmap, norm=norm, lw=3.0, zorder=5)
    lc.set_array(np.sqrt(steps[:-1] * steps[1:]))
    ax.add_collection(lc)
    cb = fig.colorbar(lc, ax=ax, pad=0.02)
    cb.set_label("GD step $t$ (free norm, $\\lambda=|w(t)|/\\sqrt{N}$)")
    styles = {"Hebb": ("tab:green", "--"), "Bayes": ("tab:red", ":"),
              "max. stability": ("k", "-.")}
    for name, val in lines.items():
        c, ls = styles[name]
        ax.axhline(val, color=c, ls=ls, lw=1.3, label=f"{name} ({val:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel(r"$\lambda$")
    ax.set_ylabel(r"generalization error $\epsilon$")
    lo = min(theory_lams[0], np.nanmin(lm))
    hi = max(theory_lams[-1], np.nanmax(lm))
    ax.set_xlim(lo, hi)
    ymin = np.nanmin([np.nanmin(theory_eps), np.nanmin(em), lines.get("Bayes", np.inf)])
    ymax = np.nanmax([lines.get("Hebb", 0), np.nanmax(em)])
    pad = 0.08 * (ymax - ymin)
    ax.set_ylim(ymin - pad, ymax + 2 * pad)
    ax.set_title(rf"Perceptron, $\alpha={alpha:g}$, free-norm GD $N={n}$, "
                 rf"{free.steps[-1]:.0e} steps".replace("e+0", "e"), fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def _plain_log_ticks(axis):
    """Log axis labelled 0.02, 0.05, 0.1, ... instead of 2x10^-2 (as in the paper's figures)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _fig2(curves, lams, optima, inset):
    import matplotlib.pyplot as plt

    alphas = sorted(curves)
    colors = plt.get_cmap("viridis")(np.linspace(0.05, 0.9, len(alphas)))
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(10, 4.0))
    for c, a in zip(colors, alphas):
        lo, eo = optima[a]
        ax_a.plot(lams, curves[a], color=c, lw=1.8, label=rf"$\alpha={a:g}$")
        ax_a.plot(lo, eo, "*", color=c, mec="k", mew=0.6, ms=12, zorder=5)
        ax_b.plot(lams / lo, curves[a] / eo, color=c, lw=1.8, label=rf"$\alpha={a:g}$")
    for ax in (ax_a, ax_b):
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)
    ax_a.set_xlabel(r"$\lambda$")
    ax_a.set_ylabel(r"$\epsilon$")
    ax_a.set_title("(a) fixed-norm perceptron, replica theory", fontsize=10)
    ax_a.legend(fontsize=8, loc="lower left")
    ax_b.set_xlabel(r"$\lambda/\lambda_{\rm opt}(\alpha)$")
    ax_b.set_ylabel(r"$\epsilon/\epsilon_{\rm opt}(\alpha)$")
    ax_b.set_title("(b) rescaled by the optimum", fontsize=10)
    ax_b.axvline(1.0, color="0.7", lw=0.8, ls=":")
    ax_b.axhline(1.0, color="0.7", lw=0.8, ls=":")

    ia, il, ie = inset
    ok = np.isfinite(il) & np.isfinite(ie)
    for k, (vals, lab, pos) in enumerate(((il, r"$\lambda_{\rm opt}$", [0.64, 0.66, 0.33, 0.30]),
                                          (ie, r"$\epsilon_{\rm opt}$", [0.64, 0.22, 0.33, 0.30]))):
        axi = ax_b.inset_axes(pos)
        axi.loglog(ia[ok], vals[ok], "o", ms=3.5, color="k")
        if ok.sum() >= 2:
            slope, icpt = np.polyfit(np.log(ia[ok]), np.log(vals[ok]), 1)
            xs = np.array([ia[ok].min(), ia[ok].max()])
            axi.loglog(xs, np.exp(icpt) * xs ** slope, "-", color="tab:red", lw=1,
                       label=rf"$\propto\alpha^{{{slope:.2f}}}$")
            axi.legend(fontsize=6, loc="best", handlelength=1, framealpha=0.7)
        axi.set_xlabel(r"$\alpha$", fontsize=7, labelpad=0)
        axi.set_ylabel(lab, fontsize=7, labelpad=0)
        axi.tick_params(labelsize=6)
        _plain_log_ticks(axi.yaxis)
    fig.tight_layout()
    return fig


def _fig6(margins, alpha, storage=None):
    import matplotlib.pyplot as plt

    lams_ = sorted(margins)
    colors = plt.get_cmap("plasma")(np.linspace(0.0, 0.85, len(lams_)))
    fig, ax = plt.subplots(figsize=(5.0, 3.8))
    for i, (c, lam) in enumerate(zip(colors, lams_)):
        d, p = margins[lam]
        ax.plot(d, p, color=c, lw=1.8, label=rf"$\lambda={lam:g}$", zorder=3)
        if storage is not None:
            ax.hist(storage.margins[i].ravel(), bins=50, density=True, histtype="stepfilled",
                    color=c, alpha=0.18, zorder=1)
            ax.hist(storage.margins[i].ravel(), bins=50, density=True, histtype="step",
                    color=c, lw=0.7, alpha=0.8, zorder=2)
    if storage is not None:
        ax.plot([], [], color="0.5", lw=6, alpha=0.3,
                label=f"minimizers, N={storage.n}\n({storage.margins.shape[1]} seeds)")
    peaks = sorted(p.max() for _, p in margins.values())
    top = 1.3 * peaks[-2] if len(peaks) > 1 else 1.1 * peaks[-1]
    for c, lam in zip(colors, lams_):  # the sharpest (largest-lambda) peaks leave the frame
        d, p = margins[lam]
        if p.max() > top:
            ax.annotate(f"peak {p.max():.0f}", (d[np.argmax(p)], 0.97 * top), color=c, fontsize=7,
                        ha="left", va="top", xytext=(4, 0), textcoords="offset points")
    ax.set_ylim(0, top)
    lo = min(d[p > 1e-3 * p.max()].min() for d, p in margins.values())
    hi = max(d[p > 1e-3 * p.max()].max() for d, p in margins.values())
    ax.set_xlim(lo - 0.1, hi + 0.1)
    ax.set_xlabel(r"margin $\Delta$")
    ax.set_ylabel(r"$P(\Delta)$")
    ax.set_title(rf"storage problem (random labels), $\alpha={alpha:g}$: replica theory (lines)",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- driver


def run(out_dir: str, alpha: float = 5.0, n: int = 256, steps: int = 1_000_000, seeds: int = 4,
        quick: bool = False, key: int = 0) -> dict:
    """Computes and writes the data and figures of paper Fig. 1, Fig. 2 and Fig. 6 (left).

    Args:
      out_dir: output folder (created).
      alpha: load ``P/N`` of Fig. 1 (> 0).
      n: input dimension N of the free-norm and Fig. 1 fixed-norm simulations (>= 1). The default
        256 keeps 4 seeds x 1e6 GD steps at ~2-3 CPU-minutes on 2 cores (the P x N patterns fit
        in cache); N = 1000 works but is ~10x slower (memory-bound matrix-vector products).
      steps: free-norm GD steps (>= 1); the paper uses 1e6.
      seeds: number of seeds (>= 1).
      quick: smoke-test sizes (small N, 2000 steps, coarse theory grids).
      key: integer seed of the base PRNG key.
    Returns:
      summary dict (also written to ``summary.json``) with file paths and headline numbers.
    """
    perceptron._check_positive("alpha", alpha)
    perceptron._check_positive("n", n, integer=True)
    perceptron._check_positive("steps", steps, integer=True)
    perceptron._check_positive("seeds", seeds, integer=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if quick:
        n, steps, seeds = min(n, 64), min(steps, 2000), min(seeds, 2)
        n_lam, fig2_alphas, inset_alphas, fig6_lams = 12, (1.0, 5.0, 20.0), (1.0, 5.0, 20.0), (0.5, 5.0)
        fixed_lams, num_grid, n_storage = (0.5, 2.0), 9, 100
    else:
        n_lam, fig2_alphas, inset_alphas, fig6_lams = 100, FIG2_ALPHAS, INSET_ALPHAS, FIG6_LAMS
        fixed_lams, num_grid, n_storage = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0), 25, 1000
    alpha = float(alpha)
    os.makedirs(out_dir, exist_ok=True)
    base = jax.random.key(int(key))
    timings = {}

    # --- simulations (float32) -------------------------------------------------------------
    t0 = time.perf_counter()
    free = perceptron.simulate_free_norm(base, n, [alpha], n_seeds=seeds, steps=steps)
    timings["free_norm_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fixed = perceptron.simulate_fixed_norm(base, n, alpha, fixed_lams, n_seeds=seeds)
    storage = perceptron.simulate_fixed_norm(base, n_storage, FIG6_ALPHA, fig6_lams, n_seeds=seeds,
                                             random_labels=True)
    timings["fixed_norm_s"] = time.perf_counter() - t0

    # --- replica theory (float64) --------------------------------------------------------
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        t0 = time.perf_counter()
        th = _theory()
        lams1 = np.logspace(-2, max(2.0, np.log10(free.lam.max()) + 0.1), n_lam)
        eps1 = _eps_curve(lams1, alpha)
        lines = {"Hebb": _scalar(th.hebb_error, alpha), "Bayes": _scalar(th.bayes_error, alpha),
                 "max. stability": _scalar(th.max_stability_error, alpha)}
        lams2 = np.logspace(-2, 3, n_lam)
        curves = {a: _eps_curve(lams2, a) for a in fig2_alphas}
        if quick:  # grid minima of the computed curves: no extra solves (smoke test only)
            optima = {a: (float(lams2[np.nanargmin(curves[a])]), float(np.nanmin(curves[a])))
                      for a in fig2_alphas}
            optima[alpha] = (float(lams1[np.nanargmin(eps1)]), float(np.nanmin(eps1)))
        else:
            optima = _optima(set(fig2_alphas) | set(inset_alphas) | {alpha}, num_grid)
        margins = _margin_densities(fig6_lams, FIG6_ALPHA)
        timings["theory_s"] = time.perf_counter() - t0
    finally:
        jax.config.update("jax_enable_x64", previous)

    # --- data ---------------------------------------------------------------------------
    np.savez(os.path.join(out_dir, "free_norm.npz"), alpha=alpha, n=n, p=free.p[0], lr=free.lr[0],
             steps=free.steps, lam=free.lam[0], eps=free.eps[0], loss=free.loss[0])
    _write_csv(os.path.join(out_dir, "free_norm.csv"), ["alpha", "n", "seed", "step", "lam", "eps", "loss"],
               [(alpha, n, s, int(t), float(free.lam[0, s, k]), float(free.eps[0, s, k]),
                 float(free.loss[0, s, k]))
                for s in range(seeds) for k, t in enumerate(free.steps)])
    _write_csv(os.path.join(out_dir, "fixed_norm_sim.csv"), ["alpha", "n", "lam", "seed", "eps", "grad_norm"],
               [(alpha, n, float(l), s, float(fixed.eps[i, s]), float(fixed.grad_norm[i, s]))
                for i, l in enumerate(fixed.lams) for s in range(seeds)])
    rows = [(alpha, float(l), float(e)) for l, e in zip(lams1, eps1)]
    rows += [(a, float(l), float(e)) for a in fig2_alphas for l, e in zip(lams2, curves[a])]
    _write_csv(os.path.join(out_dir, "theory_eps_lambda.csv"), ["alpha", "lam", "eps"], rows)
    _write_csv(os.path.join(out_dir, "theory_optimum.csv"), ["alpha", "lam_opt", "eps_opt"],
               [(a, lo, eo) for a, (lo, eo) in sorted(optima.items())])
    np.savez(os.path.join(out_dir, "margins.npz"), alpha=FIG6_ALPHA, lams=np.array(sorted(margins)),
             sim_margins=storage.margins, sim_n=storage.n,
             **{f"delta_{i}": margins[l][0] for i, l in enumerate(sorted(margins))},
             **{f"p_{i}": margins[l][1] for i, l in enumerate(sorted(margins))})

    # --- figures ------------------------------------------------------------------------
    files = []
    fig = _fig1(free, lams1, eps1, fixed, lines, alpha, n)
    files += _save(fig, out_dir, "fig1_free_norm")
    plt.close(fig)
    ia = np.array(sorted(set(inset_alphas)))
    inset = (ia, np.array([optima[a][0] for a in ia]), np.array([optima[a][1] for a in ia]))
    fig = _fig2(curves, lams2, optima, inset)
    files += _save(fig, out_dir, "fig2_scaling")
    plt.close(fig)
    fig = _fig6(margins, FIG6_ALPHA, storage)
    files += _save(fig, out_dir, "fig6_margins")
    plt.close(fig)

    k_min = int(np.argmin(free.eps[0].mean(0)))
    summary = {
        "alpha": alpha, "n": n, "p": int(free.p[0]), "steps": int(steps), "seeds": int(seeds),
        "lr": float(free.lr[0]), "quick": bool(quick),
        "free_norm_min_eps": float(free.eps[0].mean(0)[k_min]),
        "free_norm_lam_at_min": float(free.lam[0].mean(0)[k_min]),
        "free_norm_final_lam": float(free.lam[0, :, -1].mean()),
        "free_norm_final_eps": float(free.eps[0, :, -1].mean()),
        "theory_lam_opt": optima[alpha][0], "theory_eps_opt": optima[alpha][1],
        "lines": lines, "timings_s": timings, "files": files,
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv=None) -> dict:
    """CLI: ``python -m jaxnorm.perceptron_report --alpha 5 --out DIR [--n --steps --seeds --quick]``."""
    ap = argparse.ArgumentParser(prog="jaxnorm.perceptron_report", description=__doc__.split("\n")[0])
    ap.add_argument("--alpha", type=float, default=5.0, help="load P/N of Fig. 1 (default 5)")
    ap.add_argument("--out", default="runs/perceptron", help="output folder (default runs/perceptron)")
    ap.add_argument("--n", type=int, default=256, help="input dimension N of the simulations")
    ap.add_argument("--steps", type=int, default=1_000_000, help="free-norm GD steps")
    ap.add_argument("--seeds", type=int, default=4, help="number of seeds")
    ap.add_argument("--quick", action="store_true", help="small smoke-test run")
    args = ap.parse_args(argv)
    try:
        rundir.make_dir(args.out, "--out")  # before minutes of simulation, not after
        summary = run(args.out, alpha=args.alpha, n=args.n, steps=args.steps, seeds=args.seeds,
                      quick=args.quick)
    except ValueError as e:
        ap.error(str(e))
    print(json.dumps({k: v for k, v in summary.items() if k != "files"}, indent=2))
    print("\n".join(summary["files"]))
    return summary


def _cli(argv=None) -> int:
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli.guard(_cli))

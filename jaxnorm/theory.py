r"""Zero-temperature replica theory of the fixed-norm teacher-student perceptron (paper Sec. 2, App. A).

Setting (D'Amico, Bocchi, Negri 2025, Sec. 2.1): student and teacher on the sphere
:math:`|w|^2 = |w^*|^2 = N`, :math:`P = \alpha N` examples, margins
:math:`\Delta = y\, w\cdot x/\sqrt N`, logistic loss (paper Eq. 1)

.. math::  V_\lambda(\Delta) = -\Delta + \tfrac1\lambda \log 2\cosh(\lambda\Delta)
           = \tfrac1\lambda\,\mathrm{softplus}(-2\lambda\Delta),
           \qquad V'_\lambda = -2\sigma(-2\lambda\Delta),

and generalization error :math:`\epsilon = \arccos(R)/\pi`.

Equations (notation: :math:`Dt` standard Gaussian measure, :math:`\phi` its density,
:math:`H(x) = \mathrm{erfc}(x/\sqrt2)/2`, :math:`s = \sqrt{1-R^2}`, :math:`c = 2\lambda`):

* Teacher weight :math:`w(t,R) = 2H(-Rt/s)`; :math:`Dt\,w(t,R)` is the density of the
  (rescaled) student field times the label.
* Proximal point :math:`\Delta_0(t,x) = \mathrm{argmin}_\Delta[V(\Delta) + (\Delta-t)^2/2x]`, i.e.
  :math:`\Delta_0 - t + xV'(\Delta_0) = 0`.  The push :math:`a = \Delta_0 - t \in (0, 2x)` is found in
  log variables: :math:`\sigma = \log a` solves :math:`F(\sigma) = \sigma + \mathrm{softplus}(c(t+e^\sigma))
  - \log 2x = 0`.  :math:`F` is increasing and convex in :math:`\sigma`, so Newton started to the
  right of the root converges monotonically.  The start is :math:`\min(\log 2x, \sigma_W)` where
  :math:`\sigma_W` solves the same equation with softplus(z) replaced by z (a Wright-omega / Lambert-W
  problem); both are upper bounds of the root and their minimum is within log 2 of it.  This stays
  well scaled when :math:`x \sim e^{2\lambda\kappa}` is astronomically large (large :math:`\lambda`).
* Energy (paper Eq. 13), with :math:`M(t,x) = \min_\Delta[V + (\Delta-t)^2/2x]`:
  :math:`f = -\mathrm{extr}_{x,R}\,[(1-R^2)/2x - 2\alpha\int Dt\,H(-Rt/s)\,M(t,x)]`.
* Stationarity (envelope theorem for :math:`\partial_x M = -(\Delta_0-t)^2/2x^2`,
  :math:`\partial_t M = -(\Delta_0-t)/x`; the R-derivative is integrated by parts in t, using
  :math:`\phi(t)\phi(Rt/s) = e^{-t^2/2s^2}/2\pi`):

  (A)  :math:`1 - R^2 = \alpha \int Dt\, w(t,R)\, (\Delta_0(t,x) - t)^2`

  (B)  :math:`R = \frac{\alpha}{\pi s} \int dt\, e^{-t^2/2s^2}\, (\Delta_0(t,x) - t)`

  Checks: :math:`\lambda\to0` gives :math:`V = -\Delta`, :math:`\Delta_0 = t + x` and
  :math:`R = (1 + \pi/2\alpha)^{-1/2}` (Hebb).  :math:`\lambda\to\infty` with
  :math:`\kappa = \log(2x)/2\lambda` fixed gives :math:`\Delta_0 = \max(t,\kappa)` and the
  maximal-stability equations (Gardner 1988; Engel & Van den Broeck 2001, ch. 4):
  (A) :math:`1-R^2 = \alpha\int_{t<\kappa} Dt\,w\,(\kappa-t)^2`,
  (B) :math:`R = \frac{\alpha}{\pi s}\int_{-\infty}^{\kappa} dt\,e^{-t^2/2s^2}(\kappa-t)`.
* Gibbs learning (Engel & Van den Broeck 2001, Eq. 2.42):
  :math:`R/\sqrt{1-R} = \frac{\alpha}{\pi}\int Dt\, e^{-Rt^2/2}/H(-\sqrt R\, t)`;
  Bayes-optimal: :math:`R_B = \sqrt{R_{Gibbs}}` (ibid. Sec. 3.6).
* Margin distribution (paper Eqs. 16, 17), in closed form through the change of variables
  :math:`t(\Delta) = \Delta + xV'(\Delta)`, :math:`t'(\Delta) = 1 + xV''(\Delta) > 0`:
  :math:`P(\Delta) = \phi(t(\Delta))\, w(t(\Delta),R)\, (1 + xV''(\Delta))`; the storage problem
  (random labels) has :math:`R = 0`, :math:`w = 1` and the single saddle-point equation
  :math:`1 = \alpha\int Dt\,(\Delta_0(t,x)-t)^2`.

Numerics.
* Gaussian integrals: composite Gauss-Legendre on the truncated range [-10, 10] (the neglected
  Gaussian mass is ~1e-23), split in two pieces at the midpoint between the two sharp features of
  the integrands -- t = 0 (the teacher step w and the width-s Gaussian of (B)) and the kink of
  :math:`\Delta_0` at :math:`t \approx \log(2cx)/c` (width 1/c) -- and on each piece panels are
  uniform in :math:`\xi = \mathrm{asinh}((t - t_c)/\delta)`, which clusters nodes at the feature with
  resolution :math:`\delta`.  2 x 32 panels x 8 nodes reach ~1e-15 relative accuracy over
  lam in [0.01, 50], alpha in [0.1, 20] (tests/test_theory.py refines the rule and compares with
  scipy.integrate.quad).
* Saddle point: damped Newton (backtracking on the residual norm) in u = log x and v = log(theta),
  theta = arccos R = pi * eps, on the log-ratio residuals log(alpha I_A / (1-R^2)) and
  log(alpha J_B / (pi R)), with jax.jacfwd Jacobians, started from the Hebb solution (it converges
  in <= ~8 iterations over the whole validated range, so no continuation in lam is needed).
* Derivatives w.r.t. lam and alpha by implicit differentiation (jax.lax.custom_root); the proximal
  point has an analytic custom JVP (implicit function theorem), so nothing is unrolled.
* optimal_lambda: eps on a 13-point log grid of lam in [0.01, 1000], then 12 Illinois regula-falsi
  steps on d eps / d log lam (jax.grad through custom_root) in the bracket around the grid minimum,
  all in one loop with warm-started solves.
* Batching: public functions broadcast their inputs, flatten, pad to a power of two (at least 8)
  and run one cached jit(vmap(scalar solver)); this bounds the number of compiled programs.
  Measured (2-core machine under heavy load): a 100-point eps(lam) curve takes ~0.2-0.45 s after
  compilation; compiling the solver takes ~5-10 s.

Precision: everything needs float64.  This module does NOT flip ``jax_enable_x64`` (that would
change the dtypes of every other module); the public functions raise ``RuntimeError`` when x64 is
off.  Enable it globally (``jax.config.update("jax_enable_x64", True)``) or locally with
``with jax.enable_x64(True): ...``.

Validated accuracy range: lam in [0.01, 50], alpha in [0.1, 20] (it works beyond, e.g. lam = 1e-5,
but this is what the tests cover).  Bad concrete inputs (non-finite, <= 0) raise ``ValueError``;
under ``jax.jit`` inputs are tracers and are not checked.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erfc

__all__ = [
    "LogisticSolution",
    "MaxStabilitySolution",
    "StorageSolution",
    "logistic_solution",
    "logistic_error",
    "optimal_lambda",
    "hebb_error",
    "gibbs_error",
    "bayes_error",
    "max_stability_solution",
    "max_stability_error",
    "storage_solution",
    "margin_density",
    "margin_distribution",
    "proximal_point",
]

_T = 10.0  # truncation of the Gaussian integrals: int_{|t|>10} Dt t^2 ~ 1e-22.
_PANELS = 32  # panels per half of the sinh-mapped rule (see module docstring).
_ORDER = 8  # Gauss-Legendre nodes per panel.
_LOG2 = math.log(2.0)
_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)
_MIN_BATCH = 8  # smallest padded batch: scalars and small arrays share one compiled program
_TOL = 1e-12  # Newton stops when max |residual| (log-ratios, i.e. relative errors) is below this.
_MAXITER = 100  # counts backtracking steps too; typical solves take 5-8
_CONVERGED = 1e-10  # max |residual| below which a solution is reported as converged


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


def _require_x64():
    if not jax.config.jax_enable_x64:
        raise RuntimeError(
            "jaxnorm.theory needs float64 (saddle points are solved to ~1e-12): enable it with "
            "jax.config.update('jax_enable_x64', True) or call inside `with jax.enable_x64(True):`.")


def _check_positive(name, value):
    """ValueError if a concrete input has a non-finite or non-positive entry (tracers pass)."""
    if isinstance(value, jax.core.Tracer):
        return
    arr = np.asarray(value, dtype=np.float64)
    bad = ~np.isfinite(arr) | (arr <= 0)
    if np.any(bad):
        raise ValueError(f"{name} must be finite and > 0 (allowed range (0, inf); validated range "
                         f"{_VALIDATED[name]}), got {name}={arr[bad].ravel()[0]!r}")


_VALIDATED = {"lam": "[0.01, 50]", "alpha": "[0.1, 20]"}


def _prepare(**kwargs):
    _require_x64()
    for k, v in kwargs.items():
        _check_positive(k, v)
    arrs = jnp.broadcast_arrays(*[jnp.asarray(v, dtype=jnp.float64) for v in kwargs.values()])
    return arrs


@functools.lru_cache(maxsize=None)
def _batched(scalar_fn):
    return jax.jit(jax.vmap(scalar_fn))


def _vmap_flat(fn, *args):
    """Apply a scalar function over broadcast arrays: flatten, pad to a power of two, jit(vmap).

    Padding (with the harmless point 1.0) keeps the number of distinct compiled shapes small.
    """
    shape = args[0].shape
    n = int(np.prod(shape))
    m = max(_MIN_BATCH, 1 << max(0, (n - 1).bit_length()))
    flat = [jnp.pad(a.reshape(-1), (0, m - n), constant_values=1.0) for a in args]
    out = _batched(fn)(*flat)
    return jax.tree.map(lambda o: o[:n].reshape(shape + o.shape[1:]), out)


# ----------------------------------------------------------------------------------------------
# Proximal point of the logistic loss
# ----------------------------------------------------------------------------------------------


def _omega(m, iters=8):
    """Wright omega function: the y with y + e^y = m (Newton from the right of a convex function)."""
    y = jnp.where(m > 1.0, jnp.log(jnp.maximum(m, 1.0)), m)

    def body(_, y):
        ey = jnp.exp(y)
        return y - (y + ey - m) / (1.0 + ey)

    return jax.lax.fori_loop(0, iters, body, y)


def _log_push_newton(t, u, c, iters):
    L = _LOG2 + u
    # Upper bounds of the root: softplus(z) >= 0 and softplus(z) >= z (module docstring).
    s_w = _omega(L + jnp.log(c) - c * t) - jnp.log(c)
    s = jnp.minimum(L, s_w)

    def body(_, s):
        a = jnp.exp(s)
        z = c * (t + a)
        F = s + jax.nn.softplus(z) - L
        return s - F / (1.0 + c * a * jax.nn.sigmoid(z))

    return jax.lax.fori_loop(0, iters, body, s)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _log_push(t, u, c, iters=8):
    """log(Delta_0(t, x) - t) for V_lam, with u = log x and c = 2 lam (all broadcastable).

    8 Newton steps reach the float64 fixed point (checked against 300-step bisection over
    t in [-10, 10], log x in [-8, 300], lam in [0.005, 80]: 6 steps already suffice).
    """
    return _log_push_newton(t, u, c, iters)


@_log_push.defjvp
def _log_push_jvp(iters, primals, tangents):
    # Implicit function theorem on G(s; t, u, c) = s + softplus(c (t + e^s)) - log 2 - u = 0.
    t, u, c = primals
    dt, du, dc = tangents
    s = _log_push(t, u, c, iters)
    a = jnp.exp(s)
    sig = jax.nn.sigmoid(c * (t + a))
    ds = -(c * sig * dt - du + (t + a) * sig * dc) / (1.0 + c * a * sig)
    return s, ds


def proximal_point(t, lam, x):
    """Delta_0(t, x) = argmin_D [V_lam(D) + (D - t)^2 / (2x)] (broadcasting, differentiable).

    Args:
      t: fields, any shape. lam: loss sharpness. x: the saddle-point x (> 0).
    Returns:
      Delta_0 with the broadcast shape.
    """
    t, lam, x = jnp.broadcast_arrays(*(jnp.asarray(v, jnp.float64) for v in (t, lam, x)))
    return t + jnp.exp(_log_push(t, jnp.log(x), 2.0 * lam))


# ----------------------------------------------------------------------------------------------
# Quadrature
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _gl(order):
    return np.polynomial.legendre.leggauss(order)


def _sinh_rule(a, b, center, scale, panels, order):
    """Composite Gauss-Legendre on [a, b], panels uniform in xi = asinh((t - center) / scale)."""
    gx, gw = _gl(order)
    xa = jnp.arcsinh((a - center) / scale)
    xb = jnp.arcsinh((b - center) / scale)
    h = (xb - xa) / panels
    left = xa + h * jnp.arange(panels)
    xi = (left[:, None] + 0.5 * h * (jnp.asarray(gx)[None, :] + 1.0)).reshape(-1)
    wxi = jnp.tile(0.5 * h * jnp.asarray(gw), panels)
    return center + scale * jnp.sinh(xi), wxi * scale * jnp.cosh(xi)


def _two_feature_rule(c1, d1, c2, d2, panels=_PANELS, order=_ORDER, lo=-_T, hi=_T):
    """Nodes/weights on [lo, hi] resolving features at c1 (scale d1) and c2 (scale d2).

    Node placement is a numerical choice, not part of the integrand, so it is excluded from
    differentiation (derivatives are then the same rule applied to the derivative integrand).
    """
    c1, d1, c2, d2 = (jax.lax.stop_gradient(v) for v in (c1, d1, c2, d2))
    c1 = jnp.clip(c1, lo, hi)
    c2 = jnp.clip(c2, lo, hi)
    swap = c2 < c1
    ca, da = jnp.where(swap, c2, c1), jnp.where(swap, d2, d1)
    cb, db = jnp.where(swap, c1, c2), jnp.where(swap, d1, d2)
    m = 0.5 * (ca + cb)
    ta, wa = _sinh_rule(lo, m, ca, da, panels, order)
    tb, wb = _sinh_rule(m, hi, cb, db, panels, order)
    return jnp.concatenate([ta, tb]), jnp.concatenate([wa, wb])


def _kink(u, c):
    """Where Delta_0(t) bends from ~kappa to ~t: c a = W(1) at t ~ log(2 c x) / c; scale 1/c."""
    return (jnp.log(2.0 * c) + u) / c, jnp.minimum(1.0 / c, 1.0)


def _teacher_integrals(u, theta, lam, panels=_PANELS, order=_ORDER):
    """I_A = int Dt w(t,R) a^2 and J_B = (1/s) int dt exp(-t^2/2s^2) a, with a = Delta_0 - t."""
    c = 2.0 * lam
    R, s = jnp.cos(theta), jnp.sin(theta)
    tk, dk = _kink(u, c)
    t, w = _two_feature_rule(0.0, jnp.minimum(s, 1.0), tk, dk, panels, order)
    a = jnp.exp(_log_push(t, u, c))
    gauss = jnp.exp(-0.5 * t * t) / _SQRT2PI
    IA = jnp.sum(w * gauss * erfc(-R * t / (s * _SQRT2)) * a * a)
    JB = jnp.sum(w * jnp.exp(-0.5 * (t / s) ** 2) * a) / s
    return IA, JB


def _teacher_residual(p, lam, alpha):
    """Log-ratio residuals of (A) and (B) at p = (log x, log theta)."""
    u, theta = p[0], jnp.exp(p[1])
    IA, JB = _teacher_integrals(u, theta, lam)
    return jnp.stack([jnp.log(alpha * IA) - 2.0 * jnp.log(jnp.sin(theta)),
                      jnp.log(alpha * JB / jnp.pi) - jnp.log(jnp.cos(theta))])


# ----------------------------------------------------------------------------------------------
# Generic damped Newton with implicit differentiation
# ----------------------------------------------------------------------------------------------


def _damped_newton(fun, p0, tol=_TOL, maxiter=_MAXITER):
    """Newton with backtracking on max|fun|; non-finite trial points are rejected.

    One while loop, one residual+Jacobian evaluation per iteration (at the trial point), so the
    residual is traced once -- this keeps compile times down.  Returns (p, max|r|).
    """
    val_jac = jax.jacfwd(lambda p: (fun(p), fun(p)), has_aux=True)

    def norm(r):
        n = jnp.max(jnp.abs(r))
        return jnp.where(jnp.isfinite(n), n, jnp.inf)

    def cond(st):
        p, r, dp, step, k = st
        return (norm(r) > tol) & (k < maxiter)

    def body(st):
        p, r, dp, step, k = st
        trial = p + step * dp
        J, rt = val_jac(trial)
        n0, nt = norm(r), norm(rt)
        accept = (nt < (1.0 - 1e-4 * step) * n0) | (step < 1e-4)
        accept = accept & jnp.isfinite(nt)
        newton = -jnp.linalg.solve(J, rt)
        newton = jnp.where(jnp.all(jnp.isfinite(newton)), newton, -rt)
        p = jnp.where(accept, trial, p)
        r = jnp.where(accept, rt, r)
        dp = jnp.where(accept, newton, dp)
        step = jnp.where(accept, 1.0, 0.5 * step)
        return p, r, dp, step, k + 1

    # First iteration "accepts" p0 (residual inf) and computes its Newton step.
    r0 = jnp.full_like(p0, jnp.inf)
    p, r, *_ = jax.lax.while_loop(cond, body, (p0, r0, jnp.zeros_like(p0), 1.0, 0))
    return p, norm(r)


def _root(fun, p0):
    """Root of fun (closing over differentiable parameters) with implicit-function gradients."""

    def solve(f, x0):
        p, err = _damped_newton(f, x0)
        return p, err

    def tangent_solve(g, y):
        return jnp.linalg.solve(jax.jacfwd(g)(y), y)

    return jax.lax.custom_root(fun, p0, solve, tangent_solve, has_aux=True)


# ----------------------------------------------------------------------------------------------
# Classical learning rules (independent references)
# ----------------------------------------------------------------------------------------------


def _hebb_R(alpha):
    return 1.0 / jnp.sqrt(1.0 + jnp.pi / (2.0 * alpha))


def hebb_error(alpha):
    """Hebb rule (= lam -> 0 logistic): R = (1 + pi / (2 alpha))^(-1/2) (Engel & VdB Eq. 2.9).

    Args: alpha: array-like, > 0.  Returns: eps, broadcast shape.
    """
    (alpha,) = _prepare(alpha=alpha)
    return jnp.arccos(_hebb_R(alpha)) / jnp.pi


def _hebb_guess(alpha):
    R = _hebb_R(alpha)
    x = jnp.sqrt((1.0 - R * R) / alpha)
    return jnp.stack([jnp.log(x), jnp.log(jnp.arccos(R))])


def _gibbs_scalar(alpha):
    # Engel & VdB Eq. 2.42 in v = log theta: log(R / sqrt(1-R)) = log((alpha/pi) int Dt e^{-Rt^2/2}
    # / H(-sqrt(R) t)).  The integrand is smooth on the unit scale.
    t, w = _two_feature_rule(0.0, 1.0, 0.0, 1.0)

    def fun(v):
        R = jnp.cos(jnp.exp(v[0]))
        ratio = jnp.exp(-0.5 * R * t * t) / (0.5 * erfc(-jnp.sqrt(R) * t / _SQRT2))
        rhs = alpha / jnp.pi * jnp.sum(w * jnp.exp(-0.5 * t * t) / _SQRT2PI * ratio)
        return jnp.stack([jnp.log(R) - 0.5 * jnp.log1p(-R) - jnp.log(rhs)])

    v, err = _root(fun, _hebb_guess(alpha)[1:])
    return jnp.cos(jnp.exp(v[0])), err


def gibbs_error(alpha):
    """Gibbs learning (typical version-space student, Engel & VdB Eq. 2.42); eps ~ 0.625/alpha.

    Args: alpha: array-like, > 0.  Returns: eps, broadcast shape.
    """
    (alpha,) = _prepare(alpha=alpha)
    R, _ = _vmap_flat(_gibbs_scalar, alpha)
    return jnp.arccos(R) / jnp.pi


def bayes_error(alpha):
    """Bayes-optimal (centre of mass of the version space): R_B = sqrt(R_Gibbs); eps ~ 0.442/alpha.

    Args: alpha: array-like, > 0.  Returns: eps, broadcast shape.
    """
    (alpha,) = _prepare(alpha=alpha)
    R, _ = _vmap_flat(_gibbs_scalar, alpha)
    return jnp.arccos(jnp.sqrt(R)) / jnp.pi


class MaxStabilitySolution(NamedTuple):
    """Maximal-stability perceptron: overlap R, stability kappa, eps = arccos(R)/pi."""
    R: jax.Array
    kappa: jax.Array
    eps: jax.Array
    converged: jax.Array


def _maxstab_scalar(alpha):
    def fun(p):
        theta, kappa = jnp.exp(p[0]), jnp.exp(p[1])
        R, s = jnp.cos(theta), jnp.sin(theta)
        # Integrand vanishes for t > kappa: integrate on [-T, kappa], features at 0 (scale s).
        t, w = _two_feature_rule(0.0, jnp.minimum(s, 1.0), 0.0, jnp.minimum(s, 1.0), hi=kappa)
        a = kappa - t
        IA = jnp.sum(w * jnp.exp(-0.5 * t * t) / _SQRT2PI * erfc(-R * t / (s * _SQRT2)) * a * a)
        JB = jnp.sum(w * jnp.exp(-0.5 * (t / s) ** 2) * a) / s
        return jnp.stack([jnp.log(alpha * IA) - 2.0 * jnp.log(s),
                          jnp.log(alpha * JB / jnp.pi) - jnp.log(R)])

    guess = jnp.stack([_hebb_guess(alpha)[1], jnp.log(1.0 / jnp.sqrt(alpha))])
    p, err = _root(fun, guess)
    return jnp.cos(jnp.exp(p[0])), jnp.exp(p[1]), err


def max_stability_solution(alpha):
    """Maximal-stability perceptron (lam -> inf limit of the logistic loss, paper Sec. 2.2).

    Args: alpha: array-like, > 0.
    Returns: MaxStabilitySolution(R, kappa, eps, converged), each with the broadcast shape.
    """
    (alpha,) = _prepare(alpha=alpha)
    R, kappa, err = _vmap_flat(_maxstab_scalar, alpha)
    return MaxStabilitySolution(R, kappa, jnp.arccos(R) / jnp.pi, err < _CONVERGED)


def max_stability_error(alpha):
    """eps of the maximal-stability perceptron (~0.5005/alpha at large alpha). Shape of alpha; NaN where
    the saddle point did not converge (see ``max_stability_solution(...).converged``)."""
    sol = max_stability_solution(alpha)
    return jnp.where(sol.converged, sol.eps, jnp.nan)


# ----------------------------------------------------------------------------------------------
# Logistic loss at fixed norm
# ----------------------------------------------------------------------------------------------


class LogisticSolution(NamedTuple):
    """Saddle point of Eq. 13 for V_lam: overlap R, x = beta (1 - q), log x, eps, converged."""
    R: jax.Array
    x: jax.Array
    log_x: jax.Array
    eps: jax.Array
    converged: jax.Array


def _logistic_p(lam, alpha, p0):
    """Saddle point p = (log x, log theta) and max|residual|, from the starting point p0."""
    return _root(lambda p: _teacher_residual(p, lam, alpha), p0)


def _logistic_scalar(lam, alpha):
    p, err = _logistic_p(lam, alpha, _hebb_guess(alpha))
    theta = jnp.exp(p[1])
    return LogisticSolution(jnp.cos(theta), jnp.exp(p[0]), p[0], theta / jnp.pi,
                            (err < _CONVERGED) & jnp.all(jnp.isfinite(p)))


def logistic_solution(lam, alpha):
    """Solve the saddle-point equations (A), (B) of the fixed-norm logistic perceptron.

    Args:
      lam: loss sharpness lambda > 0, array-like.
      alpha: P / N > 0, array-like; broadcast against lam.
    Returns:
      LogisticSolution(R, x, log_x, eps, converged) with the broadcast shape.  Differentiable in
      lam and alpha (implicit function theorem); jit- and vmap-able.
    """
    lam, alpha = _prepare(lam=lam, alpha=alpha)
    return _vmap_flat(_logistic_scalar, lam, alpha)


def logistic_error(lam, alpha):
    """Generalization error eps(lam, alpha) = arccos(R)/pi of the fixed-norm logistic perceptron.

    Args: lam, alpha: array-like, > 0, broadcast together.  Returns: eps with the broadcast shape; NaN
    where the saddle point did not converge (see ``logistic_solution(...).converged``).
    """
    sol = logistic_solution(lam, alpha)
    return jnp.where(sol.converged, sol.eps, jnp.nan)


def _eps_aux(loglam, alpha, p0):
    p, err = _logistic_p(jnp.exp(loglam), alpha, p0)
    return jnp.exp(p[1]) / jnp.pi, (jax.lax.stop_gradient(p), jax.lax.stop_gradient(err))


# (eps, p), d eps / d log lam; the gradient goes through custom_root (implicit function theorem).
_eps_and_slope = jax.value_and_grad(_eps_aux, has_aux=True)


def _optimal_scalar(alpha, grid, iters):
    """Scan eps on the log-lam grid, then Illinois regula falsi on g = d eps / d log lam.

    A single loop (first the G grid points, then the refinement) so the solver is traced once;
    each solve is warm-started from the previous saddle point.
    """
    G = grid.shape[0]

    def body(k, st):
        eg, gg, rg, a, b, ga, gb, side, mb, eb, rb, p = st
        # Bracket the grid minimum once the scan is complete (k == G).
        i = jnp.clip(jnp.argmin(eg), 1, G - 2)
        init = k == G
        a, b = jnp.where(init, grid[i - 1], a), jnp.where(init, grid[i + 1], b)
        ga, gb = jnp.where(init, gg[i - 1], ga), jnp.where(init, gg[i + 1], gb)
        mb, eb, rb = jnp.where(init, grid[i], mb), jnp.where(init, eg[i], eb), jnp.where(init, rg[i], rb)
        side = jnp.where(init, 0, side)
        m = jnp.where(ga * gb < 0, (a * gb - b * ga) / (gb - ga), 0.5 * (a + b))
        m = jnp.clip(m, jnp.minimum(a, b), jnp.maximum(a, b))
        scan = k < G
        m = jnp.where(scan, grid[jnp.minimum(k, G - 1)], m)
        (em, (p, rm)), gm = _eps_and_slope(m, alpha, p)
        eg = jnp.where(scan, eg.at[jnp.minimum(k, G - 1)].set(em), eg)
        gg = jnp.where(scan, gg.at[jnp.minimum(k, G - 1)].set(gm), gg)
        rg = jnp.where(scan, rg.at[jnp.minimum(k, G - 1)].set(rm), rg)
        left = ga * gm > 0  # the sign change lies in [m, b]
        a2, ga2 = jnp.where(left, m, a), jnp.where(left, gm, ga)
        b2, gb2 = jnp.where(left, b, m), jnp.where(left, gb, gm)
        # Illinois: halve the stale end-point's slope when the same side is kept twice.
        gb2 = jnp.where(left & (side == 1), 0.5 * gb2, gb2)
        ga2 = jnp.where(~left & (side == -1), 0.5 * ga2, ga2)
        better = (~scan) & (em < eb)
        keep = lambda new, old: jnp.where(scan, old, new)
        return (eg, gg, rg, keep(a2, a), keep(b2, b), keep(ga2, ga), keep(gb2, gb),
                keep(jnp.where(left, 1, -1), side), jnp.where(better, m, mb),
                jnp.where(better, em, eb), jnp.where(better, rm, rb), p)

    z = jnp.zeros(())
    init = (jnp.full((G,), jnp.inf), jnp.zeros((G,)), jnp.full((G,), jnp.inf), z, z, z, z, 0, z, jnp.inf,
            jnp.inf, _hebb_guess(alpha))
    st = jax.lax.fori_loop(0, G + iters, body, init)
    # A minimum on the edge of the grid is not bracketed, and an unconverged saddle point is not eps:
    # neither is returned as the optimum.
    i = jnp.argmin(st[0])
    ok = (i > 0) & (i < G - 1) & (st[10] < _CONVERGED)
    return jnp.where(ok, jnp.exp(st[8]), jnp.nan), jnp.where(ok, st[9], jnp.nan)


_OPT_ITERS = 12


@functools.lru_cache(maxsize=None)
def _optimal_batch_fn(num_grid, lo, hi):
    # Cached so that _vmap_flat's jit cache (keyed on the function) is reused across calls.
    def fn(alpha):
        grid = jnp.linspace(math.log(lo), math.log(hi), num_grid)
        return _optimal_scalar(alpha, grid, _OPT_ITERS)
    return fn


def optimal_lambda(alpha, lam_range=(0.01, 1000.0), num_grid=13):
    """Minimizer of eps(lam) at fixed alpha: lam_opt(alpha) and eps_opt(alpha) (paper Sec. 2.4).

    Args:
      alpha: array-like, > 0.
      lam_range: (lo, hi) searched on a log grid of num_grid points before refining with
        regula falsi on d eps / d log lam (the minimum must lie strictly inside the range).
    Returns:
      (lam_opt, eps_opt), each with the shape of alpha; NaN where the minimum is not inside
      lam_range (the grid minimum is at an end) or its saddle point did not converge.
    """
    (alpha,) = _prepare(alpha=alpha)
    return _vmap_flat(_optimal_batch_fn(num_grid, float(lam_range[0]), float(lam_range[1])), alpha)


# ----------------------------------------------------------------------------------------------
# Storage problem and margin distributions (paper App. A.2)
# ----------------------------------------------------------------------------------------------


class StorageSolution(NamedTuple):
    """Saddle point of the storage problem (random labels, R = 0): x, log x, converged."""
    x: jax.Array
    log_x: jax.Array
    converged: jax.Array


def _storage_scalar(lam, alpha):
    c = 2.0 * lam

    def fun(p):
        tk, dk = _kink(p[0], c)
        t, w = _two_feature_rule(0.0, 1.0, tk, dk)
        a = jnp.exp(_log_push(t, p[0], c))
        return jnp.stack([jnp.log(alpha * jnp.sum(w * jnp.exp(-0.5 * t * t) / _SQRT2PI * a * a))])

    # Hebb-like start: a = x gives x = alpha^(-1/2).
    p, err = _root(fun, jnp.stack([-0.5 * jnp.log(alpha)]))
    # x = exp(2 lam kappa) may overflow at large lam (lam = 1e6, alpha = 1 gives x = inf); log_x, which is
    # what the margin densities use, stays finite and is the solution.
    return StorageSolution(jnp.exp(p[0]), p[0], (err < _CONVERGED) & jnp.isfinite(p[0]))


def storage_solution(lam, alpha):
    """Storage problem saddle point 1 = alpha int Dt (Delta_0(t,x) - t)^2 (R = 0).

    Args: lam, alpha: array-like, > 0, broadcast.  Returns: StorageSolution(x, log_x, converged).
    Note: for alpha > 2 (beyond Gardner capacity) x stays finite as lam grows; below it
    x ~ exp(2 lam kappa) as for the teacher problem.
    """
    lam, alpha = _prepare(lam=lam, alpha=alpha)
    return _vmap_flat(_storage_scalar, lam, alpha)


def _log_density(D, lam, u, R, teacher):
    """log P(D) = log phi(t(D)) + log w(t(D), R) + log(1 + x V''(D)), all in log space."""
    c = 2.0 * lam
    t = D - 2.0 * jnp.exp(u - jax.nn.softplus(c * D))  # t(D) = D + x V'(D)
    log_xv2 = u + jnp.log(2.0 * c) - jax.nn.softplus(c * D) - jax.nn.softplus(-c * D)
    logp = -0.5 * t * t - 0.5 * math.log(2.0 * math.pi) + jax.nn.softplus(log_xv2)
    if teacher:
        s = jnp.sqrt(1.0 - R * R)
        logp = logp + jnp.log(erfc(-R * t / (s * _SQRT2)))
    return logp


def _margin_params(lam, alpha, teacher):
    """(log x, R) of the saddle point; NaN where it did not converge, so the densities are NaN there."""
    if teacher:
        sol = logistic_solution(lam, alpha)
        return jnp.where(sol.converged, sol.log_x, jnp.nan), sol.R
    sol = storage_solution(lam, alpha)
    return jnp.where(sol.converged, sol.log_x, jnp.nan), jnp.zeros_like(sol.log_x)


def margin_density(D, lam, alpha, teacher=True):
    """Density P(D) of the training margins of the loss minimizer (paper Eqs. 16, 17).

    Args:
      D: margins, array of any shape (evaluated for every (lam, alpha)).
      lam, alpha: scalars or arrays broadcast together (shape S).
      teacher: True for teacher labels (Eq. 16), False for the storage problem (Eq. 17).
    Returns:
      P with shape S + D.shape; NaN where the saddle point did not converge.
    """
    u, R = _margin_params(lam, alpha, teacher)
    lam = jnp.broadcast_to(jnp.asarray(lam, jnp.float64), u.shape)
    D = jnp.asarray(D, jnp.float64)
    ex = (...,) + (None,) * D.ndim
    return jnp.exp(_log_density(D, lam[ex], u[ex], R[ex], teacher))


def margin_distribution(lam, alpha, teacher=True, num=513, t_max=6.0):
    """Margin density on a grid adapted to it: D_i = Delta_0(t_i, x), t_i uniform in [-t_max, t_max].

    At large lam the density has a sharp peak at D ~ kappa (the mass of all t < kappa is squeezed
    into a width ~ 1 / lam); mapping a uniform t-grid through Delta_0 puts grid points there.

    Args:
      lam, alpha: scalars or arrays broadcast together (shape S).
      teacher: True for Eq. 16 (teacher labels), False for Eq. 17 (storage, random labels).
      num: number of grid points; t_max: range of the t grid.
    Returns:
      (D, P): arrays of shape S + (num,), D increasing; NaN where the saddle point did not converge.
    """
    u, R = _margin_params(lam, alpha, teacher)
    lam = jnp.broadcast_to(jnp.asarray(lam, jnp.float64), u.shape)[..., None]
    u, R = u[..., None], R[..., None]
    t = jnp.linspace(-t_max, t_max, num)
    D = t + jnp.exp(_log_push(t, u, 2.0 * lam))
    return D, jnp.exp(_log_density(D, lam, u, R, teacher))

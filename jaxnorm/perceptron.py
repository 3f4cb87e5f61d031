"""Gradient descent on the teacher-student perceptron (paper Sec. 2).

Two simulations of the perceptron of Sec. 2.1, both in plain JAX and vmapped over replicas:

* **free norm** (Sec. 2.3, Fig. 1): full-batch gradient descent on the classic logistic loss,
  i.e. Eq. (1) at lambda = 1, ``V_1(D) = -D + log 2cosh(D) = log(1 + exp(-2 D))``, with the
  norm of the weights left free. The norm plays the role of lambda:
  ``lambda(t) = |w(t)| / sqrt(N)`` (Sec. 2.3: ``V_1(lambda D) = lambda V_lambda(D)``, so the
  direction of ``w(t)`` sees the fixed-norm loss at ``lambda = lambda(t)``).
* **fixed norm** (Sec. 2.1): the minimizer of ``L_lambda`` of Eq. (1) on the sphere ``|w|^2 = N``
  at a given lambda, by a Riemannian Newton method with lambda continuation, stopped at a stated
  tolerance and flagged (or, in ``simulate_fixed_norm``, refused) when it does not get there; its
  large-N limit is the replica prediction ``jaxnorm.theory.logistic_error(lam, alpha)`` (App. A.1).

Conventions. Inputs ``x`` are Rademacher, ``x in {-1, +1}^N``; the teacher ``w*`` is a
uniformly random direction scaled to ``|w*|^2 = N``; labels ``y = sign(w* . x)`` (an exact
tie has probability zero for a Gaussian teacher; it is labelled +1). ``P = round(alpha N)``.
Internally the weights are carried as ``u = w / sqrt(N)`` so that the margins are
``Delta = y x . w / sqrt(N) = z . u`` with ``z = y x`` and the norm is ``lambda = |u|``.
The generalization error is ``eps = arccos(R) / pi`` with ``R = w . w* / (|w| |w*|)``.

Learning rate. Both simulations descend the *mean* loss ``L / P``. In the ``u`` coordinates
its Hessian is ``(1/P) sum_mu V''(Delta_mu) z_mu z_mu^T``, whose top eigenvalue is at most
``max V'' * (1 + 1/sqrt(alpha))^2`` (Marchenko-Pastur edge of ``Z^T Z / P``; ``V_1'' <= 1``),
independent of N. A learning rate ``lr`` in ``u`` is therefore O(1); in the original weights
the same update reads ``w <- w - lr * N * grad_w (L / P)``, i.e. the O(1) rate times N.
The default is half the stability bound at the start of training: ``1 / (1 + 1/sqrt(alpha))^2``.

Randomness. The data of replica (P, seed) come from
``fold_in(fold_in(key, P), seed)``, and pattern ``mu`` from ``fold_in(., mu)``, so a replica
can be rerun alone, or inside a padded multi-alpha batch, with identical numbers.

Performance. A GD step is two matrix-vector products with the P x N patterns, so on CPU it is
memory-bound: vmapping many large replicas spills them out of cache (8 seeds at N = 1000, P = 5000
ran ~3x slower vmapped than one after another). ``simulate_free_norm`` therefore maps cache-sized
vmapped chunks of replicas inside its one compiled call on CPU (``replica_batch="auto"``) and
vmaps all replicas at once on accelerators. The step loop is a ``lax.scan`` over the recording
points with ``fori_loop``s of ``unroll`` Python-unrolled steps inside (fewer loop round trips).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "TeacherData",
    "FreeNormRun",
    "FixedNormRun",
    "NotConvergedError",
    "make_teacher_data",
    "replica_key",
    "default_lr",
    "default_replica_batch",
    "log_spaced_steps",
    "free_norm_trajectory",
    "fixed_norm_minimizer",
    "simulate_free_norm",
    "simulate_fixed_norm",
    "hebb_error_closed_form",
    "num_patterns",
]

_F32 = jnp.float32


# ----------------------------------------------------------------------------- validation


def _check_positive(name: str, value, *, integer: bool = False):
    """Raises a ValueError naming the bad value unless it is a finite number > 0."""
    try:
        ok = np.all(np.isfinite(np.asarray(value, dtype=float))) and np.all(np.asarray(value) > 0)
    except (TypeError, ValueError):
        ok = False
    kind = "an integer >= 1" if integer else "a finite number > 0"
    if not ok:
        raise ValueError(f"{name} must be {kind}; got {value!r}")
    if integer and (np.asarray(value).dtype.kind not in "iu"):
        if not np.all(np.asarray(value) == np.round(np.asarray(value, dtype=float))):
            raise ValueError(f"{name} must be {kind}; got {value!r}")


def num_patterns(alpha: float, n: int) -> int:
    """Number of training patterns ``P = round(alpha * N)`` (at least 1).

    Args:
      alpha: load ``P / N``, > 0.
      n: input dimension N, >= 1.
    Returns:
      P as a Python int.
    """
    _check_positive("alpha", alpha)
    _check_positive("n", n, integer=True)
    p = int(round(float(alpha) * int(n)))
    if p < 1:
        raise ValueError(f"alpha * n must give at least one pattern; got alpha={alpha!r}, n={n!r}")
    return p


def default_lr(alpha):
    """Default O(1) learning rate for the mean logistic loss in ``u = w / sqrt(N)`` units.

    Half the gradient-descent stability bound ``2 / lambda_max(Hessian)`` at ``Delta = 0``,
    where ``V_1'' = 1`` and ``lambda_max(Z^T Z / P) -> (1 + 1/sqrt(alpha))^2``.

    Args:
      alpha: load ``P / N`` (scalar or array), > 0.
    Returns:
      ``1 / (1 + 1/sqrt(alpha))^2``, same shape as ``alpha``.
    """
    alpha = np.asarray(alpha, dtype=float)
    return 1.0 / (1.0 + 1.0 / np.sqrt(alpha)) ** 2


def hebb_error_closed_form(alpha):
    """Generalization error of the Hebb rule, ``arccos(sqrt(2 alpha / (2 alpha + pi))) / pi``.

    Engel & Van den Broeck (2001), Sec. 3.1; this is the ``lambda -> 0`` end of Fig. 1, used by the
    tests as a reference independent of ``jaxnorm.theory``.
    """
    alpha = np.asarray(alpha, dtype=float)
    return np.arccos(np.sqrt(2 * alpha / (2 * alpha + np.pi))) / np.pi


def log_spaced_steps(steps: int, num: int = 200) -> np.ndarray:
    """Distinct integers ``1 <= t <= steps``, roughly log-spaced, always ending at ``steps``.

    Args:
      steps: total number of gradient steps, >= 1.
      num: target number of points (fewer come back when ``steps`` is small).
    Returns:
      int64 array [K], strictly increasing.
    """
    _check_positive("steps", steps, integer=True)
    _check_positive("num", num, integer=True)
    t = np.unique(np.round(np.logspace(0, np.log10(steps), int(num))).astype(np.int64))
    t = t[(t >= 1) & (t <= steps)]
    if t[-1] != steps:
        t = np.append(t, steps)
    return t


# ----------------------------------------------------------------------------- data


class TeacherData(NamedTuple):
    """One teacher-student data set, padded to ``P_max`` patterns.

    Attributes:
      w_star: [N] teacher, ``|w*|^2 = N``.
      x: [P_max, N] Rademacher inputs (float32).
      y: [P_max] labels ``sign(w* . x)`` in {-1, +1} (float32).
      mask: [P_max] float32, 1 for the first P (real) patterns and 0 for padding.
    """

    w_star: jax.Array
    x: jax.Array
    y: jax.Array
    mask: jax.Array


def replica_key(key: jax.Array, p, seed) -> jax.Array:
    """Key of the data of replica (P, seed): ``fold_in(fold_in(key, P), seed)``."""
    return jax.random.fold_in(jax.random.fold_in(key, p), seed)


def make_teacher_data(key: jax.Array, n: int, p, p_max: int | None = None, *,
                      random_labels: bool = False) -> TeacherData:
    """Samples a teacher and ``P`` labelled Rademacher patterns (paper Sec. 2.1).

    With ``random_labels=True`` the labels are independent fair coins instead (the storage
    problem of paper App. A.2, Fig. 6 left); ``w_star`` is still returned but is unrelated.

    Pattern ``mu`` is drawn from ``fold_in(k_x, mu)``, so the first P rows do not depend on
    ``p_max`` (padding does not change a replica). Pure and jit/vmap-able in ``key`` and ``p``.

    Args:
      key: PRNG key of this replica (see ``replica_key``).
      n: input dimension N (static).
      p: number of real patterns P; may be traced when ``p_max`` is given.
      p_max: static padded length (defaults to ``p``, which must then be a Python int).
      random_labels: storage problem (labels independent of the teacher).
    Returns:
      ``TeacherData`` with shapes w_star [N], x [P_max, N], y [P_max], mask [P_max].
    """
    if p_max is None:
        p_max = int(p)
    k_teacher, k_x = jax.random.split(key)
    g = jax.random.normal(k_teacher, (n,), dtype=_F32)
    w_star = g * (jnp.sqrt(jnp.asarray(n, _F32)) / jnp.linalg.norm(g))
    x = jax.vmap(lambda mu: jax.random.rademacher(jax.random.fold_in(k_x, mu), (n,), dtype=_F32))(
        jnp.arange(p_max))
    # Ties (w* . x == 0) have probability zero for a continuous teacher; label them +1.
    y = jnp.where(x @ w_star >= 0, 1.0, -1.0).astype(_F32)
    if random_labels:
        k_y = jax.random.fold_in(k_teacher, 1)  # independent of the teacher and the inputs
        y = jax.vmap(lambda mu: jax.random.rademacher(jax.random.fold_in(k_y, mu), (), dtype=_F32))(
            jnp.arange(p_max))
    mask = (jnp.arange(p_max) < p).astype(_F32)
    return TeacherData(w_star=w_star, x=x, y=y, mask=mask)


# ----------------------------------------------------------------------------- losses


def _v1(d):
    """Logistic loss at lambda = 1 (Eq. 1): ``-d + log 2cosh d = log(1 + exp(-2 d))``."""
    return jnp.logaddexp(0.0, -2.0 * d)


def _v1_prime(d):
    """``V_1'(d) = -1 + tanh(d) = -2 sigmoid(-2 d)``; note ``V_lambda'(D) = V_1'(lambda D)``."""
    return -2.0 * jax.nn.sigmoid(-2.0 * d)


def _observables(u, data: TeacherData, z, lam_loss=1.0):
    """(lambda, eps, mean loss) of ``u = w / sqrt(N)``; eps = arccos(R)/pi (Sec. 2.1)."""
    norm = jnp.linalg.norm(u)
    r = jnp.dot(u, data.w_star) / (norm * jnp.linalg.norm(data.w_star))
    eps = jnp.arccos(jnp.clip(r, -1.0, 1.0)) / jnp.pi
    p = jnp.sum(data.mask)
    loss = jnp.sum(data.mask * _v1(lam_loss * (z @ u))) / (lam_loss * p)
    return norm, eps, loss


# ----------------------------------------------------------------------------- free norm


def free_norm_trajectory(data: TeacherData, record_steps: np.ndarray, lr, *, u0=None,
                         unroll: int = 16):
    """Full-batch GD on the mean logistic loss (lambda = 1) with free norm; one replica.

    Update (``u = w / sqrt(N)``): ``u <- u - lr * (1/P) sum_mu V_1'(z_mu . u) z_mu``, i.e.
    ``w <- w - lr * N * grad_w (L_1(w) / P)``. Starting from ``u0 = 0`` (default) the first step
    is the Hebb rule, so the trajectory starts at the ``lambda -> 0`` end of Fig. 1.

    Args:
      data: ``TeacherData`` (x [P_max, N], ...).
      record_steps: static int array [K], strictly increasing, >= 1: steps after which the
        observables are recorded (e.g. ``log_spaced_steps``).
      lr: O(1) learning rate (scalar, may be traced).
      u0: optional [N] start in ``u`` units (default zeros).
      unroll: GD steps per loop iteration (Python-unrolled; fewer loop round trips on CPU).
    Returns:
      dict with ``lam`` [K] (``|w| / sqrt(N)``), ``eps`` [K], ``loss`` [K] (mean ``V_1``) and
      ``u`` [N] (final weights / sqrt(N)).
    """
    record_steps = np.asarray(record_steps, dtype=np.int64)
    segments = np.diff(np.concatenate([[0], record_steps])).astype(np.int32)
    z = data.x * data.y[:, None]
    weights = data.mask / jnp.sum(data.mask)
    u = jnp.zeros(data.x.shape[1], _F32) if u0 is None else jnp.asarray(u0, _F32)
    lr = jnp.asarray(lr, _F32)

    def step(u):
        return u - lr * ((weights * _v1_prime(z @ u)) @ z)

    def chunk(_, u):
        for _ in range(unroll):
            u = step(u)
        return u

    def segment(u, n_k):
        u = jax.lax.fori_loop(0, n_k // unroll, chunk, u)
        u = jax.lax.fori_loop(0, n_k % unroll, lambda _, u: step(u), u)
        lam, eps, loss = _observables(u, data, z)
        return u, (lam, eps, loss)

    u, (lam, eps, loss) = jax.lax.scan(segment, u, jnp.asarray(segments))
    return {"lam": lam, "eps": eps, "loss": loss, "u": u}


@functools.partial(jax.jit, static_argnames=("n", "p_max", "record", "unroll", "batch"))
def _free_norm_batch(key, ps, seeds, lrs, *, n, p_max, record, unroll, batch):
    """[A] x [S] free-norm trajectories; compiled once per static configuration.

    The (alpha, seed) pairs are flattened to one replica axis R = A * S and mapped with
    ``lax.map(..., batch_size=batch)``: ``batch = R`` is a plain ``vmap`` over all replicas (best on
    accelerators); a smaller batch runs chunks of ``batch`` vmapped replicas one after another,
    which keeps the working set of a memory-bound CPU run in cache.
    """

    def one(args):
        p, seed, lr_a = args
        data = make_teacher_data(replica_key(key, p, seed), n, p, p_max)
        out = free_norm_trajectory(data, np.asarray(record), lr_a, unroll=unroll)
        return out["lam"], out["eps"], out["loss"]

    a, s = ps.shape[0], seeds.shape[0]
    flat = (jnp.repeat(ps, s), jnp.tile(seeds, a), jnp.repeat(lrs, s))
    if batch >= a * s:
        out = jax.vmap(one)(flat)
    else:
        out = jax.lax.map(one, flat, batch_size=batch)
    return tuple(o.reshape(a, s, -1) for o in out)


def default_replica_batch(n: int, p_max: int, backend: str | None = None) -> int | None:
    """Replicas per vmapped chunk: all of them (None) on GPU/TPU; on CPU as many as keep the
    float32 patterns (``4 * P_max * N`` bytes each) within ~16 MB, since CPU GD is memory-bound
    (measured: 8 seeds vmapped at N = 1000, P = 5000 ran ~2x slower than one at a time)."""
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return None
    return max(1, int(16e6 // (4 * p_max * n)))


class FreeNormRun(NamedTuple):
    """Free-norm GD trajectories for A alphas x S seeds at K recorded steps.

    Attributes:
      alphas: [A]; p: [A] int patterns per alpha; lr: [A] learning rates; steps: [K] int.
      lam: [A, S, K] ``|w(t)| / sqrt(N)``; eps: [A, S, K]; loss: [A, S, K] mean ``V_1``.
      n: N.
    """

    alphas: np.ndarray
    p: np.ndarray
    lr: np.ndarray
    steps: np.ndarray
    lam: np.ndarray
    eps: np.ndarray
    loss: np.ndarray
    n: int


def simulate_free_norm(key: jax.Array, n: int, alphas: Sequence[float] | float, *, n_seeds: int = 4,
                       steps: int = 1_000_000, lr=None, n_record: int = 200,
                       unroll: int = 16, replica_batch: int | None | str = "auto") -> FreeNormRun:
    """Free-norm GD for every (alpha, seed) pair in one compiled call, vmapped over replicas.

    Different alphas have different P; every data set is padded to ``P_max`` with a mask.

    Args:
      key: base PRNG key; replica (P, seed) uses ``replica_key(key, P, seed)``.
      n: input dimension N >= 1.
      alphas: one load or a sequence of loads ``P / N`` > 0.
      n_seeds: seeds per alpha, >= 1 (seeds 0 .. n_seeds-1).
      steps: GD steps, >= 1.
      lr: O(1) learning rate(s), scalar or one per alpha; default ``default_lr(alpha)``.
      n_record: number of log-spaced recording points.
      unroll: steps per loop iteration.
      replica_batch: replicas vmapped together: None = all (A * S) at once; an int = chunks of
        that many, run one after another inside the same compiled call; "auto" =
        ``default_replica_batch`` (all on accelerators, cache-sized chunks on CPU).
    Returns:
      ``FreeNormRun`` (numpy arrays).
    """
    _check_positive("n", n, integer=True)
    _check_positive("n_seeds", n_seeds, integer=True)
    _check_positive("steps", steps, integer=True)
    _check_positive("unroll", unroll, integer=True)
    alphas = np.atleast_1d(np.asarray(alphas, dtype=float))
    _check_positive("alphas", alphas)
    ps = np.array([num_patterns(a, n) for a in alphas], dtype=np.int32)
    lrs = default_lr(alphas) if lr is None else np.broadcast_to(np.asarray(lr, float), alphas.shape)
    _check_positive("lr", lrs)
    record = log_spaced_steps(int(steps), n_record)
    n_rep = len(alphas) * int(n_seeds)
    if isinstance(replica_batch, str):
        if replica_batch != "auto":
            raise ValueError(f"replica_batch must be None, an integer >= 1 or 'auto'; got {replica_batch!r}")
        replica_batch = default_replica_batch(int(n), int(ps.max()))
    if replica_batch is None:
        replica_batch = n_rep
    _check_positive("replica_batch", replica_batch, integer=True)
    lam, eps, loss = _free_norm_batch(key, jnp.asarray(ps), jnp.arange(int(n_seeds)),
                                      jnp.asarray(lrs, _F32), n=int(n), p_max=int(ps.max()),
                                      record=tuple(int(t) for t in record), unroll=int(unroll),
                                      batch=min(int(replica_batch), n_rep))
    return FreeNormRun(alphas=alphas, p=ps, lr=np.asarray(lrs), steps=record, lam=np.asarray(lam),
                       eps=np.asarray(eps), loss=np.asarray(loss), n=int(n))


# ----------------------------------------------------------------------------- fixed norm


class NotConvergedError(RuntimeError):
    """An iterative solver stopped before its stated tolerance; the message gives where and how far."""


def _log_softplus(t):
    """``log(log(1 + e^t))`` without underflow: for t < -15, ``log1p(e^t) = e^t (1 - e^t/2 + ...)``, so the
    result is t to float32 precision (e^-15 / 2 ~ 2e-7)."""
    return jnp.where(t < -15.0, t, jnp.log(jax.nn.softplus(jnp.maximum(t, -15.0))))


def _dot(a, b):
    # Full float32 products: accelerators may otherwise use reduced-precision (e.g. TF32) matmuls, whose
    # ~1e-3 relative error would put the gradient's round-off floor above the stopping tolerance.
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def fixed_norm_minimizer(data: TeacherData, lam, *, tol: float = 1e-4, max_iter: int = 100, u0=None):
    """Minimizer of ``L_lambda`` (Eq. 1) on the sphere ``|w|^2 = N``, to a stated tolerance; one replica.

    Riemannian Newton method with backtracking, in ``u = w / sqrt(N)`` (unit sphere). With
    ``f(u) = (1 / (lambda P)) sum_mu V_1(lambda z_mu . u)`` (the mean ``L_lambda``; ``V_lambda(D) =
    V_1(lambda D) / lambda``), Euclidean gradient ``g`` and Hessian ``H``, the step ``d`` solves, in the
    tangent space, ``(P_u H P_u - (u . g) P_u) d = -P_u g`` (the Riemannian Hessian of the sphere,
    Absil, Mahony & Sepulchre 2008, Sec. 5.5; ``-(u . g) > 0`` at the minimizer, since the loss
    decreases along ``u``), then ``u <- normalize(u + t d)`` with t halved until the Armijo condition
    holds for ``log f``. ``g``, ``H`` and ``f`` are all formed relative to ``f`` (log-sum-exp shifts), so
    the iteration is as well scaled at lambda = 100 (``f ~ 1e-40``) as at lambda = 1. Large lambda
    (a near-hard-margin problem, with a ``exp(-2 lambda kappa)``-sharp loss) is reached by continuation:
    lambda starts at ``min(lambda, 1)`` and grows 4x each time the relative gradient falls below 1e-2,
    so every stage starts inside Newton's fast region. The loss is convex and, on separable data, has no
    stationary point inside the ball, so the sphere minimizer is the (unique for alpha > 1) minimizer
    over the ball. Starts from the Hebb direction (the ``lambda -> 0`` minimizer) unless ``u0`` is given.

    Cost per iteration: ``P N^2 + N^3 / 3`` (Hessian, Cholesky) for P >= N; for P < N the same step by
    Woodbury in the P-dimensional dual, ``P^2 N + P^3 / 3``. 10-25 iterations in the validated cases (tests/test_perceptron.py: N = 200-1000, lambda = 1e-3-100, teacher and random
    labels; the result agrees with an independent float64 L-BFGS to 1e-6 in the margins).

    Args:
      data: ``TeacherData``.
      lam: loss sharpness lambda > 0 (scalar, may be traced).
      tol: stop when ``grad_norm`` <= tol. The float32 round-off floor of ``grad_norm`` is ~1e-5
        at lambda ~ 1 and ~8e-5 at lambda = 100 with jax 0.10, hence the default 1e-4; with jax 0.12 one
        storage problem (N = 500, P = 200, lambda = 2) stalled at 1.4e-4: pass a larger tol there (it
        is then reported as not converged, never silently).
      max_iter: Newton iterations at most (static; counts the continuation stages' iterations too).
      u0: optional [N] start (normalized internally).
    Returns:
      dict with ``u`` [N] (unit norm), ``eps``, ``R``, ``grad_norm`` (``|g_tangent| / |u . g|``, the
      scale-free stationarity measure: 0 at the exact minimizer), ``iters`` and ``converged``
      (``grad_norm <= tol`` at the requested lambda; False when ``max_iter`` ran out or the line search
      could not decrease the loss: the answer is then NOT the minimizer).
    """
    z = data.x * data.y[:, None]
    p_max, n = z.shape
    mask = data.mask > 0
    lam_t = jnp.asarray(lam, _F32)
    eye = jnp.eye(n, dtype=_F32) if n <= p_max else None

    def parts(u, lam):
        """(log f + const, g / f, per-pattern weights sigma(-2x) / sum softplus, x = lam * margins)."""
        x = lam * _dot(z, u)
        t = -2.0 * x
        lse = jax.nn.logsumexp(jnp.where(mask, _log_softplus(t), -jnp.inf))  # log(lam P f)
        w = jnp.where(mask, jnp.exp(jax.nn.log_sigmoid(t) - lse), 0.0)
        return lse, -2.0 * lam * _dot(w, z), w, x

    def direction(u, g, w, x, lam):
        h = 4.0 * lam * lam * w * jax.nn.sigmoid(2.0 * x)  # V_1''(x) lam^2 / f, per pattern: H = Z^T diag(h) Z
        ug = jnp.dot(u, g)
        gt = g - ug * u
        # -(u.g) P_u is the sphere's curvature term; clipped at 0 (it can be negative far from the
        # minimizer, e.g. at a Hebb start with many negative margins) plus a tiny ridge, so that the
        # system is positive definite and d a descent direction.
        shift = jnp.maximum(-ug, 0.0) + 1e-6 * (jnp.sum(h * jnp.sum(z * z, axis=1)) / n + jnp.abs(ug))
        if n <= p_max:  # primal: the N x N system (P_u H P_u + shift P_u + u u^T) d = -g_t
            H = _dot((z * h[:, None]).T, z)
            Hu = _dot(H, u)
            Hp = H - jnp.outer(Hu, u) - jnp.outer(u, Hu) + jnp.dot(u, Hu) * jnp.outer(u, u)  # P_u H P_u
            A = Hp + shift * (eye - jnp.outer(u, u)) + jnp.outer(u, u)  # the u u^T block fixes u . d = 0
            rhs = gt
        else:  # dual (P < N): with C = diag(sqrt h) Z P_u, (shift I + C^T C)^-1 by Woodbury, a P x P system
            C = jnp.sqrt(h)[:, None] * (z - _dot(z, u)[:, None] * u[None, :])
            A = _dot(C, C.T) + shift * jnp.eye(p_max, dtype=_F32)
            rhs = _dot(C, gt)
        # Cholesky (7x faster on CPU than solve(assume_a="pos") at N = 1000); NaN if A is not PD -> fallback.
        y = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(A), rhs)
        d = -y if n <= p_max else -(gt - _dot(C.T, y)) / shift
        d = jnp.where(jnp.all(jnp.isfinite(d)), d, -gt / (jnp.abs(ug) + 1e-30))
        return d - jnp.dot(d, u) * u

    def rel(g, u):
        ug = jnp.dot(u, g)
        return jnp.linalg.norm(g - ug * u) / jnp.abs(ug)

    def retract(u, d, t):
        v = u + t * d
        return v / jnp.linalg.norm(v)

    def cond(st):
        u, F, g, w, x, k, r, stalled, lam = st
        return ((r > tol) | (lam < lam_t)) & (k < max_iter) & ~stalled

    def body(st):
        u, F, g, w, x, k, r, stalled, lam = st
        d = direction(u, g, w, x, lam)
        slope = jnp.dot(g, d)  # directional derivative of log f
        # Armijo on log f, with a float32 round-off allowance of a few ulps of |log f|.
        slack = 4 * jnp.finfo(_F32).eps * jnp.abs(F)

        def ls_cond(c):
            t, Ft, j = c
            return (Ft > F + 1e-4 * t * slope + slack) & (j < 30)

        def ls_body(c):
            t, _, j = c
            return 0.5 * t, parts(retract(u, d, 0.5 * t), lam)[0], j + 1

        t, _, j = jax.lax.while_loop(ls_cond, ls_body, (1.0, parts(retract(u, d, 1.0), lam)[0], 0))
        ok = j < 30
        u = jnp.where(ok, retract(u, d, t), u)
        g = parts(u, lam)[1]
        nxt = (lam < lam_t) & (rel(g, u) < 1e-2)  # continuation: on to a 4x sharper loss
        lam = jnp.where(nxt, jnp.minimum(4.0 * lam, lam_t), lam)
        F, g, w, x = parts(u, lam)
        return u, F, g, w, x, k + 1, rel(g, u), ~ok & ~nxt, lam

    u = (data.mask / jnp.sum(data.mask)) @ z if u0 is None else jnp.asarray(u0, _F32)  # Hebb: sum_mu z_mu / P
    u = u / jnp.linalg.norm(u)
    lam0 = jnp.minimum(lam_t, 1.0)
    F, g, w, x = parts(u, lam0)
    u, F, g, w, x, k, r, stalled, lam = jax.lax.while_loop(
        cond, body, (u, F, g, w, x, jnp.int32(0), rel(g, u), jnp.bool_(False), lam0))
    R = jnp.dot(u, data.w_star) / jnp.linalg.norm(data.w_star)
    eps = jnp.arccos(jnp.clip(R, -1.0, 1.0)) / jnp.pi
    return {"u": u, "eps": eps, "R": R, "grad_norm": r, "iters": k,
            "converged": (r <= tol) & (lam >= lam_t) & jnp.isfinite(r)}


class FixedNormRun(NamedTuple):
    """Fixed-norm minimizers for L lambdas x S seeds at one alpha.

    Attributes:
      alpha: load; p: patterns; n: N; lams: [L].
      eps: [L, S]; R: [L, S]; grad_norm: [L, S] final relative tangent-gradient norms.
      margins: [L, S, P] training margins ``Delta_mu = y x_mu . w / sqrt(N)`` of the minimizers
        (compare with ``theory.margin_distribution``, paper Eqs. 16-17).
      random_labels: whether this is the storage problem.
      converged: bool [L, S], ``grad_norm <= tol`` (see ``fixed_norm_minimizer``); iters: int [L, S].
    """

    alpha: float
    p: int
    n: int
    lams: np.ndarray
    eps: np.ndarray
    R: np.ndarray
    grad_norm: np.ndarray
    margins: np.ndarray
    random_labels: bool
    converged: np.ndarray
    iters: np.ndarray


def simulate_fixed_norm(key: jax.Array, n: int, alpha: float, lams: Sequence[float] | float, *,
                        n_seeds: int = 4, tol: float = 1e-4, max_iter: int = 100,
                        random_labels: bool = False, check: bool = True) -> FixedNormRun:
    """Fixed-norm minimizers of ``L_lambda`` for every (lambda, seed), one compiled vmapped call.

    Seed ``s`` uses the same data as seed ``s`` of ``simulate_free_norm`` at the same (N, P).

    Args:
      key: base PRNG key.
      n: N >= 1.
      alpha: load > 0.
      lams: lambda values > 0, [L].
      n_seeds: seeds, >= 1.
      tol: stationarity tolerance of ``fixed_norm_minimizer`` (relative tangent gradient), > 0.
      max_iter: Newton iterations at most, >= 1.
      random_labels: storage problem (random labels, paper App. A.2) instead of the teacher.
      check: raise when a minimizer did not converge (else only flag it in ``converged``).
    Returns:
      ``FixedNormRun`` (numpy arrays).
    Raises:
      ValueError: a bad argument.
      NotConvergedError: ``check`` and some (lambda, seed) stopped above ``tol`` (named in the message).
    """
    _check_positive("n", n, integer=True)
    _check_positive("alpha", alpha)
    _check_positive("n_seeds", n_seeds, integer=True)
    _check_positive("tol", tol)
    _check_positive("max_iter", max_iter, integer=True)
    lams = np.atleast_1d(np.asarray(lams, dtype=float))
    _check_positive("lam", lams)
    n, p = int(n), num_patterns(alpha, n)

    eps, r, gn, margins, conv, iters = _fixed_norm_batch(
        key, jnp.arange(int(n_seeds)), jnp.asarray(lams, _F32), n=n, p=p, tol=float(tol),
        max_iter=int(max_iter), random_labels=bool(random_labels))
    # vmap over seeds is the outer axis: [S, L, ...] -> [L, S, ...]
    run = FixedNormRun(alpha=float(alpha), p=p, n=n, lams=lams, eps=np.asarray(eps).T,
                       R=np.asarray(r).T, grad_norm=np.asarray(gn).T,
                       margins=np.swapaxes(np.asarray(margins), 0, 1),
                       random_labels=bool(random_labels), converged=np.asarray(conv).T,
                       iters=np.asarray(iters).T)
    if check and not run.converged.all():
        bad = [(float(lams[i]), int(s), float(run.grad_norm[i, s]), int(run.iters[i, s]))
               for i, s in zip(*np.nonzero(~run.converged))]
        raise NotConvergedError(
            f"fixed-norm minimizer (N={n}, P={p}) did not reach grad_norm <= {tol:g} for (lam, seed, grad_norm, "
            f"iterations) {bad[:5]}{' ...' if len(bad) > 5 else ''}; raise max_iter (now {max_iter}) or tol")
    return run


@functools.partial(jax.jit, static_argnames=("n", "p", "tol", "max_iter", "random_labels"))
def _fixed_norm_batch(key, seeds, lams, *, n, p, tol, max_iter, random_labels):
    """[S] x [L] fixed-norm minimizers; compiled once per static configuration."""

    def one_seed(seed):
        data = make_teacher_data(replica_key(key, p, seed), n, p, random_labels=random_labels)
        z = data.x * data.y[:, None]
        sol = jax.vmap(lambda lam: fixed_norm_minimizer(data, lam, tol=tol, max_iter=max_iter))(lams)
        return sol["eps"], sol["R"], sol["grad_norm"], sol["u"] @ z.T, sol["converged"], sol["iters"]

    return jax.vmap(one_seed)(seeds)

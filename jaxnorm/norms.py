"""Spectral complexity R_A of a network (paper Eq. 2; Bartlett, Foster & Telgarsky 2017).

    R_A = (prod_i rho_i ||A_i||_sigma) * (sum_i ||A_i^T - M_i^T||_{2,1}^{2/3} / ||A_i||_sigma^{2/3})^{3/2}

The model describes its linear operators with a :class:`jaxnorm.layout.LinearLayer` tuple; this module reads
the weights at ``layer.path`` and nothing else.

Conventions (decided here, used everywhere below)
-------------------------------------------------
* **Orientation.** ``A`` maps a layer's input to its output, ``y = A x``, so ``A`` has one *row per output
  unit* and one *column per input unit*. A Flax dense kernel ``K`` (``x @ K``) is ``A = K^T``.
* **The operator is the layer's action on one whole example.** For a conv, ``A`` is the zero-padded,
  strided convolution acting on the flattened ``(H, W, C_in)`` input (not the reshaped kernel matrix).
  For a dense layer applied per token (``input_shape = (T, d_in)``), ``A = K^T (x) I_T`` acting on the whole
  token sequence -- the same convention as a conv, so a 1x1 conv and a per-token dense give identical
  numbers. ``||K^T (x) I_T||_sigma = ||K||_sigma``; only the ``"bartlett"`` (2,1) sum gains the factor T.
* **(2,1) norm.** ``definition=`` picks one of ``DEFINITIONS``; each is computed exactly:

  - ``"paper"`` (default for sweeps): the paper's text defines ``||B||_{2,1}`` as the *average* of the
    l2 norms of the columns of ``B``. Eq. 2 applies it to ``B = A^T - M^T``, whose columns are the rows of
    ``A - M``: **mean over output units of the l2 norm of each output unit's row of A - M**.
  - ``"bartlett"``: Bartlett et al.'s ``||B||_{2,1}`` = *sum* of the column l2 norms of ``B``, i.e. **sum
    over output units of the row norms of A - M** (= ``"paper"`` times the number of output units of the
    whole operator, ``T * d_out`` or ``H_out * W_out * C_out``).
  - ``"paper_input"``: the other reading of the paper's sentence (average over the columns of ``A - M``
    itself): **mean over input units of the column norms of A - M**. Offered for comparison only.

* **Reference matrices M_i.** ``M_i = 0`` unless ``layer.residual`` and the operator is square (output shape
  equal to input shape): dense with ``d_in == d_out``; conv with stride 1, ``C_in == C_out`` and a padding
  that keeps ``H, W`` (then the identity is the kernel with ``I`` at the tap that maps output ``p`` to input
  ``p``, i.e. tap ``pad_lo``; ``A - I`` is the conv with that centre tap reduced by ``I``, exact for zero
  padding); diag always. A residual layer that is not square keeps ``M = 0``. ``M`` enters only the (2,1)
  term: the spectral factor is ``||A_i||_sigma`` as in Eq. 2.
* **Lipschitz constants rho_i** are ``layer.lipschitz`` from the layout, used as given. ReLU: 1 (exact).
  GELU: its exact Lipschitz constant is max_x d/dx[x Phi(x)] = 1.1289 (at x = sqrt 2); a layout that
  stores 1 for GELU uses the common approximation. Softmax attention is not globally Lipschitz; what the
  layout stores for it is an approximation chosen by ``jaxnorm.models``.
* **Normalization layers** (``kind="diag"``): ``norm_layers="exclude"`` (default) drops them, as Eq. 2 is
  stated for the weight matrices of the network and LayerNorm is not a linear map (its ``1/std`` factor
  depends on the input). ``norm_layers="include"`` counts each scale as the diagonal operator
  ``diag(s) (x) I``, with ``s = scale`` (LayerNorm) or ``s = scale / sqrt(running_var + eps)`` (BatchNorm at
  inference, the linear part of its eval-mode map). Biases are never included.

Computation
-----------
* Dense: ``dense_method="svd"`` (exact, default) takes the largest singular value of the ``(d_in, d_out)``
  kernel matrix; ``"power"`` uses warm-started power iteration like convs.
* Conv: power iteration on ``A^T A`` through the real convolution (Flax's NHWC/HWIO layout and zero
  padding, computed as strided slices + a matmul, which vmaps over replicas into a batched matmul) and its exact transpose (``jax.linear_transpose``), warm-started from the
  previous evaluation's right singular vector kept in a state pytree (:func:`init_norm_state`). Each
  iteration estimates ``sigma = ||A^T A v|| / ||A v||`` (a lower bound, tighter than ``||A v||``); the loop
  runs at least ``min_iters`` and stops when the relative change of the estimate falls below ``tol``
  (or at ``max_iters``). Without a state (``state=None``) it cold-starts from a fixed random vector.
* Conv (2,1) norms exactly: squared row norms of the unrolled matrix = ``conv(ones(H, W, C_in), K*K)``
  (each output sums the squared taps that land inside the padded input); squared column norms = the
  transposed conv of ``K*K`` applied to ``ones(H_out, W_out, C_out)``.
* All functions are pure, jit-able and vmappable over a leading replica axis (see
  :func:`spectral_complexity_fn`); no host round trip.
* The product of spectral norms is formed in log space so that deep nets do not overflow float32
  (``log=True`` returns ``log R_A``). A layer with ``||A||_sigma = 0`` contributes 0 to the sum (the limit of
  the scale-invariant ratio is irrelevant since the product is then 0), so ``R_A = 0``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm.layout import Layout, LinearLayer, get_path

DEFINITIONS = ("paper", "bartlett", "paper_input")
NORM_LAYERS = ("exclude", "include")
DENSE_METHODS = ("svd", "power")

_DN = ("NHWC", "HWIO", "NHWC")
_HI = lax.Precision.HIGHEST  # norms are logged quantities: no TF32/bf16 passes on GPUs


# ----------------------------------------------------------------------------------------------
# Validation and small helpers
# ----------------------------------------------------------------------------------------------


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; allowed: {tuple(allowed)}")


def _pair(x: Any, what: str) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    t = tuple(int(v) for v in x)
    if len(t) != 2:
        raise ValueError(f"{what}={x!r}; expected an int or a pair of ints")
    return t  # type: ignore[return-value]


def _padding(padding: Any) -> Any:
    """Canonical padding: "SAME"/"VALID" or ((lo, hi), (lo, hi)) (Flax's conventions for 2-D convs)."""
    if isinstance(padding, str):
        p = padding.upper()
        if p not in ("SAME", "VALID"):
            raise ValueError(
                f"padding={padding!r}; allowed: 'SAME', 'VALID', an int or ((lo, hi), (lo, hi)) "
                "(zero padding only: CIRCULAR/REFLECT are not linear maps of this kind here)"
            )
        return p
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    pads = tuple(padding)
    if len(pads) != 2:
        raise ValueError(f"padding={padding!r}; expected one (lo, hi) pair per spatial axis")
    out = []
    for p in pads:
        if isinstance(p, int):
            out.append((p, p))
        else:
            lo, hi = p
            out.append((int(lo), int(hi)))
    return tuple(out)


def _explicit_pads(input_hw, kernel_hw, strides, padding) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        return tuple(tuple(p) for p in lax.padtype_to_pads(input_hw, kernel_hw, strides, padding))
    return padding


def _conv_xla(x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
    """``flax.linen.Conv`` without bias on one example: x [H, W, C_in] -> [H_out, W_out, C_out]."""
    y = lax.conv_general_dilated(
        x[None], kernel, window_strides=strides, padding=padding, dimension_numbers=_DN, precision=_HI
    )
    return y[0]


def _conv(x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
    """The same map as :func:`_conv_xla`, as shifted strided slices + one matmul.

    Why: under ``jax.vmap`` over replicas (a kernel per replica) ``conv_general_dilated`` becomes a grouped
    convolution, and its transpose a grouped transposed one; XLA:CPU runs those orders of magnitude slower
    than this batched matmul (measured: ~450 ms vs a few ms per power iteration for LeNet-5, R=16).
    Pads, slices and the matmul transpose exactly, so ``jax.linear_transpose`` stays cheap.
    """
    kh, kw, cin, cout = kernel.shape
    h, w = x.shape[0], x.shape[1]
    (lo_h, hi_h), (lo_w, hi_w) = _explicit_pads((h, w), (kh, kw), strides, padding)
    sh, sw = strides
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((lo_h, hi_h, 0), (lo_w, hi_w, 0), (0, 0, 0)))
    ho = (h + lo_h + hi_h - kh) // sh + 1
    wo = (w + lo_w + hi_w - kw) // sw + 1
    taps = [
        lax.slice(xp, (i, j, 0), (i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin), (sh, sw, 1))
        for i in range(kh)
        for j in range(kw)
    ]
    patches = jnp.stack(taps, axis=2).reshape(ho * wo, kh * kw * cin)  # tap order (i, j) = kernel's HW order
    y = jnp.matmul(patches, kernel.reshape(kh * kw * cin, cout), precision=_HI)
    return y.reshape(ho, wo, cout)


def _conv_out_shape(input_shape, kernel_shape, strides, padding) -> tuple[int, int, int]:
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    k = jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32)
    return tuple(jax.eval_shape(lambda a, b: _conv(a, b, strides, padding), x, k).shape)


def _identity_tap(input_shape, kernel_shape, strides, padding) -> tuple[int, int] | None:
    """The tap at which the identity lives if the conv operator is square, else None (M = 0)."""
    kh, kw, cin, cout = kernel_shape
    if tuple(strides) != (1, 1) or cin != cout:
        return None
    if _conv_out_shape(input_shape, kernel_shape, strides, padding) != tuple(input_shape):
        return None
    pads = _explicit_pads(tuple(input_shape[:2]), (kh, kw), strides, padding)
    # output p reads input p - lo + t: the tap t = lo maps p to p.
    (lo_h, _), (lo_w, _) = pads
    if not (0 <= lo_h < kh and 0 <= lo_w < kw):
        return None
    return lo_h, lo_w


def _transpose_of(fn, primal_example):
    t = jax.linear_transpose(fn, primal_example)
    return lambda y: t(y)[0]


def _safe_div(a, b):
    ok = b > 0
    return jnp.where(ok, a / jnp.where(ok, b, 1), 0)


# ----------------------------------------------------------------------------------------------
# Power iteration
# ----------------------------------------------------------------------------------------------


def _power_iteration(matvec, rmatvec, v0, *, min_iters, max_iters, tol):
    """Largest singular value of a linear map by power iteration on A^T A.

    Args:
      matvec: x -> A x, rmatvec: y -> A^T y (exact transpose).
      v0: start vector (any shape matvec accepts), nonzero.
      min_iters, max_iters: iteration bounds; tol: stop when |sigma_k - sigma_{k-1}| <= tol * sigma_k.

    Returns:
      (sigma, v, iters, delta): estimate, unit right singular vector estimate (shape of v0), iterations run,
      last relative change.
    """
    v0 = v0 / jnp.maximum(jnp.linalg.norm(v0), jnp.finfo(v0.dtype).tiny)
    dtype = v0.dtype

    def body(carry):
        i, v, sigma, _ = carry
        u = matvec(v)
        w = rmatvec(u)
        nu, nw = jnp.linalg.norm(u), jnp.linalg.norm(w)
        # ||A^T A v|| / ||A v|| >= ||A v|| for unit v (Cauchy-Schwarz), and <= sigma_max.
        new_sigma = _safe_div(nw, nu).astype(dtype)
        new_v = jnp.where(nw > 0, w / jnp.where(nw > 0, nw, 1), v).astype(dtype)
        delta = _safe_div(jnp.abs(new_sigma - sigma), new_sigma).astype(dtype)
        return i + 1, new_v, new_sigma, delta

    def cond(carry):
        i, _, _, delta = carry
        return (i < min_iters) | ((i < max_iters) & (delta > tol))

    init = (jnp.asarray(0, jnp.int32), v0, jnp.zeros((), dtype), jnp.asarray(jnp.inf, dtype))
    i, v, sigma, delta = lax.while_loop(cond, body, init)
    return sigma, v, i, delta


def conv_operator_norm(
    kernel: jax.Array,
    input_shape: Sequence[int],
    strides: Any = 1,
    padding: Any = "SAME",
    *,
    tol: float = 1e-7,
    max_iters: int = 2000,
    key: jax.Array | None = None,
) -> jax.Array:
    """Largest singular value of ``x -> conv(x, kernel)`` on inputs of shape ``input_shape``.

    The operator is ``flax.linen.Conv(use_bias=False)`` on one example: zero padding, the given strides.
    Computed by cold-start power iteration (see module docstring) to relative change ``tol``.

    Args:
      kernel: [kh, kw, C_in, C_out] (Flax layout).
      input_shape: (H, W, C_in) of one example.
      strides: int or (sh, sw).
      padding: "SAME", "VALID", an int, or ((lo_h, hi_h), (lo_w, hi_w)).
      tol, max_iters: stopping rule of the power iteration.
      key: PRNG key of the random start vector (default ``jax.random.PRNGKey(0)``).

    Returns:
      Scalar ||A||_sigma in kernel's dtype (a lower bound that converges from below).
    """
    strides = _pair(strides, "strides")
    padding = _padding(padding)
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3 or kernel.ndim != 4 or kernel.shape[2] != input_shape[2]:
        raise ValueError(
            f"conv_operator_norm: kernel {kernel.shape} (kh, kw, C_in, C_out) does not match "
            f"input_shape {input_shape} (H, W, C_in)"
        )
    key = jax.random.PRNGKey(0) if key is None else key
    return _conv_operator_norm(kernel, key, input_shape, strides, padding, float(tol), int(max_iters))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _conv_operator_norm(kernel, key, input_shape, strides, padding, tol, max_iters):
    v0 = jax.random.normal(key, input_shape, kernel.dtype)
    matvec = functools.partial(_conv, kernel=kernel, strides=strides, padding=padding)
    rmatvec = _transpose_of(matvec, v0)
    sigma, _, _, _ = _power_iteration(matvec, rmatvec, v0, min_iters=2, max_iters=max_iters, tol=tol)
    return sigma


def conv_row_col_sq_norms(kernel, input_shape, strides=1, padding="SAME"):
    """Exact squared l2 norms of the rows and columns of the unrolled conv matrix A (y = A x).

    Args:
      kernel: [kh, kw, C_in, C_out]; input_shape: (H, W, C_in); strides, padding: as :func:`conv_operator_norm`.

    Returns:
      (rows [H_out, W_out, C_out], cols [H, W, C_in]): rows[p, o] = sum of K[t, :, o]**2 over the taps t whose
      input position lies inside the (unpadded) input; cols is the transposed conv of K*K applied to ones.
    """
    strides = _pair(strides, "strides")
    padding = _padding(padding)
    k2 = kernel * kernel
    ones_in = jnp.ones(tuple(input_shape), kernel.dtype)
    sq_conv = functools.partial(_conv, kernel=k2, strides=strides, padding=padding)
    rows = sq_conv(ones_in)
    cols = _transpose_of(sq_conv, ones_in)(jnp.ones(rows.shape, kernel.dtype))
    return rows, cols


# ----------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------


def _stateful(layout: Layout) -> tuple[LinearLayer, ...]:
    return tuple(l for l in layout if l.kind in ("conv", "dense"))


def init_norm_state(layout: Layout, key: jax.Array, dtype: Any = jnp.float32) -> dict[str, Any]:
    """Power-iteration state for one replica (vmap it, or pass per-replica keys, for R replicas).

    Args:
      layout: the model's layers.
      key: PRNG key of the random start vectors.
      dtype: dtype of the stored vectors.

    Returns:
      ``{"v": tuple of unit vectors, one per conv/dense layer in layout order, each of shape
      layer.input_shape; "iters": int32 [n] iterations used at the last evaluation (0 for SVD layers);
      "delta": [n] last relative change of the estimate}``. Tuples, not name-keyed dicts, so that layer
      names with "/" never become checkpoint paths.
    """
    shapes = tuple(tuple(int(d) for d in layer.input_shape) for layer in _stateful(layout))
    return _init_state(shapes, key, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_state(shapes, key, dtype):
    # One compiled program: eager jax.random per shape would compile one kernel per layer (seconds).
    keys = jax.random.split(key, max(len(shapes), 1))
    vs = []
    for k, shape in zip(keys, shapes):
        v = jax.random.normal(k, shape, dtype)
        vs.append(v / jnp.linalg.norm(v))
    n = len(shapes)
    return {"v": tuple(vs), "iters": jnp.zeros((n,), jnp.int32), "delta": jnp.full((n,), jnp.inf, dtype)}


# ----------------------------------------------------------------------------------------------
# Per-layer norms
# ----------------------------------------------------------------------------------------------


def _l21(rows_sq, cols_sq, n_copies, definition):
    """(2,1) term from squared row/col norms of one block, the block repeated n_copies times (K (x) I_T)."""
    if definition == "paper":
        return jnp.mean(jnp.sqrt(jnp.maximum(rows_sq, 0)))
    if definition == "bartlett":
        return n_copies * jnp.sum(jnp.sqrt(jnp.maximum(rows_sq, 0)))
    return jnp.mean(jnp.sqrt(jnp.maximum(cols_sq, 0)))


def _dense_parts(layer, kernel, v, definition, dense_method, pi_kw):
    d_in = math.prod(kernel.shape[: layer.kernel_in_ndim])
    n_in = math.prod(layer.input_shape)
    if d_in == 0 or n_in % d_in:
        raise ValueError(
            f"layer {layer.name!r}: kernel {kernel.shape} with kernel_in_ndim={layer.kernel_in_ndim} "
            f"(d_in={d_in}) does not divide input_shape {layer.input_shape}"
        )
    n_pos = n_in // d_in
    k2 = kernel.reshape(d_in, -1)  # A = k2^T, y = A x
    d_out = k2.shape[1]
    km = k2
    if layer.residual and d_in == d_out:
        km = k2 - jnp.eye(d_in, dtype=k2.dtype)
    rows_sq = jnp.sum(km * km, axis=0)  # output units: columns of the Flax kernel
    cols_sq = jnp.sum(km * km, axis=1)  # input units
    l21 = _l21(rows_sq, cols_sq, n_pos, definition)
    if dense_method == "svd":
        spec = jnp.linalg.svd(k2, compute_uv=False)[0]
        return spec, l21, v, jnp.zeros((), jnp.int32), jnp.zeros((), v.dtype)
    # Power iteration on K (x) I_T acting on the whole input, v of shape input_shape.
    matvec = lambda x: jnp.matmul(x.reshape(n_pos, d_in), k2, precision=_HI)
    rmatvec = lambda y: jnp.matmul(y, k2.T, precision=_HI).reshape(layer.input_shape)
    spec, v_new, it, delta = _power_iteration(matvec, rmatvec, v.astype(k2.dtype), **pi_kw)
    return spec, l21, v_new.astype(v.dtype), it, delta.astype(v.dtype)


def _conv_parts(layer, kernel, v, definition, pi_kw):
    strides = _pair(layer.strides, f"layer {layer.name!r} strides")
    padding = _padding(layer.padding)
    if kernel.ndim != 4 or kernel.shape[2] != layer.input_shape[2]:
        raise ValueError(
            f"layer {layer.name!r}: kernel {kernel.shape} (kh, kw, C_in, C_out) does not match "
            f"input_shape {layer.input_shape}"
        )
    km = kernel
    if layer.residual:
        tap = _identity_tap(layer.input_shape, kernel.shape, strides, padding)
        if tap is not None:
            km = kernel.at[tap[0], tap[1]].add(-jnp.eye(kernel.shape[2], dtype=kernel.dtype))
    rows_sq, cols_sq = conv_row_col_sq_norms(km, layer.input_shape, strides, padding)
    l21 = _l21(rows_sq, cols_sq, 1, definition)
    matvec = functools.partial(_conv, kernel=kernel, strides=strides, padding=padding)
    v0 = v.astype(kernel.dtype)
    rmatvec = _transpose_of(matvec, v0)
    spec, v_new, it, delta = _power_iteration(matvec, rmatvec, v0, **pi_kw)
    return spec, l21, v_new.astype(v.dtype), it, delta.astype(v.dtype)


def _diag_parts(layer, variables, definition):
    s = get_path(variables, layer.path)
    if layer.var_path is not None:
        s = s / jnp.sqrt(get_path(variables, layer.var_path) + layer.eps)
    s = s.reshape(-1)
    n_pos = math.prod(layer.input_shape) // s.shape[0]
    sm = s - 1 if layer.residual else s
    spec = jnp.max(jnp.abs(s))
    l21 = _l21(sm * sm, sm * sm, n_pos, definition)
    return spec, l21


# ----------------------------------------------------------------------------------------------
# Eq. 2
# ----------------------------------------------------------------------------------------------


def complexity_from_parts(spec, l21, lipschitz, *, log: bool = False) -> jax.Array:
    """Eq. 2 from per-layer numbers.

    Args:
      spec: [L] spectral norms ||A_i||_sigma; l21: [L] (2,1) norms ||A_i^T - M_i^T||_{2,1};
      lipschitz: [L] rho_i. Extra leading (replica) axes are allowed; the layer axis is last.
      log: return log R_A instead of R_A.

    Returns:
      R_A (or log R_A) with the leading axes of the inputs.
    """
    spec, l21 = jnp.asarray(spec), jnp.asarray(l21)
    rho = jnp.asarray(lipschitz, spec.dtype)
    log_prod = jnp.sum(jnp.log(rho) + jnp.log(spec), axis=-1)
    ratio = _safe_div(l21, spec)  # sigma = 0 -> 0: then the product is 0 anyway
    log_sum = 1.5 * jnp.log(jnp.sum(ratio ** (2.0 / 3.0), axis=-1))
    out = log_prod + log_sum
    return out if log else jnp.exp(out)


def _validate(definition, norm_layers, dense_method, layout):
    _check_choice("definition", definition, DEFINITIONS)
    _check_choice("norm_layers", norm_layers, NORM_LAYERS)
    _check_choice("dense_method", dense_method, DENSE_METHODS)
    names = [l.name for l in layout]
    if len(set(names)) != len(names):
        raise ValueError(f"layer names must be unique; got {names}")


def spectral_complexity(
    variables: Mapping[str, Any],
    layout: Layout,
    state: Mapping[str, Any] | None = None,
    *,
    definition: str = "paper",
    norm_layers: str = "exclude",
    dense_method: str = "svd",
    min_iters: int = 2,
    max_iters: int = 500,
    tol: float = 1e-5,
    log: bool = False,
):
    """Spectral complexity R_A (paper Eq. 2) of one replica.

    Args:
      variables: the model's variables (one replica; vmap for R), read at each ``layer.path``.
      layout: the model's ``LinearLayer`` tuple (static: close over it under jit).
      state: power-iteration state from :func:`init_norm_state` or a previous call (warm start), or None
        for a cold start from ``init_norm_state(layout, PRNGKey(0))``.
      definition: (2,1) norm, one of ``DEFINITIONS`` (see module docstring).
      norm_layers: ``"exclude"`` or ``"include"`` diag (LayerNorm/BatchNorm scale) layers.
      dense_method: ``"svd"`` (exact) or ``"power"`` for dense spectral norms.
      min_iters, max_iters, tol: power-iteration stopping rule (at least min_iters; then until the relative
        change of the estimate is <= tol, or max_iters). Warm starts typically stop at min_iters.
      log: return log R_A as ``total``.

    Returns:
      (total, parts, new_state): total scalar R_A (or log R_A); parts ``{layer.name: {"spec": ||A||_sigma,
      "l21": ||A^T - M^T||_{2,1}}}`` for every counted layer (diag layers absent when excluded);
      new_state with the same structure as ``state`` (``iters``/``delta`` report the stopping point).
    """
    _validate(definition, norm_layers, dense_method, layout)
    if state is None:
        state = init_norm_state(layout, jax.random.PRNGKey(0))
    stateful = _stateful(layout)
    if len(state["v"]) != len(stateful):
        raise ValueError(
            f"state has {len(state['v'])} vectors but the layout has {len(stateful)} conv/dense layers; "
            "build it with init_norm_state(layout, key)"
        )
    pi_kw = dict(min_iters=min_iters, max_iters=max_iters, tol=tol)
    parts, specs, l21s, rhos = {}, [], [], []
    new_v, new_it, new_delta = [], [], []
    j = 0
    for layer in layout:
        if layer.kind == "diag":
            if norm_layers == "exclude":
                continue
            spec, l21 = _diag_parts(layer, variables, definition)
        else:
            v = state["v"][j]
            if tuple(v.shape) != tuple(layer.input_shape):
                raise ValueError(
                    f"state vector {j} has shape {v.shape}, layer {layer.name!r} needs {layer.input_shape}"
                )
            kernel = get_path(variables, layer.path)
            if layer.kind == "dense":
                spec, l21, v, it, delta = _dense_parts(layer, kernel, v, definition, dense_method, pi_kw)
            else:
                spec, l21, v, it, delta = _conv_parts(layer, kernel, v, definition, pi_kw)
            new_v.append(v)
            new_it.append(it)
            new_delta.append(delta.astype(state["delta"].dtype))
            j += 1
        parts[layer.name] = {"spec": spec, "l21": l21}
        specs.append(spec)
        l21s.append(l21)
        rhos.append(layer.lipschitz)
    if not specs:
        raise ValueError("spectral_complexity: the layout has no layer to count")
    dtype = jnp.result_type(*specs)
    total = complexity_from_parts(
        jnp.stack([s.astype(dtype) for s in specs]),
        jnp.stack([x.astype(dtype) for x in l21s]),
        jnp.asarray(rhos, dtype),
        log=log,
    )
    new_state = {
        "v": tuple(new_v),
        "iters": jnp.stack(new_it).astype(jnp.int32) if new_it else state["iters"],
        "delta": jnp.stack(new_delta) if new_delta else state["delta"],
    }
    return total, parts, new_state


def spectral_complexity_fn(layout: Layout, *, batched: bool = True, jit: bool = True, **options):
    """A compiled ``f(variables, state) -> (total, parts, new_state)`` for a fixed layout and options.

    Args:
      layout: the model's layers (static).
      batched: vmap over a leading replica axis R of ``variables`` and ``state`` (state from
        ``jax.vmap(lambda k: init_norm_state(layout, k))(keys)``). ``state`` may be None (cold start,
        shared start vector).
      jit: wrap in ``jax.jit``.
      **options: keyword options of :func:`spectral_complexity` (validated here).

    Returns:
      The function; with ``batched`` its outputs carry the leading R axis.
    """
    _validate(
        options.get("definition", "paper"),
        options.get("norm_layers", "exclude"),
        options.get("dense_method", "svd"),
        layout,
    )
    f = lambda variables, state=None: spectral_complexity(variables, layout, state, **options)
    if batched:
        f = jax.vmap(f)
    return jax.jit(f) if jit else f

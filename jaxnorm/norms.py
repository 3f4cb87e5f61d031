"""Spectral complexity R_A of a network (paper Eq. 2; Bartlett, Foster & Telgarsky 2017), with certified
bounds, the reference implementation's formula, and a zoo of cheaper norms.

    R_A = (prod_i rho_i ||A_i||_sigma) * (sum_i ||A_i^T - M_i^T||_{2,1}^{2/3} / ||A_i||_sigma^{2/3})^{3/2}

The model describes its linear operators with a :class:`jaxnorm.layout.LinearLayer` tuple; this module reads
the weights at ``layer.path`` (and ``var_path``) and nothing else. Every public function accepts variables held
as jax or numpy arrays (e.g. loaded from a checkpoint).

Conventions (decided here, used everywhere below)
-------------------------------------------------
* **Orientation.** ``A`` maps a layer's input to its output, ``y = A x``, so ``A`` has one *row per output
  unit* and one *column per input unit*. A Flax dense kernel ``K`` (``x @ K``) is ``A = K^T``.
* **The operator is the layer's action on one whole example.** For a conv, ``A`` is the zero-padded,
  strided convolution acting on the flattened ``(H, W, C_in)`` input (not the reshaped kernel matrix).
  For a dense layer applied per token (``input_shape = (T, d_in)``), ``A = K^T (x) I_T`` acting on the whole
  token sequence -- the same convention as a conv, so a 1x1 conv and a per-token dense give identical
  numbers. ``||K^T (x) I_T||_sigma = ||K||_sigma``; only the ``"bartlett"`` (2,1) sum gains the factor T.
* **(2,1) norm / formula.** ``definition=`` picks one of ``DEFINITIONS``; each is computed exactly:

  - ``"paper"`` (default for sweeps): the paper's text defines ``||B||_{2,1}`` as the *average* of the
    l2 norms of the columns of ``B``. Eq. 2 applies it to ``B = A^T - M^T``, whose columns are the rows of
    ``A - M``: **mean over output units of the l2 norm of each output unit's row of A - M**.
  - ``"bartlett"``: Bartlett et al.'s ``||B||_{2,1}`` = *sum* of the column l2 norms of ``B``, i.e. **sum
    over output units of the row norms of A - M** (= ``"paper"`` times the number of output units of the
    whole operator, ``T * d_out`` or ``H_out * W_out * C_out``).
  - ``"paper_input"``: the other reading of the paper's sentence (average over the columns of ``A - M``
    itself): **mean over input units of the column norms of A - M**. Offered for comparison only.
  - ``"deep_norm"``: **the reference implementation's formula** (``compute_model_norm`` in ``cnn/model.py``
    and ``resnet/model.py`` of the authors' repository Francill99/deep_norm), on the raw weights of every
    conv and dense entry of the layout in forward order (q, k, v separately; normalization layers ignored,
    whatever ``norm_layers``/``attention`` say), M = 0, rho = 1:
    ``W_i`` = the weight in PyTorch layout reshaped to ``(out, in * kh * kw)`` (= the Flax kernel reshaped to
    ``(kh * kw * in, out)``, transposed; the column order does not change either norm);
    ``s_i = ||W_i||_sigma`` (largest singular value of that matrix, *not* of the conv operator);
    ``t_i = sum of the l2 norms of the columns of W_i``;
    ``R = prod_i s_i * (sum_i (sum_{j>i} t_j)^{2/3} / s_i^{2/3})^{3/2}`` (the last layer's term is 0).
    The per-layer ``l21`` reported is the layer's own ``t_i``. (Their ViT code, ``vit/model.py``, uses yet
    another variant -- each layer's own sum of *row* norms, no suffix sum -- which is not offered here.)

* **Normalization layers** (``norm_layers=``, one of ``NORM_LAYERS``):

  - ``"fold"`` (default): a diag entry with ``fold_into`` is folded into those conv/dense kernels, as the
    generalization-measure literature does (Jiang et al. 2019): eval-mode BatchNorm multiplies each output
    channel of the conv that feeds it by ``scale / sqrt(running_var + eps)``; a pre-LN LayerNorm's ``scale``
    multiplies the input features of the layers that read it (q, k, v; mlp1; the head). Why: R_A is then a
    function of the network -- rescaling a BN-fed kernel by c and its running variance by c^2 (or a
    LayerNorm scale by c and the next kernel by 1/c) leaves the network *and* R_A unchanged. The
    normalization's ``1/std`` (BatchNorm's batch statistics at train time, LayerNorm's per-token std) is
    not a fixed linear map and stays out, as in the literature. Biases are never included.
  - ``"exclude"``: drops diag entries (R_A then changes under the rescaling above).
  - ``"include"``: counts each scale as a separate diagonal operator ``diag(s) (x) I``, ``s = scale``
    (LayerNorm) or ``scale / sqrt(running_var + eps)`` (BatchNorm). For comparison only.

* **Attention** (``attention=``, one of ``ATTENTIONS``; entries sharing a layout ``stack`` name):

  - ``"stacked"`` (default): q, k, v are **one operator** ``[q; k; v]: (T, d) -> (T, 3d)``, their kernels
    concatenated along the output axis. Why: Eq. 2 is a bound for a *composition* of maps; q, k and v are
    applied in parallel to the same input, so counting them as three factors of the product chain (as if
    applied in sequence) multiplies R_A by two spurious spectral norms. ``[q; k; v]`` is not square, so
    M = 0 for it (next point). The output projection stays its own operator.
  - ``"separate"``: q, k, v are three factors of the chain (the previous behaviour, and the authors' ViT code).

* **Reference matrices M_i.** ``M_i = I`` only where a *square* operator (output shape equal to input
  shape) sits on a branch with an identity shortcut (``layer.residual``): dense with ``d_in == d_out``;
  conv with stride 1, ``C_in == C_out`` and a padding that keeps ``H, W`` (then the identity is the kernel
  with ``I`` at the tap that maps output ``p`` to input ``p``, i.e. tap ``pad_lo``; ``A - I`` is the conv with
  that centre tap reduced by ``I``, exact for zero padding); diag always. Why: only a square map can be
  compared with the identity it perturbs; a non-square map on the branch (ViT mlp1/mlp2, ``[q; k; v]``,
  a stride-2 conv) has no identity to be compared with and keeps ``M = 0``. Which layers get ``M = I``:
  ResNet convs of blocks without downsampling, ViT ``attn/out`` (and q, k, v with ``attention="separate"``).
  ``M`` enters only the (2,1) term: the spectral factor is ``||A_i||_sigma`` as in Eq. 2. A folded BN's
  ``residual`` flag is that of its conv.
* **Lipschitz constants rho_i** are ``layer.lipschitz`` from the layout, used as given. ReLU: 1 (exact).
  GELU: its exact Lipschitz constant is max_x d/dx[x Phi(x)] = 1.1289 (at x = sqrt 2); a layout that
  stores 1 for GELU uses the common approximation. Softmax attention is not globally Lipschitz; what the
  layout stores for it is an approximation chosen by ``jaxnorm.models``. A stacked operator takes the
  first member's rho.

Certified bounds on every spectral norm
---------------------------------------
Each operator norm is reported as an interval ``[spec, spec_upper]`` that contains ``||A||_sigma`` (up to
float rounding), and R_A as ``[total, total_upper]`` (R_A is nondecreasing in every ``||A_i||_sigma``, so the
endpoints are R_A at the lower and at the upper norms).

* Lower bound ``spec``: power iteration on ``A^T A`` through the real convolution (Flax's NHWC/HWIO layout and
  zero padding, computed as strided slices + a matmul, which vmaps over replicas into a batched matmul) and
  its exact transpose (``jax.linear_transpose``), warm-started from the previous evaluation's vector kept in
  a state pytree (:func:`init_norm_state`). For any vector, ``||A^T A v|| / ||A v|| <= ||A||_sigma``: every
  reading is a certified lower bound, whatever the number of iterations.
* Upper bound ``spec_upper`` of a conv, ``conv_bound="exact"`` (default): an exact test of ``||A||_sigma < gamma``
  on the zero-padded, strided operator itself (:func:`conv_bound_holds`). The Gram matrix ``G = A^T A`` (input
  side) or ``A A^T`` (output side, whichever is cheaper) is assembled exactly from the kernel, boundaries
  included: ``G[p, p + d] = sum_t m[p, t] K[t] K[t + d]^T`` (``C x C`` blocks; ``m[p, t] = 1`` where tap t of
  position p is read by an output that exists, i.e. zero padding and stride are exact), a block-tridiagonal
  matrix in blocks of ``k - 1`` position rows. ``gamma^2 I - G`` is factorized by a block Cholesky; it succeeds
  iff the matrix is positive definite, i.e. iff ``||A||_sigma < gamma`` (certified up to float rounding of G and
  of the factorization: ~1e-6 relative in float32). Cost: ``ceil(H / (k - 1))`` Cholesky steps on blocks of
  ``(k - 1) W C`` rows (paper-size ResNet-20: 1024 rows in every stage), far more than one power iteration, so it
  is run only as a stopping test (below). Why not Gram iteration on the kernel (Delattre, Barthelemy & Allauzen
  2024, "Spectral norm of convolutional layers with circular and zero paddings", lip4conv's
  ``compute_delattre2024``: repeated self-convolutions of the kernel, then the largest absolute row sum): it
  bounds the convolution on the infinite plane, i.e. ``sup_omega ||K_hat(omega)||``, which is at least the
  circular bound below, while the zero-padded operator on a small feature map is several % *below* that
  supremum (an 8 x 8 map loses a finite-size term of order (pi / 8)^2 of the symbol's curvature); no bound on
  the kernel alone can close that gap, the test above does.
* ``conv_bound="circulant"`` (the previous bound, kept for comparison and as a cheap, loose alternative): the
  zero-padded, strided conv on an ``H x W`` input is (after a permutation) a sub-matrix of a stride-1 *circular*
  conv: pad explicitly, rewrite the stride-s conv as a stride-1 conv on the s x s polyphase components
  (``C_in s^2`` channels, kernel ``ceil(k/s)``), and embed that valid conv in the circular conv on the
  ``ceil(H_pad/s) x ceil(W_pad/s)`` torus, whose norm is the largest singular value of the kernel's DFT over
  frequencies (Sedghi et al. 2019). Each frequency's ``C x C_out`` matrix is bounded from above by Gram
  iteration (Delattre et al. 2023: ``sigma_1(W) <= ||G_t||_F^{1/2^t}``, ``G_{t+1} = G_t^H G_t``, certified at
  every t). Exact for non-overlapping patch convs (ViT's patch embedding), loose by the circulant-vs-Toeplitz
  gap otherwise: measured by bench/bench_norms.py on paper-size models after 16 Adam steps (32x32x3 inputs):
  LeNet conv1 1.9%, conv2 8.2% (5x5 VALID on 14 px); ResNet-20 0.3-1% in stage 1 (32 px), 0.7-2.9% in stage 2,
  0.9-9.5% in stage 3 (8 px); R_A's interval [R, 1.33 R] for ResNet-20. The exact bound starts from it (the
  ViT's patch conv needs no test).
* Dense layers: ``dense_method="svd"`` (default) -- exact up to float rounding (the top eigenvalue of the
  smaller Gram matrix ``K^T K`` or ``K K^T``, 15x faster than a batched SVD on XLA:CPU), ``spec_upper = spec``;
  ``"power"`` -- power iteration with a Gram-iteration upper bound of the kernel matrix itself, run for enough
  iterations to be within tol / 4 of sigma_1 in the worst case (:func:`_dense_gram_iters`; e.g. 20 for d = 64,
  tol = 1e-5), so the power iteration stops on a certified gap <= tol (with 6 iterations the ViT's dense gaps
  were up to 1.4%: R_A's interval [R, 1.14 R]).
* Lower bounds: every spectral norm not computed by an SVD is a power-iteration estimate ``||A^T A v|| /
  ||A v||`` (a lower bound for any v). With ``krylov = k`` (default ``KRYLOV`` = 8) each iteration first runs
  a k-step Lanczos cycle on ``A^T A`` from v (full reorthogonalization) and continues from its top Ritz vector;
  ``krylov = 0`` is plain power iteration. Why: plain power iteration converges like ``(sigma_2 /
  sigma_1)^(2 i)``, slowly for trained kernels whose top singular values cluster; with the exact test every
  premature test is a wasted block Cholesky, and with the circulant bound the power iteration stops on a
  small change far below the norm. Measured (``bench/bench_conv_bound.py --input-shape 28 28 1``: paper-size
  models, Adam steps on random data, then as many again): LeNet-5 (``--steps 64 --tol 1e-5``), products with
  A for conv1 / conv2: plain power iteration 232 / 40 cold, 62 / 8 warm; k = 8: 36 / 27 and 18 / 18; k = 16:
  68 / 34 and 34 / 34. ResNet-20 (``--steps 16 --tol 1e-3``), exact bound: cold evaluation 106 s -> 42 s
  (78-376 products per conv -> 27-63: fewer failed tests); circulant bound: the power iteration's R_A read
  4.55e9 cold and 7.32e9 after 16 more steps, 25% and 19% below the exact runs' 6.04e9 and 9.09e9 (its change
  rule stops early), Lanczos 6.03e9 and 9.09e9 at the same cost (0.67 vs 0.64 s warm).
* Stopping rule: at least ``min_iters`` iterations, at most ``max_iters`` (both in products with A; a Lanczos
  cycle is k + 1 of them and starts only if it fits; its relative change is measured from its start vector's
  ``||A v||``). Convs with ``conv_bound="exact"``:
  iterate until the relative change is ``<= tol / 4``, then test ``gamma = (1 + tol) spec``; if the test fails
  (spec is then more than tol below the norm, however little it changes per step), restart from the current
  vector plus an equal-norm random vector (a warm-start vector can sit on a lower singular direction whose
  Krylov space misses the top one), double the iterations and test again; stop at the first success
  (``spec_upper = (1 + tol) spec``: certified relative gap tol). Other power iterations (``"circulant"``,
  dense ``"power"``): stop when the certified gap ``spec_upper / spec - 1 <= tol`` or when the relative
  change is ``<= tol`` (not an error bound). A reading that stops with its certified
  gap above ``tol`` (exact convs: ``max_iters`` reached or 16 failed tests; others: ``max_iters`` reached with
  change and gap above tol) is *unconverged*; :func:`evaluate` counts them (``unconverged``), so no reading is
  silent. The reported interval is certified either way.

Norm zoo (:func:`norm_zoo`; Jiang et al. 2019, "Fantastic generalization measures and where to find them")
--------------------------------------------------------------------------------------------------------
Scalars per replica, on the same operators as R_A (after folding and stacking, ``norm_layers="fold"``):
``frob_prod`` = prod_i ||K_i||_F (Frobenius norm of each kernel tensor, product over layers);
``spec_prod`` = prod_i ||A_i||_sigma (operator norms, R_A's first factor without rho);
``group21`` = sum_i of the (2,1) norm of the reshaped weight ``(out, in * kh * kw)``: sum over its columns (input
units) of their l2 norms (the authors' ``compute_group_2_1_norm``);
``dist_frob`` = sqrt(sum_i ||K_i - K_i(0)||_F^2) (distance from initialization);
``dist_spectral`` = Eq. 2 with ``M_i = A_i(0)`` (the (2,1) norms of ``A_i - A_i(0)`` by ``definition``; "paper" for
``deep_norm``);
``path_l2`` = sqrt(sum_k f_{w^2}(1)_k): the model's forward pass (``apply_fn``) with every kernel squared, the
folded BN scales squared, every additive parameter zero (biases, BN means, the ViT's class token and position
embeddings), on the all-ones input (max pooling, GELU and softmax attention applied as they are). **Normalization
layers count as their affine part**: eval-mode BatchNorm is its folded scale (above), and each LayerNorm is
replaced by ``x -> x * scale^2`` -- its per-token normalization is treated as the identity. Why: the literature's
definition is for networks of linear maps and ReLUs (Jiang et al. 2019 fold BatchNorm and have no LayerNorm); a
LayerNorm applied as is maps the constant input to 0 (the norm was NaN for the ViT), and its 1/std is not a
fixed linear map -- the same reason it stays out of R_A (``norm_layers="fold"``).
``dist_*`` are NaN without initial variables.

All functions are pure, jit-able and vmappable over a leading replica axis (see :func:`spectral_complexity_fn`).
The product of spectral norms is formed in log space so that deep nets do not overflow float32
(``log=True`` returns ``log R_A``). A layer with ``||A||_sigma = 0`` contributes 0 to the sum (the product is
then 0), so ``R_A = 0``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm.layout import Layout, LinearLayer, get_path
from jaxnorm.models import explicit_pads

OPERATOR_DEFINITIONS = ("paper", "bartlett", "paper_input")  # Eq. 2 on the operators
DEFINITIONS = OPERATOR_DEFINITIONS + ("deep_norm",)
NORM_LAYERS = ("fold", "exclude", "include")
ATTENTIONS = ("stacked", "separate")
DENSE_METHODS = ("svd", "power")
CONV_BOUNDS = ("exact", "circulant")
KRYLOV = 8  # Lanczos cycle length of the power iterations (module docstring, "Stopping rule")
_RESTART_SEED = 0x5EED  # random restarts after a failed exact test (module docstring, "Stopping rule")

_DN = ("NHWC", "HWIO", "NHWC")
_HI = lax.Precision.HIGHEST  # norms are logged quantities: no TF32/bf16 passes on GPUs


# ----------------------------------------------------------------------------------------------
# Validation and small helpers
# ----------------------------------------------------------------------------------------------


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; allowed: {tuple(allowed)}")


def _check_krylov(krylov: Any) -> None:
    if isinstance(krylov, bool) or not isinstance(krylov, numbers.Integral) or krylov < 0 or krylov == 1:
        raise ValueError(f"krylov={krylov!r}: expected 0 (plain power iteration) or an integer >= 2")


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
    (lo_h, hi_h), (lo_w, hi_w) = explicit_pads((h, w), (kh, kw), strides, padding)
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
    pads = explicit_pads(tuple(input_shape[:2]), (kh, kw), strides, padding)
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


def _eigh(t):
    # A plain function for custom_vmap: jnp.linalg.eigh itself is a jit with static arguments, which
    # custom_vmap cannot trace through ("Non-hashable static arguments").
    return jnp.linalg.eigh(t)


def _products_per_iteration(krylov: int) -> int:
    """Products with A per iteration of :func:`_power_iteration`: 1, or k + 1 with a k-step Lanczos cycle."""
    return 1 if krylov <= 1 else krylov + 1


def _top_ritz_vector(gram, v, k):
    """Top Ritz vector of ``gram`` (symmetric PSD, ``x -> A^T A x``) in the Krylov space of ``v`` (unit), dim k.

    Lanczos with full reorthogonalization (twice, Parlett's "twice is enough"), so float32 keeps the basis
    orthonormal. Breakdown (an invariant subspace found: the residual is below float rounding) zeroes the
    remaining basis vectors; their rows of T are zero and do not affect the top eigenvalue of a PSD map.
    Why: power iteration's error falls like ``(sigma_2 / sigma_1)^(2 i)``, a k-step Krylov cycle's like a
    Chebyshev polynomial's, ``exp(-2 k sqrt(gap))``; with a cluster near the top (trained conv kernels) float32
    power iteration did not reach 1e-5 on LeNet's conv2 in 500 steps, and each premature exact test is a
    wasted block Cholesky.

    Returns:
      (y, rayleigh): y, the unit Ritz vector in the shape of ``v``; rayleigh = ``v^T A^T A v``, the start
      vector's own Rayleigh quotient (``||A v||^2``), for the cycle's relative change.
    """
    shape, dtype = v.shape, v.dtype
    q0 = v.reshape(-1)
    tiny = 64 * jnp.finfo(dtype).eps

    def step(j, st):
        basis, alpha, beta, q, q_prev, b_prev = st
        basis = basis.at[j].set(q)
        w = gram(q.reshape(shape)).reshape(-1).astype(dtype)
        a = jnp.vdot(q, w)
        w = w - a * q - b_prev * q_prev
        for _ in range(2):
            w = w - jnp.matmul(jnp.matmul(basis, w, precision=_HI), basis, precision=_HI)
        b = jnp.linalg.norm(w)
        ok = b > tiny * (jnp.abs(a) + b_prev)
        b = jnp.where(ok, b, 0)
        q_next = jnp.where(ok, w / jnp.where(ok, b, 1), 0)
        return basis, alpha.at[j].set(a), beta.at[j].set(b), q_next, q, b

    init = (jnp.zeros((k, q0.size), dtype), jnp.zeros((k,), dtype), jnp.zeros((k,), dtype), q0,
            jnp.zeros_like(q0), jnp.zeros((), dtype))
    basis, alpha, beta, *_ = lax.fori_loop(0, k, step, init)
    t = jnp.diag(alpha) + jnp.diag(beta[:-1], 1) + jnp.diag(beta[:-1], -1)
    _, vecs = _one_at_a_time_on_cpu(_eigh)(t)
    y = jnp.matmul(vecs[:, -1], basis, precision=_HI)
    ny = jnp.linalg.norm(y)
    return jnp.where(ny > 0, y / jnp.where(ny > 0, ny, 1), q0).reshape(shape), alpha[0]


def _power_iteration(matvec, rmatvec, v0, *, min_iters, max_iters, tol, upper=None, certify=None, rounds=16,
                     change_tol=None, krylov=0):
    """Largest singular value of a linear map by power iteration on A^T A, with a certified upper bound.

    Args:
      matvec: x -> A x, rmatvec: y -> A^T y (exact transpose).
      v0: start vector (any shape matvec accepts), nonzero.
      min_iters, max_iters: iteration bounds.
      tol: target relative gap. Without ``certify``: stop when |sigma_k - sigma_{k-1}| <= tol * sigma_k, or when
        the certified upper bound ``upper`` (scalar, optional) is within ``(1 + tol) sigma_k``.
      change_tol: the relative-change threshold without ``certify`` (default tol; 0: stop on the gap only).
      certify: optional ``gamma -> bool``, an exact test of ``||A||_sigma < gamma``. Then the iteration runs in
        rounds: iterate until the relative change is <= tol / 4 (first round) or to twice the iterations done
        so far (at least 8 more; later rounds), then test ``gamma = (1 + tol) sigma``; stop as soon as a test
        passes (``upper = gamma``) or ``upper`` is within ``(1 + tol) sigma``, or at ``max_iters`` (after one
        last test), or after ``rounds`` tests. Why doubling: a failed test means sigma is more than tol low
        although it may change little per step (the start vector nearly orthogonal to the top singular
        vector, or a cluster of singular values near the top); the doubling keeps the number of tests
        logarithmic in the iterations.
      krylov: 0 = power iteration; k > 1 = each iteration is a k-step Lanczos cycle on A^T A from v
        (:func:`_top_ritz_vector`), then one power step from its Ritz vector (which gives the certified lower
        bound ``||A^T A y|| / ||A y||``); ``iters`` then counts products with A, k + 1 per iteration.

    Returns:
      (sigma, v, iters, delta, upper): estimate, unit right singular vector estimate (shape of v0), iterations
      run (products with A), last relative change, certified upper bound (``upper``, or inf, improved by the
      tests).
    """
    v0 = v0 / jnp.maximum(jnp.linalg.norm(v0), jnp.finfo(v0.dtype).tiny)
    dtype = v0.dtype
    upper = jnp.asarray(jnp.inf if upper is None else upper, dtype)

    step = _products_per_iteration(krylov)

    def body(carry):
        i, v, sigma, _, stop, change_tol, up = carry
        if krylov > 1:
            # The change is measured within the cycle, from the start vector's own estimate ||A v||: a warm
            # start that is already converged stops after one cycle.
            v, rayleigh = _top_ritz_vector(lambda x: rmatvec(matvec(x)), v, krylov)
            sigma = jnp.sqrt(jnp.maximum(rayleigh, 0)).astype(dtype)
        u = matvec(v)
        w = rmatvec(u)
        nu, nw = jnp.linalg.norm(u), jnp.linalg.norm(w)
        # ||A^T A v|| / ||A v|| >= ||A v|| for unit v (Cauchy-Schwarz), and <= sigma_max.
        new_sigma = _safe_div(nw, nu).astype(dtype)
        new_v = jnp.where(nw > 0, w / jnp.where(nw > 0, nw, 1), v).astype(dtype)
        # Components of the unit vector along small singular directions decay geometrically into subnormals,
        # which x86 CPUs process ~100x slower (measured: a warm LeNet evaluation 3 s instead of ~0.1 s). Entries
        # below 1e-30 are set to 0; any vector gives a certified lower bound, so nothing is lost.
        new_v = jnp.where(jnp.abs(new_v) < 1e-30, jnp.zeros((), dtype), new_v)
        delta = _safe_div(jnp.abs(new_sigma - sigma), new_sigma).astype(dtype)
        return i + step, new_v, new_sigma, delta, stop, change_tol, up

    def cond(carry):
        i, _, sigma, delta, stop, change_tol, up = carry
        return (i < stop) | ((i + step <= max_iters) & (delta > change_tol) & (up > (1 + tol) * sigma))

    init = (jnp.asarray(0, jnp.int32), v0, jnp.zeros((), dtype), jnp.asarray(jnp.inf, dtype),
            jnp.asarray(min(min_iters, max_iters), jnp.int32),
            jnp.asarray(tol / 4 if certify is not None else tol if change_tol is None else change_tol, dtype),
            upper)
    carry = lax.while_loop(cond, body, init)
    if certify is not None:
        def round_cond(st):
            (i, _, sigma, _, _, _, up), r = st
            return (up > (1 + tol) * sigma) & (r < rounds) & ((r == 0) | (i + step <= max_iters))

        def round_body(st):
            (i, v, sigma, delta, _, change_tol, up), r = st
            # Rounds after the first: double the iterations (at least 8 more) before testing again.
            later = r > 0
            # A failed test means v misses the top singular direction by more than tol. A warm start is the
            # worst case: the previous top vector, after the weights moved, can sit near another singular
            # vector whose Krylov space holds the new top direction only at rounding level (measured with
            # bench/bench_norms.py: ResNet-20 after 16 Adam steps, one conv ran to max_iters, 504 products,
            # unconverged, where the cold start needed 45). So the next round restarts from v plus an
            # equal-norm random vector:
            # every direction gets a ~1/sqrt(n) component again, and v's own component is kept.
            fresh = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(_RESTART_SEED), r), v.shape, dtype)
            mixed = v / jnp.maximum(jnp.linalg.norm(v), jnp.finfo(dtype).tiny) + fresh / jnp.linalg.norm(fresh)
            v = jnp.where(later, mixed / jnp.linalg.norm(mixed), v).astype(dtype)
            carry = lax.while_loop(cond, body, (
                i, v, sigma, delta, jnp.where(later, jnp.minimum(jnp.maximum(2 * i, i + max(8, step)), max_iters), i),
                jnp.asarray(jnp.inf, dtype), up))
            i, v, sigma, delta, stop, _, up = carry
            gamma = ((1 + tol) * sigma).astype(dtype)
            up = jnp.where(certify(gamma), jnp.minimum(up, gamma), up)
            return (i, v, sigma, delta, stop, change_tol, up), r + 1

        carry, _ = lax.while_loop(round_cond, round_body, (carry, jnp.asarray(0, jnp.int32)))
    i, v, sigma, delta, _, _, up = carry
    return sigma, v, i, delta, up


def conv_operator_norm(
    kernel: jax.Array,
    input_shape: Sequence[int],
    strides: Any = 1,
    padding: Any = "SAME",
    *,
    tol: float = 1e-7,
    max_iters: int = 2000,
    key: jax.Array | None = None,
    krylov: int = KRYLOV,
) -> jax.Array:
    """Largest singular value of ``x -> conv(x, kernel)`` on inputs of shape ``input_shape``.

    The operator is ``flax.linen.Conv(use_bias=False)`` on one example: zero padding, the given strides.
    Computed by cold-start power iteration with Lanczos cycles of length ``krylov`` (0: plain power
    iteration; module docstring) to relative change ``tol``.

    Args:
      kernel: [kh, kw, C_in, C_out] (Flax layout).
      input_shape: (H, W, C_in) of one example.
      strides: int or (sh, sw).
      padding: "SAME", "VALID", an int, or ((lo_h, hi_h), (lo_w, hi_w)).
      tol, max_iters: stopping rule of the power iteration (max_iters in products with A).
      key: PRNG key of the random start vector (default ``jax.random.PRNGKey(0)``).
      krylov: Lanczos cycle length (0 or >= 2).

    Returns:
      Scalar ||A||_sigma in kernel's dtype (a lower bound that converges from below).
    """
    kernel = jnp.asarray(kernel)
    strides = _pair(strides, "strides")
    padding = _padding(padding)
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3 or kernel.ndim != 4 or kernel.shape[2] != input_shape[2]:
        raise ValueError(
            f"conv_operator_norm: kernel {kernel.shape} (kh, kw, C_in, C_out) does not match "
            f"input_shape {input_shape} (H, W, C_in)"
        )
    key = jax.random.PRNGKey(0) if key is None else key
    _check_krylov(krylov)
    return _conv_operator_norm(kernel, key, input_shape, strides, padding, float(tol), int(max_iters), int(krylov))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7))
def _conv_operator_norm(kernel, key, input_shape, strides, padding, tol, max_iters, krylov):
    v0 = jax.random.normal(key, input_shape, kernel.dtype)
    matvec = functools.partial(_conv, kernel=kernel, strides=strides, padding=padding)
    rmatvec = _transpose_of(matvec, v0)
    sigma, _, _, _, _ = _power_iteration(matvec, rmatvec, v0, min_iters=2, max_iters=max_iters, tol=tol,
                                         krylov=krylov)
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
# Certified upper bounds
# ----------------------------------------------------------------------------------------------


def gram_upper_bound(mats: jax.Array, iters: int = 6) -> jax.Array:
    """Certified upper bound of the largest singular value of each matrix (Gram iteration, Delattre et al. 2023).

    ``sigma_1(W)^(2^t) = sigma_1(G_t)`` with ``G_0 = W``, ``G_{t+1} = G_t^H G_t``, and ``sigma_1 <= ||.||_F``; the
    iterates are rescaled by their Frobenius norm (tracked in log space), so nothing overflows.

    Args:
      mats: [..., m, n] real or complex. iters: t >= 0 (the bound tightens quadratically in t; the worst case,
        equal singular values, is loose by a factor min(m, n)^(1/2^t)).

    Returns:
      [...] real upper bounds (>= the largest singular value in exact arithmetic).
    """
    g = mats
    if g.shape[-2] < g.shape[-1]:  # the smaller Gram side: same sigma_1
        g = jnp.swapaxes(g, -1, -2)
    real_dtype = jnp.real(g).dtype
    log_c = jnp.zeros(g.shape[:-2], real_dtype)
    for _ in range(iters):
        f = jnp.sqrt(jnp.sum(jnp.abs(g) ** 2, axis=(-2, -1)))
        ok = f > 0
        fs = jnp.where(ok, f, 1)
        g = g / fs[..., None, None].astype(g.dtype)
        # Entries below 1e-20 of the (unit) Frobenius norm -- far below float rounding -- are set to 0: the
        # repeated squaring would otherwise turn them into subnormals, which x86 CPUs process ~100x slower
        # (measured: a LeNet norm evaluation after training took 4 s instead of tens of ms).
        g = jnp.where(jnp.abs(g) < 1e-20, jnp.zeros((), g.dtype), g)
        log_c = 2 * (log_c + jnp.log(fs))
        g = jnp.matmul(jnp.conj(jnp.swapaxes(g, -1, -2)), g, precision=_HI)
    f = jnp.sqrt(jnp.sum(jnp.abs(g) ** 2, axis=(-2, -1)))
    return jnp.where(f > 0, jnp.exp((log_c + jnp.log(jnp.where(f > 0, f, 1))) / 2 ** iters), 0)


def conv_upper_bound(kernel, input_shape, strides=1, padding="SAME", *, gram_iters: int = 6) -> jax.Array:
    """Certified upper bound of ``||A||_sigma`` for the zero-padded, strided conv: the circular embedding
    (``conv_bound="circulant"``, module docstring; :func:`conv_bound_holds` is the exact test).

    Args:
      kernel: [kh, kw, C_in, C_out]; input_shape: (H, W, C_in); strides, padding: as :func:`conv_operator_norm`.
      gram_iters: Gram iterations per frequency.

    Returns:
      Scalar upper bound (the circular polyphase embedding's norm, bounded by Gram iteration).
    """
    kernel = jnp.asarray(kernel)
    strides = _pair(strides, "strides")
    padding = _padding(padding)
    kh, kw, cin, cout = kernel.shape
    h, w = int(input_shape[0]), int(input_shape[1])
    (lo_h, hi_h), (lo_w, hi_w) = explicit_pads((h, w), (kh, kw), strides, padding)
    sh, sw = strides
    mh, mw = -(-(h + lo_h + hi_h) // sh), -(-(w + lo_w + hi_w) // sw)
    ku, kv = -(-kh // sh), -(-kw // sw)
    # Polyphase kernel: Kp[u, v, (a, b, c), o] = K[s u + a, s v + b, c, o] (0 outside the kernel).
    kp = jnp.pad(kernel, ((0, ku * sh - kh), (0, kv * sw - kw), (0, 0), (0, 0)))
    kp = kp.reshape(ku, sh, kv, sw, cin, cout).transpose(0, 2, 1, 3, 4, 5).reshape(ku, kv, sh * sw * cin, cout)
    # A real kernel's DFT has K(-f) = conj K(f): half of the frequencies suffice (rfft).
    spec = jnp.fft.rfftn(kp, s=(mh, mw), axes=(0, 1))  # [mh, mw//2+1, C, C_out]
    return jnp.max(gram_upper_bound(spec.reshape(-1, sh * sw * cin, cout), gram_iters))


# ----------------------------------------------------------------------------------------------
# Exact certificate for zero-padded convs: block-tridiagonal Cholesky of gamma^2 I - Gram
# ----------------------------------------------------------------------------------------------


class _GramPlan(NamedTuple):
    """Static description of one Gram matrix of the unrolled conv (see :func:`_gram_plan`)."""

    side: str  # "in": G = A^T A on the input (H, W, C_in); "out": G = A A^T on the output (H_o, W_o, C_out)
    shifts: tuple  # ((dh, dw), ...): partner tap of tap t at G[p, p + offset] is t + shift
    offsets: tuple  # ((oh, ow), ...) the position offsets, same order as shifts
    mask: Any  # numpy [n_pos, kh * kw]: 1 where tap t of position p is counted
    rows: int  # position rows of the Gram side (H or H_out)
    cols: int  # position columns (W or W_out)
    block_rows: int  # position rows per Cholesky block (>= the largest row offset)
    blocks: int
    idx_diag: Any  # numpy [blocks, b, b] into the flattened [n_pos * n_off] kernel table (+1 zero sentinel)
    idx_sub: Any  # numpy [blocks, b, b]: G[block i + 1, block i]


def _axis_tables(n_in, n_out, k, s, lo, side):
    """Per spatial axis: ({offset: tap shift}, mask [n_pos, k]) of one side's Gram."""
    if side == "in":  # G[p, p + d] = sum over taps t (read by a common output o) of K[t] K[t + d]^T
        n_pos = n_in
        shifts = {d: d for d in range(-(k - 1), k)}
        mask = [[int((p + lo - t) % s == 0 and 0 <= (p + lo - t) // s < n_out) for t in range(k)]
                for p in range(n_pos)]
    else:  # G[o, o + e] = sum over taps t (reading a common input p) of K[t]^T K[t - s e]
        n_pos = n_out
        shifts = {e: -s * e for e in range(-((k - 1) // s), (k - 1) // s + 1)}
        mask = [[int(0 <= o * s + t - lo < n_in) for t in range(k)] for o in range(n_pos)]
    return n_pos, shifts, mask


@functools.lru_cache(maxsize=None)
def _gram_plan(kernel_shape, input_shape, strides, padding, side) -> _GramPlan:
    import numpy as np  # static index arithmetic only

    kh, kw, cin, cout = kernel_shape
    h, w = int(input_shape[0]), int(input_shape[1])
    (lo_h, hi_h), (lo_w, hi_w) = explicit_pads((h, w), (kh, kw), strides, padding)
    sh, sw = strides
    ho, wo = (h + lo_h + hi_h - kh) // sh + 1, (w + lo_w + hi_w - kw) // sw + 1
    nr, shifts_h, mask_h = _axis_tables(h, ho, kh, sh, lo_h, side)
    nc, shifts_w, mask_w = _axis_tables(w, wo, kw, sw, lo_w, side)
    offsets = tuple((a, b) for a in shifts_h for b in shifts_w)
    shifts = tuple((shifts_h[a], shifts_w[b]) for a, b in offsets)
    mask = (np.asarray(mask_h, np.float32)[:, None, :, None] * np.asarray(mask_w, np.float32)[None, :, None, :])
    mask = mask.reshape(nr * nc, kh * kw)
    max_off = max(abs(a) for a in shifts_h)
    br = max(1, max_off)
    blocks = -(-nr // br)
    off_index = {o: j for j, o in enumerate(offsets)}
    n_off = len(offsets)
    sentinel = nr * nc * n_off

    def index(rows_a, rows_b):
        """[len(rows_a) * nc, len(rows_b) * nc] indices of G[a, b] for position rows a (block i) and b."""
        out = np.full((len(rows_a) * nc, len(rows_b) * nc), sentinel, np.int64)
        for ia, ra in enumerate(rows_a):
            for ib, rb in enumerate(rows_b):
                if ra >= nr or rb >= nr:
                    continue
                for ca in range(nc):
                    for cb in range(nc):
                        j = off_index.get((rb - ra, cb - ca))
                        if j is not None:
                            out[ia * nc + ca, ib * nc + cb] = (ra * nc + ca) * n_off + j
        return out

    rows = [list(range(i * br, (i + 1) * br)) for i in range(blocks)]
    idx_diag = np.stack([index(r, r) for r in rows])
    idx_sub = np.stack([index(rows[i + 1], rows[i]) if i + 1 < blocks else
                        np.full((br * nc, br * nc), sentinel, np.int64) for i in range(blocks)])
    return _GramPlan(side, shifts, offsets, mask, nr, nc, br, blocks, idx_diag.astype(np.int32),
                     idx_sub.astype(np.int32))


def _gram_cost(plan: _GramPlan, channels: int) -> int:
    return plan.blocks * (plan.block_rows * plan.cols * channels) ** 3


def _cheapest_gram_plan(kernel_shape, input_shape, strides, padding) -> _GramPlan:
    """The side (A^T A or A A^T) whose block Cholesky costs less: blocks * (block size)^3."""
    plans = [(_gram_cost(p, c), i, p) for i, (p, c) in enumerate((
        (_gram_plan(kernel_shape, input_shape, strides, padding, "in"), kernel_shape[2]),
        (_gram_plan(kernel_shape, input_shape, strides, padding, "out"), kernel_shape[3])))]
    return min(plans)[2]


def _gram_kernel_table(kernel, plan: _GramPlan) -> jax.Array:
    """[n_pos * n_off + 1, C, C]: the Gram block G[p, p + offset] for every position p and offset, then a zero.

    ``G[p, p + d] = sum_t mask[p, t] K[t] K[t + shift(d)]^T`` (input side, ``K[t]`` = [C_in, C_out]) or with
    ``K[t]^T`` (output side); taps outside the kernel are zero.
    """
    kh, kw, cin, cout = kernel.shape
    k = kernel if plan.side == "in" else jnp.swapaxes(kernel, 2, 3)  # [kh, kw, C, C_other]
    ph, pw = max(abs(s[0]) for s in plan.shifts), max(abs(s[1]) for s in plan.shifts)
    kp = jnp.pad(k, ((ph, ph), (pw, pw), (0, 0), (0, 0)))
    pairs = []
    for dh, dw in plan.shifts:
        partner = kp[ph + dh: ph + dh + kh, pw + dw: pw + dw + kw]
        pairs.append(jnp.einsum("hwco,hwdo->hwcd", k, partner, precision=_HI).reshape(kh * kw, k.shape[2], -1))
    pair = jnp.stack(pairs, axis=1)  # [taps, n_off, C, C]
    table = jnp.einsum("pt,tocd->pocd", jnp.asarray(plan.mask, kernel.dtype), pair, precision=_HI)
    c = k.shape[2]
    return jnp.concatenate([table.reshape(-1, c, c), jnp.zeros((1, c, c), kernel.dtype)])


def _block(table, idx):
    b = idx.shape[0]
    c = table.shape[-1]
    return table[idx].transpose(0, 2, 1, 3).reshape(b * c, b * c)


def _one_at_a_time_on_cpu(f):
    """``f(*arrays)`` whose ``jax.vmap`` runs, on the CPU, one batch element at a time (``lax.map``).

    Why: a batched LAPACK factorization on the CPU (jaxlib's ``CholeskyFactorization`` FFI kernel)
    splits its batch over XLA's intra-op thread pool and blocks on the parts; in a program of one of
    several XLA CPU devices (``--xla_force_host_platform_device_count``, the engine's ``--cpu-devices``)
    the parts never run and the process hangs (gdb: ``jax::ParallelBatchMap`` in
    ``BlockingCounter::Wait``; reproduced with 2 devices, a batch of 4 768x768 Cholesky factorizations
    in a ``shard_map``ped scan: it hangs vmapped and finishes in 5 s ``lax.map``ped). One element at a
    time never splits. Other backends keep the batched call (cuSOLVER batches well).
    """
    g = jax.custom_batching.custom_vmap(f)

    @g.def_vmap
    def _rule(axis_size, in_batched, *args):
        full = tuple(a if b else jnp.broadcast_to(a, (axis_size,) + jnp.shape(a)) for a, b in zip(args, in_batched))
        one = lambda xs: g(*xs)  # noqa: E731 -- unbatched inside the map (an outer vmap re-enters the rule)
        out = lax.platform_dependent(*full, cpu=lambda *xs: lax.map(one, xs), default=lambda *xs: jax.vmap(f)(*xs))
        return out, jax.tree.map(lambda _: True, out)

    return g


def _gram_bound_holds(kernel, plan: _GramPlan, gamma) -> jax.Array:
    """True iff ``gamma^2 I - G`` is positive definite (Cholesky succeeds), i.e. ``||A||_sigma < gamma``.

    Batched (``jax.vmap``) one element at a time on the CPU (:func:`_one_at_a_time_on_cpu`).

    G is block tridiagonal in blocks of ``block_rows`` position rows; the Cholesky factorization runs over the
    blocks: ``S_0 = M_00``, ``L_i = chol(S_i)``, ``F_i = M_{i+1,i} L_i^{-T}``, ``S_{i+1} = M_{i+1,i+1} - F_i F_i^T``.
    It succeeds in exact arithmetic iff ``M = gamma^2 I - G`` is positive definite.
    """
    return _one_at_a_time_on_cpu(functools.partial(_gram_bound_holds_one, plan=plan))(
        jnp.asarray(kernel), jnp.asarray(gamma, jnp.asarray(kernel).dtype))


def _gram_bound_holds_one(kernel, gamma, *, plan: _GramPlan) -> jax.Array:
    table = _gram_kernel_table(kernel, plan)
    n = plan.block_rows * plan.cols * table.shape[-1]
    eye = jnp.eye(n, dtype=kernel.dtype)
    g2 = (jnp.asarray(gamma, kernel.dtype) ** 2)

    def step(carry, idx):
        f, ok = carry
        idx_d, idx_s = idx
        s = g2 * eye - _block(table, idx_d) - jnp.matmul(f, f.T, precision=_HI)
        chol = jnp.linalg.cholesky(s)
        good = jnp.all(jnp.isfinite(chol))
        chol = jnp.where(good, chol, eye)
        # F = M_{i+1,i} L^{-T} with M_{i+1,i} = -G_{i+1,i}:  L F^T = -G_{i+1,i}^T.
        f_new = jax.scipy.linalg.solve_triangular(chol, -_block(table, idx_s).T, lower=True).T
        return (f_new, ok & good), None

    (_, ok), _ = lax.scan(step, (jnp.zeros((n, n), kernel.dtype), jnp.asarray(True)),
                          (jnp.asarray(plan.idx_diag), jnp.asarray(plan.idx_sub)))
    return ok & (gamma > 0)


def conv_bound_holds(kernel, input_shape, strides=1, padding="SAME", gamma=1.0) -> jax.Array:
    """Exact test of ``||A||_sigma < gamma`` for the zero-padded, strided conv (no embedding, no approximation).

    ``gamma^2 I - G`` is factorized by a block-tridiagonal Cholesky, G = A^T A or A A^T (whichever is cheaper)
    assembled exactly from the kernel, boundaries included (module docstring, "Certified bounds"). Certified up
    to float rounding (relative ~1e-6 in float32).

    Args:
      kernel: [kh, kw, C_in, C_out]; input_shape: (H, W, C_in); strides, padding: as :func:`conv_operator_norm`.
      gamma: scalar > 0.

    Returns:
      bool scalar.
    """
    kernel = jnp.asarray(kernel)
    strides = _pair(strides, "strides")
    padding = _padding(padding)
    plan = _cheapest_gram_plan(tuple(kernel.shape), tuple(int(s) for s in input_shape), strides, padding)
    return _gram_bound_holds(kernel, plan, gamma)


# ----------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------


def _stateful(layout: Layout) -> tuple[LinearLayer, ...]:
    return tuple(l for l in layout if l.kind in ("conv", "dense"))


def _layout_leaves(variables: Mapping[str, Any], layout: Layout) -> tuple:
    """The arrays the layout reads (kernels, scales, running variances), in layout order, as jnp arrays."""
    out = []
    for layer in layout:
        out.append(jnp.asarray(get_path(variables, layer.path)))
        if layer.var_path is not None:
            out.append(jnp.asarray(get_path(variables, layer.var_path)))
    return tuple(out)


def _from_leaves(leaves: Sequence[Any], layout: Layout) -> dict:
    """Inverse of :func:`_layout_leaves`: a nested dict holding only the layout's paths."""
    root: dict = {}
    it = iter(leaves)

    def put(path, value):
        node = root
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value

    for layer in layout:
        put(layer.path, next(it))
        if layer.var_path is not None:
            put(layer.var_path, next(it))
    return root


def init_norm_state(layout: Layout, key: jax.Array, dtype: Any = jnp.float32,
                    init_variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Power-iteration state for one replica (vmap it, or pass per-replica keys, for R replicas).

    Args:
      layout: the model's layers.
      key: PRNG key of the random start vectors.
      dtype: dtype of the stored vectors.
      init_variables: the replica's variables at initialization (optional): their layout arrays are kept in
        the state (``"init"``) for the distance-from-initialization norms of :func:`norm_zoo` / :func:`evaluate`.

    Returns:
      ``{"v": tuple of unit vectors, one per conv/dense layer in layout order, each of shape
      layer.input_shape; "iters": int32 [n] iterations used at the last evaluation (0 for SVD layers);
      "delta": [n] last relative change of the estimate}`` (+ ``"init"``: tuple of arrays, when given).
      Tuples, not name-keyed dicts, so that layer names with "/" never become checkpoint paths.
    """
    shapes = tuple(tuple(int(d) for d in layer.input_shape) for layer in _stateful(layout))
    state = _init_state(shapes, key, jnp.dtype(dtype))
    if init_variables is not None:
        state["init"] = _layout_leaves(init_variables, layout)
    return state


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
# The operators of Eq. 2: folding normalization layers, stacking attention projections
# ----------------------------------------------------------------------------------------------


class Operator(NamedTuple):
    """One factor A_i of Eq. 2 after folding/stacking: ``layer`` gives its shapes (``kind`` conv/dense/diag),
    ``kernel`` its weights (Flax layout; for diag the scale vector), ``state_index`` the power-iteration
    vector it uses (None for diag)."""

    name: str
    layer: LinearLayer
    kernel: jax.Array
    state_index: int | None


def _fold_scale(variables, layer) -> jax.Array:
    s = jnp.asarray(get_path(variables, layer.path))
    if layer.var_path is not None:
        s = s / jnp.sqrt(jnp.asarray(get_path(variables, layer.var_path)) + layer.eps)
    return s.reshape(-1)


def operators(variables: Mapping[str, Any], layout: Layout, *, norm_layers: str = "fold",
              attention: str = "stacked") -> list[Operator]:
    """The operators A_i of Eq. 2 under the module's conventions (folding and stacking applied), in order.

    Args:
      variables: one replica's variables (jax or numpy arrays).
      layout: the model's layers. norm_layers, attention: see the module docstring.

    Returns:
      list of :class:`Operator`.

    Raises:
      ValueError: a ``fold_into`` name that is not a conv/dense entry, or a scale whose length does not match
        the kernel axis it multiplies.
    """
    _check_choice("norm_layers", norm_layers, NORM_LAYERS)
    _check_choice("attention", attention, ATTENTIONS)
    index = {l.name: i for i, l in enumerate(layout)}
    kernels = {l.name: jnp.asarray(get_path(variables, l.path)) for l in layout if l.kind != "diag"}
    if norm_layers == "fold":
        for i, layer in enumerate(layout):
            if layer.kind != "diag" or not layer.fold_into:
                continue
            s = _fold_scale(variables, layer)
            for target in layer.fold_into:
                if target not in kernels:
                    raise ValueError(f"layer {layer.name!r}: fold_into {target!r} is not a conv/dense entry")
                tl, k = layout[index[target]], kernels[target]
                if index[target] < i:  # the diag scales the target's outputs (BatchNorm after a conv)
                    if math.prod(k.shape[tl.kernel_in_ndim if tl.kind == "dense" else 3:]) != s.shape[0]:
                        raise ValueError(f"layer {layer.name!r}: {s.shape[0]} channels, {target!r} outputs {k.shape}")
                    kernels[target] = k * s.reshape(k.shape[tl.kernel_in_ndim if tl.kind == "dense" else 3:])
                else:  # the target reads the diag's output (pre-LN LayerNorm): scale its input features
                    if tl.kind != "dense" or k.shape[0] != s.shape[0] or tl.kernel_in_ndim != 1:
                        raise ValueError(f"layer {layer.name!r}: cannot fold {s.shape[0]} scales into the "
                                         f"inputs of {target!r} (kernel {k.shape})")
                    kernels[target] = k * s.reshape((-1,) + (1,) * (k.ndim - 1))
    ops: list[Operator] = []
    j = 0
    stacked: dict[str, int] = {}
    for layer in layout:
        if layer.kind == "diag":
            if norm_layers == "include":
                ops.append(Operator(layer.name, layer, _fold_scale(variables, layer), None))
            continue
        k = kernels[layer.name]
        if attention == "stacked" and layer.stack:
            d_in = math.prod(k.shape[: layer.kernel_in_ndim])
            k2 = k.reshape(d_in, -1)
            if layer.stack in stacked:
                pos = stacked[layer.stack]
                prev = ops[pos]
                if prev.layer.input_shape != layer.input_shape or prev.kernel.shape[0] != d_in:
                    raise ValueError(f"stack {layer.stack!r}: {layer.name!r} reads a different input")
                ops[pos] = prev._replace(kernel=jnp.concatenate([prev.kernel, k2], axis=1))
            else:
                stacked[layer.stack] = len(ops)
                ops.append(Operator(layer.stack, dataclasses.replace(layer, name=layer.stack, kernel_in_ndim=1),
                                    k2, j))
        else:
            ops.append(Operator(layer.name, layer, k, j))
        j += 1
    return ops


def operator_names(layout: Layout, *, definition: str = "paper", norm_layers: str = "fold",
                   attention: str = "stacked") -> list[str]:
    """Names of the operators counted in R_A (the keys of ``parts``), in forward order, without any arrays."""
    _validate(definition, norm_layers, "svd", layout, attention)
    if definition == "deep_norm":
        return [l.name for l in layout if l.kind != "diag"]
    names: list[str] = []
    for layer in layout:
        if layer.kind == "diag":
            if norm_layers == "include":
                names.append(layer.name)
        elif attention == "stacked" and layer.stack:
            if layer.stack not in names:
                names.append(layer.stack)
        else:
            names.append(layer.name)
    return names


# ----------------------------------------------------------------------------------------------
# Per-operator norms
# ----------------------------------------------------------------------------------------------


class Reading(NamedTuple):
    """One operator's numbers: ``spec <= ||A||_sigma <= spec_upper``, ``l21`` its (2,1) term, power-iteration
    ``v`` (new state vector), ``iters``, ``delta`` (last relative change) and ``unconverged`` (bool: stopped
    with a certified gap above tol; see the module docstring's stopping rule)."""

    spec: jax.Array
    spec_upper: jax.Array
    l21: jax.Array
    v: Any
    iters: jax.Array
    delta: jax.Array
    unconverged: Any = False


def _l21(rows_sq, cols_sq, n_copies, definition):
    """(2,1) term from squared row/col norms of one block, the block repeated n_copies times (K (x) I_T)."""
    if definition in ("paper", "deep_norm"):
        return jnp.mean(jnp.sqrt(jnp.maximum(rows_sq, 0)))
    if definition == "bartlett":
        return n_copies * jnp.sum(jnp.sqrt(jnp.maximum(rows_sq, 0)))
    return jnp.mean(jnp.sqrt(jnp.maximum(cols_sq, 0)))


def _matrix_norms(mats: Sequence[jax.Array]) -> list[jax.Array]:
    """Largest singular value of each small matrix: sqrt of the top eigenvalue of its smaller Gram matrix.

    All Gram matrices are zero-padded to one size (PSD: padding adds zero eigenvalues only) and go through one
    ``eigvalsh``, mapped over the matrices (and replicas) one at a time on the CPU: batched LAPACK calls
    deadlocked XLA:CPU programs (:func:`_one_at_a_time_on_cpu`). And why not ``jnp.linalg.svd``:
    the batched SVD of LeNet's three dense kernels (R = 4) took 108 ms, this 7 ms; they agreed to 5e-7.
    """
    if not mats:
        return []
    grams = [k.T @ k if k.shape[0] >= k.shape[1] else k @ k.T for k in mats]
    d = max(g.shape[0] for g in grams)
    stack = jnp.stack([jnp.pad(g, ((0, d - g.shape[0]), (0, d - g.shape[0]))) for g in grams])
    # One matrix per LAPACK call on the CPU (a batched call hangs multi-device CPU programs: see
    # _one_at_a_time_on_cpu); the vmap over the stack and any vmap over replicas become maps there.
    top = jax.vmap(_one_at_a_time_on_cpu(lambda g: jnp.linalg.eigvalsh(g)[-1]))(stack)
    return [jnp.sqrt(jnp.maximum(top[i], 0)) for i in range(len(mats))]


def _dense_dims(layer, kernel):
    d_in = math.prod(kernel.shape[: layer.kernel_in_ndim])
    n_in = math.prod(layer.input_shape)
    if d_in == 0 or n_in % d_in:
        raise ValueError(
            f"layer {layer.name!r}: kernel {kernel.shape} with kernel_in_ndim={layer.kernel_in_ndim} "
            f"(d_in={d_in}) does not divide input_shape {layer.input_shape}"
        )
    return d_in, n_in // d_in


def _dense_l21(layer, kernel, definition, reference=None):
    d_in, n_pos = _dense_dims(layer, kernel)
    k2 = kernel.reshape(d_in, -1)
    d_out = k2.shape[1]
    km = k2
    if reference is not None:
        km = k2 - reference.reshape(d_in, -1)
    elif layer.residual and d_in == d_out:
        km = k2 - jnp.eye(d_in, dtype=k2.dtype)
    return _l21(jnp.sum(km * km, axis=0), jnp.sum(km * km, axis=1), n_pos, definition)


def _dense_gram_iters(d, tol, gram_iters):
    """Gram iterations t after which the dense bound is within tol / 4 of sigma_1 even in the worst case.

    On the matrix itself (no embedding), ``||G_t||_F^{1/2^t} <= sigma_1 d^{1/2^{t+1}}`` (d = min(m, n); equality
    when all singular values are equal): ``t = ceil(log2(ln d / ln(1 + tol / 4))) - 1``, at least ``gram_iters``.
    Each step is one d x d matmul (d <= 512 in the paper's models): negligible next to the power iteration.
    """
    if d <= 1:
        return gram_iters
    return max(gram_iters, math.ceil(math.log2(math.log(d) / math.log1p(tol / 4))) - 1)


def _dense_reading(layer, kernel, v, definition, dense_method, pi_kw, gram_iters, spec=None):
    d_in, n_pos = _dense_dims(layer, kernel)
    k2 = kernel.reshape(d_in, -1)
    l21 = _dense_l21(layer, kernel, definition)
    if dense_method == "svd":  # spec: from _matrix_norms over all dense operators at once
        spec = _matrix_norms([k2])[0] if spec is None else spec
        return Reading(spec, spec, l21, v, jnp.zeros((), jnp.int32), jnp.zeros((), v.dtype))
    upper = gram_upper_bound(k2, _dense_gram_iters(min(k2.shape), pi_kw["tol"], gram_iters))
    # Power iteration on K (x) I_T acting on the whole input, v of shape input_shape.
    matvec = lambda x: jnp.matmul(x.reshape(n_pos, d_in), k2, precision=_HI)
    rmatvec = lambda y: jnp.matmul(y, k2.T, precision=_HI).reshape(layer.input_shape)
    # The bound is within tol / 4 of sigma_1: stop on the certified gap only (change_tol 0), not on small changes.
    spec, v_new, it, delta, upper = _power_iteration(matvec, rmatvec, v.astype(k2.dtype), upper=upper,
                                                     change_tol=0.0, **pi_kw)
    tol = pi_kw["tol"]
    stalled = upper > (1 + tol) * spec
    return Reading(spec, jnp.maximum(upper, spec), l21, v_new.astype(v.dtype), it, delta.astype(v.dtype), stalled)


def _exhausted(iters, pi_kw):
    """No further iteration of :func:`_power_iteration` fits in ``max_iters`` (a Krylov cycle takes k + 1)."""
    return iters + _products_per_iteration(pi_kw.get("krylov", 0)) > pi_kw["max_iters"]


def _conv_geometry(layer, kernel):
    strides = _pair(layer.strides, f"layer {layer.name!r} strides")
    padding = _padding(layer.padding)
    if kernel.ndim != 4 or kernel.shape[2] != layer.input_shape[2]:
        raise ValueError(
            f"layer {layer.name!r}: kernel {kernel.shape} (kh, kw, C_in, C_out) does not match "
            f"input_shape {layer.input_shape}"
        )
    return strides, padding


def _conv_l21(layer, kernel, definition, reference=None):
    strides, padding = _conv_geometry(layer, kernel)
    km = kernel
    if reference is not None:
        km = kernel - reference
    elif layer.residual:
        tap = _identity_tap(layer.input_shape, kernel.shape, strides, padding)
        if tap is not None:
            km = kernel.at[tap[0], tap[1]].add(-jnp.eye(kernel.shape[2], dtype=kernel.dtype))
    rows_sq, cols_sq = conv_row_col_sq_norms(km, layer.input_shape, strides, padding)
    return _l21(rows_sq, cols_sq, 1, definition)


def _conv_reading(layer, kernel, v, definition, pi_kw, gram_iters, conv_bound="exact"):
    strides, padding = _conv_geometry(layer, kernel)
    l21 = _conv_l21(layer, kernel, definition)
    upper = conv_upper_bound(kernel, layer.input_shape, strides, padding, gram_iters=gram_iters)
    matvec = functools.partial(_conv, kernel=kernel, strides=strides, padding=padding)
    v0 = v.astype(kernel.dtype)
    rmatvec = _transpose_of(matvec, v0)
    certify = None
    if conv_bound == "exact":
        plan = _cheapest_gram_plan(tuple(kernel.shape), tuple(layer.input_shape), strides, padding)
        certify = lambda gamma: _gram_bound_holds(kernel, plan, gamma)  # noqa: E731
    spec, v_new, it, delta, upper = _power_iteration(matvec, rmatvec, v0, upper=upper, certify=certify, **pi_kw)
    tol = pi_kw["tol"]
    gap_open = upper > (1 + tol) * spec
    stalled = gap_open if certify is not None else _exhausted(it, pi_kw) & (delta > tol) & gap_open
    return Reading(spec, jnp.maximum(upper, spec), l21, v_new.astype(v.dtype), it, delta.astype(v.dtype), stalled)


def _diag_reading(layer, s, definition, v_dtype):
    n_pos = math.prod(layer.input_shape) // s.shape[0]
    sm = s - 1 if layer.residual else s
    spec = jnp.max(jnp.abs(s))
    l21 = _l21(sm * sm, sm * sm, n_pos, definition)
    return Reading(spec, spec, l21, None, jnp.zeros((), jnp.int32), jnp.zeros((), v_dtype))


# ----------------------------------------------------------------------------------------------
# Eq. 2 and the reference implementation's formula
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


def deep_norm_from_parts(spec, l21, *, log: bool = False) -> jax.Array:
    """The reference implementation's combination (``definition="deep_norm"``, module docstring).

    Args:
      spec: [L] ``s_i``; l21: [L] each layer's own ``t_i``; extra leading axes allowed (layer axis last).

    Returns:
      ``prod_i s_i * (sum_i (sum_{j>i} t_j)^{2/3} / s_i^{2/3})^{3/2}`` (or its log).
    """
    spec, l21 = jnp.asarray(spec), jnp.asarray(l21)
    after = jnp.flip(jnp.cumsum(jnp.flip(l21, -1), axis=-1), -1) - l21  # sum_{j>i} t_j; 0 for the last layer
    log_prod = jnp.sum(jnp.log(spec), axis=-1)
    log_sum = 1.5 * jnp.log(jnp.sum(_safe_div(after, spec) ** (2.0 / 3.0), axis=-1))
    out = log_prod + log_sum
    return out if log else jnp.exp(out)


def _deep_norm_readings(variables, layout, v_dtype):
    """Per conv/dense entry (forward order): s_i, t_i of the raw weight reshaped to (in * kh * kw, out)."""
    names, mats = [], []
    for layer in layout:
        if layer.kind == "diag":
            continue
        k = jnp.asarray(get_path(variables, layer.path))
        d_in = math.prod(k.shape[:3]) if layer.kind == "conv" else math.prod(k.shape[: layer.kernel_in_ndim])
        names.append(layer.name)
        mats.append(k.reshape(d_in, -1))  # = (PyTorch weight (out, in*kh*kw))^T up to a column permutation
    out = {}
    for name, k2, s in zip(names, mats, _matrix_norms(mats)):
        t = jnp.sum(jnp.sqrt(jnp.sum(k2 * k2, axis=1)))  # PyTorch: sum of the l2 norms of the columns
        out[name] = Reading(s, s, t, None, jnp.zeros((), jnp.int32), jnp.zeros((), v_dtype))
    return out


def _validate(definition, norm_layers, dense_method, layout, attention="stacked"):
    _check_choice("definition", definition, DEFINITIONS)
    _check_choice("norm_layers", norm_layers, NORM_LAYERS)
    _check_choice("dense_method", dense_method, DENSE_METHODS)
    _check_choice("attention", attention, ATTENTIONS)
    names = [l.name for l in layout]
    if len(set(names)) != len(names):
        raise ValueError(f"layer names must be unique; got {names}")


def _readings(variables, layout, state, definition, norm_layers, attention, dense_method, pi_kw, gram_iters,
              conv_bound="exact"):
    """(readings {name: Reading}, lipschitz {name: rho}, new_state)."""
    if state is None:
        state = init_norm_state(layout, jax.random.PRNGKey(0))
    stateful = _stateful(layout)
    if len(state["v"]) != len(stateful):
        raise ValueError(
            f"state has {len(state['v'])} vectors but the layout has {len(stateful)} conv/dense layers; "
            "build it with init_norm_state(layout, key)"
        )
    for j, layer in enumerate(stateful):
        if tuple(state["v"][j].shape) != tuple(layer.input_shape):
            raise ValueError(
                f"state vector {j} has shape {state['v'][j].shape}, layer {layer.name!r} needs {layer.input_shape}"
            )
    v_dtype = state["delta"].dtype
    if definition == "deep_norm":
        readings = _deep_norm_readings(variables, layout, v_dtype)
        return readings, {name: 1.0 for name in readings}, state
    new_v, new_it, new_delta = list(state["v"]), list(state["iters"]), list(state["delta"])
    readings, rhos = {}, {}
    ops = operators(variables, layout, norm_layers=norm_layers, attention=attention)
    dense = [o for o in ops if o.layer.kind == "dense"] if dense_method == "svd" else []
    dense_spec = dict(zip([o.name for o in dense], _matrix_norms(
        [o.kernel.reshape(_dense_dims(o.layer, o.kernel)[0], -1) for o in dense])))
    for op in ops:
        if op.layer.kind == "diag":
            r = _diag_reading(op.layer, op.kernel, definition, v_dtype)
        else:
            v = state["v"][op.state_index]
            if op.layer.kind == "dense":
                r = _dense_reading(op.layer, op.kernel, v, definition, dense_method, pi_kw, gram_iters,
                                   dense_spec.get(op.name))
            else:
                r = _conv_reading(op.layer, op.kernel, v, definition, pi_kw, gram_iters, conv_bound)
            new_v[op.state_index] = r.v
            new_it[op.state_index] = r.iters
            new_delta[op.state_index] = r.delta.astype(v_dtype)
        readings[op.name] = r
        rhos[op.name] = op.layer.lipschitz
    new_state = {**state, "v": tuple(new_v), "iters": jnp.stack(new_it).astype(jnp.int32) if new_it else state["iters"],
                 "delta": jnp.stack(new_delta) if new_delta else state["delta"]}
    return readings, rhos, new_state


def _combine(readings, rhos, definition, which, log):
    names = list(readings)
    if not names:
        raise ValueError("spectral_complexity: the layout has no layer to count")
    spec = [getattr(readings[n], which) for n in names]
    dtype = jnp.result_type(*spec)
    spec = jnp.stack([s.astype(dtype) for s in spec])
    l21 = jnp.stack([readings[n].l21.astype(dtype) for n in names])
    if definition == "deep_norm":
        return deep_norm_from_parts(spec, l21, log=log)
    return complexity_from_parts(spec, l21, jnp.asarray([rhos[n] for n in names], dtype), log=log)


# ----------------------------------------------------------------------------------------------
# Norm zoo
# ----------------------------------------------------------------------------------------------

ZOO = ("frob_prod", "spec_prod", "group21", "dist_frob", "dist_spectral", "path_l2")


def _path_norm_variables(variables, layout):
    """Variables of the l2 path norm's forward pass: kernels and normalization scales squared (BN folded first),
    every additive parameter (biases, BN means, ViT class token and position embeddings) 0, BN variances 1 - eps."""
    bn = {l.path[:-1]: l for l in layout if l.kind == "diag" and l.var_path is not None}

    def walk(node, path):
        if not isinstance(node, Mapping):
            return jnp.asarray(node)
        out = {}
        for key, val in node.items():
            p = path + (key,)
            if isinstance(val, Mapping):
                out[key] = walk(val, p)
            elif key == "kernel":
                out[key] = jnp.asarray(val) ** 2
            elif key in ("bias", "mean"):
                out[key] = jnp.zeros_like(jnp.asarray(val))
            elif key == "var" and p[0] == "batch_stats":
                layer = next((l for l in bn.values() if l.var_path == p), None)
                out[key] = jnp.full_like(jnp.asarray(val), 1.0 - (layer.eps if layer else 0.0))
            elif key == "scale" and p[1:-1] and ("params",) + p[1:-1] in bn:
                layer = bn[("params",) + p[1:-1]]
                out[key] = _fold_scale(variables, layer).reshape(jnp.shape(val)) ** 2
            elif key == "scale":
                out[key] = jnp.asarray(val) ** 2
            else:  # additive: a path starts at an input unit, so constants carry no path weight
                out[key] = jnp.zeros_like(jnp.asarray(val))
        return out

    return walk(variables, ())


def _layernorm_as_affine(next_fun, args, kwargs, context):
    """Flax method interceptor: ``nn.LayerNorm`` applies only its affine part ``x * scale + bias``."""
    if isinstance(context.module, nn.LayerNorm) and context.method_name == "__call__":
        params = context.module.variables.get("params", {})
        y = args[0]
        if "scale" in params:
            y = y * params["scale"]
        if "bias" in params:
            y = y + params["bias"]
        return y
    return next_fun(*args, **kwargs)


def path_norm(variables, layout, apply_fn, input_shape) -> jax.Array:
    """l2 path norm sqrt(sum_k f_{w^2}(1)_k) by one forward pass (Jiang et al. 2019; module docstring).

    The forward pass is ``apply_fn`` on the all-ones input [1, H, W, C] with :func:`_path_norm_variables`, and
    every ``flax.linen.LayerNorm`` replaced by its affine part (``x * scale^2``: the per-token normalization is
    treated as the identity, as eval-mode BatchNorm is its folded affine map).

    Args:
      variables: one replica's variables; layout: the model's layers.
      apply_fn: ``(variables, x [1, H, W, C]) -> logits [1, K]`` (eval mode), built from Flax modules.
      input_shape: (H, W, C) of one example.

    Returns:
      Scalar.
    """
    pv = _path_norm_variables(variables, layout)
    dtype = jnp.result_type(*jax.tree.leaves(pv["params"]))
    with nn.intercept_methods(_layernorm_as_affine):
        out = apply_fn(pv, jnp.ones((1,) + tuple(input_shape), dtype))
    return jnp.sqrt(jnp.sum(out))


def norm_zoo(variables, layout, init_variables=None, *, spec=None, apply_fn=None, input_shape=None,
             definition: str = "paper", norm_layers: str = "fold", attention: str = "stacked") -> dict:
    """The zoo of cheap norms (module docstring) of one replica, one scalar each.

    Args:
      variables: one replica's variables (jax or numpy arrays); layout: the model's layers.
      init_variables: the same replica's variables at initialization (or None: ``dist_*`` are NaN).
      spec: {operator name: ||A_i||_sigma} already computed (e.g. ``parts`` of :func:`spectral_complexity`
        with the same ``norm_layers``/``attention``); None computes them (exact SVD / tight power iteration).
      apply_fn, input_shape: the model's eval-mode forward pass ``(variables, x) -> logits`` and one example's
        shape, for ``path_l2`` (NaN without them).
      definition: (2,1) norm of ``dist_spectral`` ("paper" when "deep_norm").
      norm_layers, attention: which operators (as in :func:`spectral_complexity`; "include" counts diag scales).

    Returns:
      {name: scalar} for every name in ``ZOO``.
    """
    _validate(definition, norm_layers, "svd", layout, attention)
    l21_def = "paper" if definition == "deep_norm" else definition
    ops = operators(variables, layout, norm_layers=norm_layers, attention=attention)
    ops0 = None
    if init_variables is not None:
        ops0 = {o.name: o for o in operators(init_variables, layout, norm_layers=norm_layers, attention=attention)}
    if spec is None:
        readings, _, _ = _readings(variables, layout, None, "paper", norm_layers, attention, "svd",
                                   dict(min_iters=2, max_iters=2000, tol=1e-6, krylov=KRYLOV), 6)
        spec = {n: r.spec for n, r in readings.items()}
    dtype = jnp.result_type(*[o.kernel for o in ops])
    nan = jnp.asarray(jnp.nan, dtype)
    log_frob, log_spec, group, dist_sq, ratios, log_spec_rho = [], [], [], [], [], []
    for o in ops:
        k = o.kernel
        s = jnp.asarray(spec[o.name], dtype)
        log_frob.append(jnp.log(jnp.sqrt(jnp.sum(k * k))))
        log_spec.append(jnp.log(s))
        log_spec_rho.append(jnp.log(s) + math.log(o.layer.lipschitz))
        if o.layer.kind == "diag":
            group.append(jnp.sum(jnp.abs(k)))
        else:
            d_in = math.prod(k.shape[:3]) if o.layer.kind == "conv" else math.prod(k.shape[: o.layer.kernel_in_ndim])
            k2 = k.reshape(d_in, -1)
            group.append(jnp.sum(jnp.sqrt(jnp.sum(k2 * k2, axis=1))))
        if ops0 is not None:
            k0 = ops0[o.name].kernel
            dist_sq.append(jnp.sum((k - k0) ** 2))
            if o.layer.kind == "conv":
                l21 = _conv_l21(o.layer, k, l21_def, reference=k0)
            elif o.layer.kind == "dense":
                l21 = _dense_l21(o.layer, k, l21_def, reference=k0)
            else:
                n_pos = math.prod(o.layer.input_shape) // k.shape[0]
                l21 = _l21((k - k0) ** 2, (k - k0) ** 2, n_pos, l21_def)
            ratios.append(_safe_div(l21, s) ** (2.0 / 3.0))
    out = {
        "frob_prod": jnp.exp(jnp.sum(jnp.stack(log_frob))),
        "spec_prod": jnp.exp(jnp.sum(jnp.stack(log_spec))),
        "group21": jnp.sum(jnp.stack(group)),
        "dist_frob": jnp.sqrt(jnp.sum(jnp.stack(dist_sq))) if ops0 is not None else nan,
        "dist_spectral": (jnp.exp(jnp.sum(jnp.stack(log_spec_rho)) + 1.5 * jnp.log(jnp.sum(jnp.stack(ratios))))
                          if ops0 is not None else nan),
        "path_l2": (path_norm(variables, layout, apply_fn, input_shape).astype(dtype)
                    if apply_fn is not None and input_shape is not None else nan),
    }
    return out


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


class NormResult(NamedTuple):
    """Everything logged at one evaluation of one replica (add a leading R axis under vmap).

    Fields:
      total: R_A from the lower bounds ``spec`` (the reading); total_upper: R_A from ``spec_upper``
        (``total <= R_A <= total_upper``); max_gap: max over operators of ``spec_upper / spec - 1``;
      unconverged: int32, operators whose reading stopped with a certified gap above tol (module docstring,
        "Stopping rule");
      parts: {operator name: {"spec", "spec_upper", "l21"}}; zoo: {name: scalar} (:func:`norm_zoo`; empty when
        not requested); state: the new power-iteration state.
    """

    total: jax.Array
    total_upper: jax.Array
    max_gap: jax.Array
    unconverged: jax.Array
    parts: dict
    zoo: dict
    state: dict


def evaluate(variables, layout, state=None, *, init_variables=None, apply_fn=None, input_shape=None,
             zoo: bool = True, definition: str = "paper", norm_layers: str = "fold", attention: str = "stacked",
             dense_method: str = "svd", conv_bound: str = "exact", min_iters: int = 2, max_iters: int = 500,
             tol: float = 1e-5, gram_iters: int = 6, krylov: int = KRYLOV, log: bool = False) -> NormResult:
    """R_A with its certified interval, the zoo, and the new state, for one replica (pure; vmap for R).

    Args:
      variables: one replica's variables (jax or numpy arrays).
      layout: the model's layers (static: close over it under jit).
      state: from :func:`init_norm_state` or a previous call (warm start), or None (cold start from
        ``init_norm_state(layout, PRNGKey(0))``). Its ``"init"`` arrays, when present, serve as
        ``init_variables``.
      init_variables: variables at initialization, for ``dist_*`` (overrides the state's).
      apply_fn, input_shape: for the zoo's ``path_l2`` (see :func:`norm_zoo`).
      zoo: compute the zoo.
      definition, norm_layers, attention, dense_method: module docstring.
      conv_bound: ``"exact"`` (default) or ``"circulant"``: the certified upper bound of conv norms and its
        stopping rule (module docstring, "Certified bounds").
      min_iters, max_iters, tol: stopping rule (module docstring, "Certified bounds"); iterations count
        products with the operator.
      gram_iters: Gram iterations of the upper bounds.
      krylov: Lanczos cycle length of the power iterations (0: plain power iteration; module docstring).
      log: ``total``/``total_upper`` as log R_A.

    Returns:
      :class:`NormResult`.
    """
    _validate(definition, norm_layers, dense_method, layout, attention)
    _check_choice("conv_bound", conv_bound, CONV_BOUNDS)
    _check_krylov(krylov)
    pi_kw = dict(min_iters=min_iters, max_iters=max_iters, tol=tol, krylov=int(krylov))
    readings, rhos, new_state = _readings(variables, layout, state, definition, norm_layers, attention,
                                          dense_method, pi_kw, gram_iters, conv_bound)
    total = _combine(readings, rhos, definition, "spec", log)
    total_upper = _combine(readings, rhos, definition, "spec_upper", log)
    gaps = jnp.stack([_safe_div(r.spec_upper - r.spec, r.spec) for r in readings.values()])
    unconverged = jnp.sum(jnp.stack([jnp.asarray(r.unconverged) for r in readings.values()]).astype(jnp.int32))
    parts = {n: {"spec": r.spec, "spec_upper": r.spec_upper, "l21": r.l21} for n, r in readings.items()}
    zoo_out = {}
    if zoo:
        if init_variables is None and state is not None and "init" in state:
            init_variables = _from_leaves(state["init"], layout)
        op_readings = readings
        if definition == "deep_norm":  # the zoo is on the operators: read them too, warm-started from the state
            op_readings, _, new_state = _readings(variables, layout, state, "paper", norm_layers, attention,
                                                  dense_method, pi_kw, gram_iters, conv_bound)
        zoo_out = norm_zoo(
            variables, layout, init_variables, spec={n: r.spec for n, r in op_readings.items()},
            apply_fn=apply_fn, input_shape=input_shape, definition=definition,
            norm_layers=norm_layers, attention=attention)
    return NormResult(total, total_upper, jnp.max(gaps), unconverged, parts, zoo_out, new_state)


def spectral_complexity(
    variables: Mapping[str, Any],
    layout: Layout,
    state: Mapping[str, Any] | None = None,
    *,
    definition: str = "paper",
    norm_layers: str = "fold",
    attention: str = "stacked",
    dense_method: str = "svd",
    conv_bound: str = "exact",
    min_iters: int = 2,
    max_iters: int = 500,
    tol: float = 1e-5,
    gram_iters: int = 6,
    krylov: int = KRYLOV,
    log: bool = False,
):
    """Spectral complexity R_A (paper Eq. 2, or the reference implementation's formula) of one replica.

    Args:
      variables: the model's variables (one replica; vmap for R), jax or numpy arrays.
      layout: the model's ``LinearLayer`` tuple (static: close over it under jit).
      state: power-iteration state from :func:`init_norm_state` or a previous call (warm start), or None
        for a cold start from ``init_norm_state(layout, PRNGKey(0))``.
      definition: one of ``DEFINITIONS`` (module docstring; ``"deep_norm"`` = the authors' formula).
      norm_layers: ``"fold"`` (default), ``"exclude"`` or ``"include"`` normalization layers.
      attention: ``"stacked"`` (q, k, v as one operator) or ``"separate"``.
      dense_method: ``"svd"`` (exact) or ``"power"`` for dense spectral norms.
      conv_bound: ``"exact"`` or ``"circulant"`` certified upper bound of conv norms (module docstring).
      min_iters, max_iters, tol, gram_iters, krylov: stopping rule, upper bounds and Lanczos cycle length
        (module docstring).
      log: return log R_A as ``total``.

    Returns:
      (total, parts, new_state): total scalar R_A (or log R_A) from the certified lower bounds; parts
      ``{operator name: {"spec", "spec_upper", "l21"}}``; new_state with the structure of ``state``
      (``iters``/``delta`` report the stopping point). :func:`evaluate` also returns the upper R_A and the zoo.
    """
    r = evaluate(variables, layout, state, zoo=False, definition=definition, norm_layers=norm_layers,
                 attention=attention, dense_method=dense_method, conv_bound=conv_bound, min_iters=min_iters,
                 max_iters=max_iters, tol=tol, gram_iters=gram_iters, krylov=krylov, log=log)
    return r.total, r.parts, r.state


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
        options.get("norm_layers", "fold"),
        options.get("dense_method", "svd"),
        layout,
        options.get("attention", "stacked"),
    )
    f = lambda variables, state=None: spectral_complexity(variables, layout, state, **options)
    if batched:
        f = jax.vmap(f)
    return jax.jit(f) if jit else f

"""CNN (LeNet-5), ResNet-20 and ViT in Flax, as pure, vmappable pytrees.

The paper (Sec. 3.1, App. E) trains "the standard and most simple possible
definitions of the architectures, taken from the original papers", with Adam
(AdamW for ViT), learning rate 1e-3, no weight decay. It used PyTorch, so the
details below follow PyTorch's defaults where the original papers leave a
choice. No dropout, no weight decay anywhere.

Architectures (``size="paper"``; ``size="small"`` in brackets, for CPU tests)
---------------------------------------------------------------------------
cnn    LeNet-5 (LeCun et al. 1998), ReLU + 2x2 max pooling, as in the usual
       PyTorch LeNet. conv1 5x5 -> 6 [4] channels (padding 2 on 28x28 inputs,
       i.e. "SAME", the paper's 28->32 zero padding of MNIST; "VALID" on 32x32),
       maxpool -> conv2 5x5 "VALID" -> 16 [8] -> maxpool -> flatten (5x5x16)
       -> fc1 120 [32] -> fc2 84 [16] -> fc3 K. All layers have biases.
resnet ResNet-20 of He et al. (2016, Sec. 4.2, CIFAR): 3x3 stem conv -> 16,
       three stages of n=3 [1] basic blocks (conv3x3-BN-ReLU-conv3x3-BN, add,
       ReLU) with widths 16/32/64 [4/8/16], the first block of stages 2 and 3
       with stride 2 (explicit padding ((1,1),(1,1)) as PyTorch's padding=1),
       option-A shortcuts (identity; parameter-free stride-2 subsampling + zero
       channel padding where the shape changes), global average pool, dense K.
       Convs have no bias (BN follows). BatchNorm: momentum 0.1 (Flax 0.9),
       eps 1e-5 (PyTorch). ``size="small"`` is ResNet-8.
vit    ViT (Dosovitskiy et al. 2021), small-image version: patch 4 (28x28 ->
       49 tokens, 32x32 -> 64 tokens) by a conv with stride 4 "VALID", a [CLS]
       token, learned position embeddings, depth 6 [2] pre-LN encoder blocks of
       width 64 [16] with 4 [2] heads (head dim 16 [8]) and MLP 128 [32] with
       exact GELU, a final LayerNorm (eps 1e-5) and a dense head on [CLS].

Parameter counts (trainable "params" only; ResNet "batch_stats" hold 2x its
BN channels more: 1,376 for ResNet-20, 120 for ResNet-8):

==========  ======================  ==========  ===========
model       input, classes          paper       small
==========  ======================  ==========  ===========
cnn         28x28x1, 10             61,706      8,042
cnn         32x32x3, 10             62,006      8,242
cnn         32x32x3, 100            69,656      9,772
resnet      28x28x1, 10             269,434     4,934
resnet      32x32x3, 10             269,722     5,006
resnet      32x32x3, 100            275,572     6,536
vit         28x28x1, 10             205,962     5,738
vit         32x32x3, 10             208,970     6,490
vit         32x32x3, 100            214,820     8,020
==========  ======================  ==========  ===========

(The test module recomputes these from closed-form formulas.)

Initialisation follows PyTorch's defaults, since the paper used PyTorch:
``nn.Conv2d``/``nn.Linear`` weights and biases U(-1/sqrt(fan_in),
1/sqrt(fan_in)); ResNet convs Kaiming-normal (He et al. 2015, as the CIFAR
ResNets); attention q/k/v Xavier-uniform with zero biases (``nn.MultiheadAttention``);
[CLS] and position embeddings N(0, 0.02^2).

Layout (``Model.layout``) lists every linear operator in forward order for the
spectral complexity (paper Eq. 2): convs and dense kernels, LayerNorm scales and
BatchNorm scales (kind ``"diag"``; BatchNorm ones with ``var_path`` to the
running variance and ``eps``). ``residual=True`` marks every operator on a
residual branch whose shortcut is the identity (ResNet blocks without
downsampling: conv1, bn1, conv2, bn2; every ViT encoder sub-block: ln, q, k, v,
out, mlp1, mlp2). ``lipschitz`` is 1 everywhere: ReLU and max pooling are
1-Lipschitz; for GELU (true Lipschitz constant ~1.129) and softmax attention we
take the paper's rho = 1 (Sec. 3.1 cites only ReLU's value); ``jaxnorm.norms``
may override it. Each BatchNorm entry names the conv that feeds it and each
LayerNorm the layers that read it (``fold_into``: ``jaxnorm.norms`` folds the
scales there by default); q, k, v share a ``stack`` name (counted as one operator
[q; k; v] by default).

Convolution implementations (``conv_impl``), same parameters and paths for all:
  "xla"      ``lax.conv_general_dilated``; max pooling by ``reduce_window``.
  "canonical" the same convolution with a custom VJP that states both gradient convs
             in XLA:CPU's fast form (NHWC x HWIO -> NHWC, explicit transposes):
             inside a rolled loop (the engine's scan over steps, lax.map over
             replicas) XLA:CPU leaves JAX's gradient convs in their raw form and runs
             them 17-25x slower (``canonical_conv``). A stride stays a dilation of the
             gradient convs (no zero-interleaved cotangent), and a conv with <= 16
             channels gets a zero output channel so XLA:CPU runs it in YNNPACK.
  "patches"  shifted strided slices of the padded input concatenated along
             channels (kh*kw*C, in two concatenates of kw and kh slices), then one
             matmul with the kernel reshaped to (kh*kw*C, C_out); 2x2 max pooling by
             reshape + max. Under ``jax.vmap`` over replicas this is a batched matmul
             instead of a grouped convolution.
  "im2col"   ``lax.conv_general_dilated_patches`` + matmul (pooling as "patches").
  "phase"    LeNet-5 only: channels-first conv -> max pool -> bias -> ReLU blocks
             (``ConvPoolReLU``); conv1's patch columns ordered by pooling-window
             position so the pooling and its gradient are block-wise.
  "auto"     on CPU "phase" for cnn, "canonical" for resnet, "patches" for vit; "xla"
             on GPU/TPU
             (resolved by ``get_model`` from ``jax.default_backend()``).
bench/bench_conv.py on the 2-core CPU (one run, quiet machine; LeNet-5, batch 64 per
replica, Adam step, one dispatch per step; images/s at R = 1 / 16 replicas): plain
Flax model 11,555 (R = 1); lax.map over replicas: "xla" 2,719 / 2,766, "patches"
16,019 / 17,020, "phase" 27,829 / 29,638; vmap: "xla" 9,405 / 2,845, "patches"
16,676 / 6,394, "im2col" 3,475 / 2,436, "phase" 17,456 / 8,259. Building conv1's
patches with one concatenate of 25 slices took 681 us, with two of 5 slices 226 us,
channels-first 148 us.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm.layout import Layout, LinearLayer

ModuleDef = Any  # a Flax module class or a functools.partial of one

MODELS = ("cnn", "resnet", "vit")
SIZES = ("paper", "small")
CONV_IMPLS = ("auto", "xla", "canonical", "patches", "im2col", "phase")
INPUT_SHAPES = ((28, 28, 1), (32, 32, 3))

BN_MOMENTUM = 0.9  # Flax convention; = PyTorch momentum 0.1
BN_EPS = 1e-5  # PyTorch default
LN_EPS = 1e-5  # PyTorch default
GELU_LIPSCHITZ = 1.0  # the paper's rho = 1 approximation; exact GELU constant is ~1.1289

WIDTHS = {
    "cnn": {"paper": dict(conv=(6, 16), fc=(120, 84)), "small": dict(conv=(4, 8), fc=(32, 16))},
    "resnet": {"paper": dict(widths=(16, 32, 64), blocks=3), "small": dict(widths=(4, 8, 16), blocks=1)},
    "vit": {
        "paper": dict(patch=4, dim=64, depth=6, heads=4, mlp=128),
        "small": dict(patch=4, dim=16, depth=2, heads=2, mlp=32),
    },
}


# --------------------------------------------------------------------------- #
# Initialisers (PyTorch defaults)
# --------------------------------------------------------------------------- #
# kaiming_uniform_(a=sqrt(5)) of nn.Linear / nn.Conv2d is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
he_normal_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal", in_axis=(0, 1, 2), out_axis=3)


def torch_bias_init(fan_in: int) -> Callable:
    """PyTorch's bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# --------------------------------------------------------------------------- #
# Convolutions and pooling
# --------------------------------------------------------------------------- #
def resolve_conv_impl(conv_impl: str, backend: str | None = None, arch: str = "cnn") -> str:
    """Maps ``"auto"`` to the fastest implementation for the backend and architecture.

    Args:
      conv_impl: one of ``CONV_IMPLS``.
      backend: ``"cpu"``, ``"gpu"``, ``"tpu"``...; default ``jax.default_backend()``.
      arch: one of ``MODELS``; "phase" exists for "cnn" only.

    Returns:
      ``"xla"``, ``"patches"``, ``"im2col"`` or ``"phase"``.
    """
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl={conv_impl!r}; allowed: {CONV_IMPLS}")
    if conv_impl == "phase" and arch != "cnn":
        raise ValueError(f"conv_impl='phase' is LeNet-5's conv->pool blocks, not {arch!r}; allowed for "
                         f"{arch!r}: {tuple(c for c in CONV_IMPLS if c != 'phase')}")
    if conv_impl != "auto":
        return conv_impl
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return "xla"
    # Measured in bench/bench_engine.py (and bench/bench_conv.py): LeNet-5's memory-bound
    # pooling and patch copies are fastest channels-first ("phase"); ResNet-20's 3x3 convs in
    # XLA's own form with a loop-friendly VJP ("canonical"); the ViT's one patch embedding is a
    # reshape + matmul ("patches").
    return {"cnn": "phase", "resnet": "canonical"}.get(arch, "patches")


def explicit_pads(spatial: Sequence[int], window: Sequence[int], strides: Sequence[int], padding) -> list:
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID"):
            raise ValueError(f"padding={padding!r}; allowed: 'SAME', 'VALID' or ((lo, hi), (lo, hi))")
        return [tuple(p) for p in jax.lax.padtype_to_pads(tuple(spatial), tuple(window), tuple(strides), padding)]
    return [tuple(int(v) for v in p) for p in padding]


def conv2d(x: jax.Array, kernel: jax.Array, strides=(1, 1), padding="SAME", impl: str = "xla") -> jax.Array:
    """2-D convolution (cross-correlation, as ``flax.linen.Conv``), no bias.

    Args:
      x: [B, H, W, C_in].
      kernel: [kh, kw, C_in, C_out].
      strides: (sh, sw).
      padding: "SAME", "VALID" or ((lo, hi), (lo, hi)); zero padding.
      impl: "xla", "patches" or "im2col" (see the module docstring); all three
        compute the same function.

    Returns:
      [B, H_out, W_out, C_out].
    """
    kh, kw, cin, cout = kernel.shape
    strides = tuple(int(s) for s in strides)
    pads = explicit_pads(x.shape[1:3], (kh, kw), strides, padding)
    # lax.conv_general_dilated wants one dtype (the matmul formulations promote): float64 variables
    # (jax_enable_x64) on float32 images, say.
    dtype = jnp.result_type(x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if impl == "xla":
        return jax.lax.conv_general_dilated(
            x, kernel, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    if impl == "canonical":
        return canonical_conv(x, kernel, strides, tuple(pads))
    if impl == "im2col":
        # Feature order of the patches is (C_in, kh, kw) (see lax docs: "c" + rhs spatial).
        p = jax.lax.conv_general_dilated_patches(
            x, (kh, kw), strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return p @ kernel.transpose(2, 0, 1, 3).reshape(cin * kh * kw, cout)
    if impl == "patches":
        return _patches(x, (kh, kw), strides, pads) @ kernel.reshape(kh * kw * cin, cout)
    raise ValueError(f"conv impl={impl!r}; allowed: ('xla', 'canonical', 'patches', 'im2col')")


# "canonical": XLA convolutions whose gradient convolutions XLA:CPU can run fast inside loops
# --------------------------------------------------------------------------- #
# JAX differentiates a conv into two more convs: the input gradient (lhs-dilated by the stride,
# window-reversed) and the kernel gradient (batch and feature dimensions exchanged,
# dim_labels f01b_i01o->01bf). Outside loops XLA:CPU's conv canonicalization rewrites both into
# its one fast form (NHWC x HWIO -> NHWC, handed to Eigen or YNNPACK); inside a while loop
# (lax.scan over steps, lax.map over replicas) it does not, and the generic emitter runs them
# 17-25x slower (measured: 4 scanned Adam-free steps of one 64x28x28x16 3x3 conv: 1139 ms
# rolled, 46 ms unrolled). This VJP states both gradient convs in the fast form itself, with
# explicit transposes, so a rolled loop costs what the unrolled one does. A strided conv's
# gradients keep its stride as a dilation (lhs dilation for the input gradient, rhs dilation
# for the kernel gradient) instead of zero-interleaving the cotangent, which made them do s^2
# times the work (ResNet-20's two stride-2 convs, one core: input gradients 5.6 / 4.7 ms ->
# 2.2 / 1.3 ms, kernel gradient 6.5 -> 2.7 ms). Values and gradients equal lax's (tests).
DN_NHWC = ("NHWC", "HWIO", "NHWC")
# XLA:CPU hands a convolution to YNNPACK only when max(C_in, C_out) > 16 (xla/backends/cpu/
# ynn_support.cc, IsConvolutionOpSupportedByYnn: a small-conv workaround) and without lhs
# dilation; at <= 16 channels Eigen runs it at about half the rate (ResNet-20's 16-channel 3x3
# convs, 64x28x28, one core: 4.7 ms Eigen; 3.7 ms with C_out zero-padded to 17, YNNPACK).
# So such convs get one zero output channel, sliced off: exact, ~6 % more multiply-adds.
YNN_MIN_FEATURES = 17


def _fast_form_conv(lhs: jax.Array, rhs: jax.Array, pads, strides=(1, 1), lhs_dilation=(1, 1),
                    rhs_dilation=(1, 1)) -> jax.Array:
    """``lax.conv_general_dilated`` in XLA:CPU's fast form (NHWC x HWIO -> NHWC)."""
    cout = rhs.shape[3]
    pad_out = tuple(lhs_dilation) == (1, 1) and max(rhs.shape[2], cout) < YNN_MIN_FEATURES
    if pad_out:
        rhs = jnp.pad(rhs, ((0, 0), (0, 0), (0, 0), (0, YNN_MIN_FEATURES - cout)))
    y = jax.lax.conv_general_dilated(lhs, rhs, tuple(strides), tuple(pads), lhs_dilation=tuple(lhs_dilation),
                                     rhs_dilation=tuple(rhs_dilation), dimension_numbers=DN_NHWC)
    return y[..., :cout] if pad_out else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def canonical_conv(x: jax.Array, kernel: jax.Array, strides: tuple, pads: tuple) -> jax.Array:
    """``lax.conv_general_dilated`` (NHWC, HWIO, zero padding ``pads``) with a loop-friendly VJP.

    Args:
      x: [B, H, W, C_in]. kernel: [kh, kw, C_in, C_out]. strides: (sh, sw).
      pads: ((lo, hi), (lo, hi)) explicit zero padding.

    Returns:
      [B, H_out, W_out, C_out], equal to ``lax.conv_general_dilated``.
    """
    return _fast_form_conv(x, kernel, pads, strides)


def _canonical_conv_fwd(x, kernel, strides, pads):
    return canonical_conv(x, kernel, strides, pads), (x, kernel)


def _canonical_conv_bwd(strides, pads, res, g):
    x, kernel = res
    kh, kw = kernel.shape[:2]
    ho, wo = g.shape[1:3]
    # The rows and columns of the padded input that the last window leaves unread (stride > 1):
    # the input gradient there is 0, and the kernel gradient must not read them.
    rest_h = x.shape[1] + pads[0][0] + pads[0][1] - kh - (ho - 1) * strides[0]
    rest_w = x.shape[2] + pads[1][0] + pads[1][1] - kw - (wo - 1) * strides[1]
    # dx: full correlation of the stride-dilated g with the spatially flipped kernel, C_in and
    # C_out exchanged.
    dx_pads = ((kh - 1 - pads[0][0], kh - 1 - pads[0][1] + rest_h), (kw - 1 - pads[1][0], kw - 1 - pads[1][1] + rest_w))
    dx = _fast_form_conv(g, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2), dx_pads, lhs_dilation=strides)
    # dkernel[i, j, ci, co] = sum_{b,h,w} x_pad[b, s h + i, s w + j, ci] g[b, h, w, co]: a conv with
    # C_in as its batch, B as its feature axis and g as a [H, W, B, C_out] kernel dilated by s.
    dk_pads = ((pads[0][0], pads[0][1] - rest_h), (pads[1][0], pads[1][1] - rest_w))
    dk = _fast_form_conv(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), dk_pads, rhs_dilation=strides)
    return dx, dk.transpose(1, 2, 0, 3)


canonical_conv.defvjp(_canonical_conv_fwd, _canonical_conv_bwd)


def _patches(x: jax.Array, window, strides, pads) -> jax.Array:
    """[B, H, W, C] -> [B, H_out, W_out, kh*kw*C], features ordered (kh, kw, C)."""
    kh, kw = window
    sh, sw = strides
    if any(p != (0, 0) for p in pads):
        x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    b, h, w, c = x.shape
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    if (kh, kw) == (sh, sw) and h == ho * kh and w == wo * kw:
        # Non-overlapping windows (ViT patch embedding): a pure reshape.
        x = x.reshape(b, ho, kh, wo, kw, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, ho, wo, kh * kw * c)
    # Two stages of kw and then kh slices: XLA:CPU emits a concatenate of kh*kw operands
    # as a per-element select over all of them, which measured 5-8x slower than two
    # concatenates of kw and kh operands (bench/bench_conv.py). Feature order stays (kh, kw, C).
    xw = jnp.concatenate(
        [jax.lax.slice(x, (0, 0, j, 0), (b, h, j + sw * (wo - 1) + 1, c), (1, 1, sw, 1)) for j in range(kw)],
        axis=-1,
    )
    return jnp.concatenate(
        [jax.lax.slice(xw, (0, i, 0, 0), (b, i + sh * (ho - 1) + 1, wo, kw * c), (1, sh, 1, 1)) for i in range(kh)],
        axis=-1,
    )


def max_pool_2x2(x: jax.Array, impl: str = "xla") -> jax.Array:
    """2x2 max pooling with stride 2, "VALID" (floor), on [B, H, W, C]."""
    if impl == "xla":
        return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2, :]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


# Channels-first conv -> 2x2 max pool -> bias -> ReLU blocks ("phase", LeNet-5 on CPU)
# --------------------------------------------------------------------------- #
# Max pooling commutes with the per-channel bias and with the ReLU (both monotone), so
# relu(pool(conv(x) + b)) = relu(pool(conv(x)) + b) exactly, and the bias and ReLU run on a
# 4x smaller array. Activations are [C, B, H, W]: patches are stacked along the leading
# (feature) axis, so every copy moves whole contiguous rows, and the matmul W^T [C_out, K] @
# P [K, B*H*W] has its long dimension last. XLA:CPU spends most of a small CNN's step on
# the memory-bound ops around the matmuls (patch concatenates, pooling masks); these layouts
# are what bench/bench_conv.py measured fastest.
def _cf_patches(x: jax.Array, window, pads) -> jax.Array:
    """[C, B, H, W] -> [kh*kw*C, B, H_out, W_out] (stride 1), features ordered (kh, kw, C)."""
    kh, kw = window
    x = jnp.pad(x, ((0, 0), (0, 0), tuple(pads[0]), tuple(pads[1])))
    c, b, h, w = x.shape
    ho, wo = h - kh + 1, w - kw + 1
    xw = jnp.stack([x[..., j:j + wo] for j in range(kw)]).reshape(kw * c, b, h, wo)
    return jnp.stack([xw[:, :, i:i + ho] for i in range(kh)]).reshape(kh * kw * c, b, ho, wo)


def _phase_patches(x: jax.Array, window, pads) -> jax.Array:
    """[C, B, H, W] -> [kh*kw*C, 4, B, H_out//2, W_out//2] (stride 1).

    The conv's output positions (2*h2 + dh, 2*w2 + dw) are ordered (dh, dw, b, h2, w2): the
    four positions of each 2x2 pooling window sit in four contiguous blocks, so the pooling
    and its gradient are elementwise over blocks instead of strided gathers. Odd output rows
    or columns are dropped, as "VALID" pooling does.
    """
    kh, kw = window
    x = jnp.pad(x, ((0, 0), (0, 0), tuple(pads[0]), tuple(pads[1])))
    c, b, h, w = x.shape
    h2, w2 = (h - kh + 1) // 2, (w - kw + 1) // 2
    cols = [x[..., p::2] for p in (0, 1)]  # even / odd input columns
    # [kw, C, 2 (dw), B, H, W2]: input column 2*w2 + dw + j = 2*(w2 + o//2) + o%2, o = j + dw.
    s1 = jnp.stack([jnp.stack([cols[(j + dw) % 2][..., (j + dw) // 2:(j + dw) // 2 + w2] for dw in (0, 1)], 1)
                    for j in range(kw)])
    # [kh, kw, C, 2 (dh), 2 (dw), B, H2, W2]: input row 2*h2 + dh + i.
    s2 = jnp.stack([jnp.stack([s1[:, :, :, :, i + dh:i + dh + 2 * h2 - 1:2] for dh in (0, 1)], 2)
                    for i in range(kh)])
    return s2.reshape(kh * kw * c, 4, b, h2, w2)


@jax.custom_vjp
def _max_over_window(y: jax.Array) -> jax.Array:
    """[C, 4, ...] -> [C, ...]: the max over the four positions of each pooling window."""
    return y.max(axis=1)


def _max_over_window_fwd(y):
    m = y.max(axis=1)
    return m, (y, m)


def _max_over_window_bwd(res, g):
    # The gradient goes to the position of the max. Pooling runs before the ReLU here, on
    # pre-activations, where ties have probability zero (autodiff's max would split it).
    y, m = res
    return (jnp.where(y == m[:, None], g[:, None], 0.0),)


_max_over_window.defvjp(_max_over_window_fwd, _max_over_window_bwd)


def _max_pool_cf(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, "VALID" (floor), on [C, B, H, W]."""
    h, w = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
    return jnp.maximum(jnp.maximum(x[:, :, 0:h:2, 0:w:2], x[:, :, 0:h:2, 1:w:2]),
                       jnp.maximum(x[:, :, 1:h:2, 0:w:2], x[:, :, 1:h:2, 1:w:2]))


class ConvPoolReLU(nn.Module):
    """relu(max_pool_2x2(conv(x) + b)) on channels-first x [C, B, H, W] -> [C_out, B, H2, W2].

    Parameters as ``Conv2D`` ("kernel" [kh, kw, C_in, C_out], "bias"; same names, shapes and
    initialisation, so a checkpoint works with every ``conv_impl``); stride 1.
    ``phase=True`` orders the patch columns by pooling-window position (``_phase_patches``):
    fastest where no gradient flows to x (the first layer); ``phase=False`` pools the
    channels-first conv output with strided slices, cheaper when x needs its gradient.
    """

    features: int
    kernel_size: tuple[int, int]
    padding: Any = "SAME"
    phase: bool = False

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel_size
        cin = x.shape[0]
        kernel = self.param("kernel", torch_kernel_init, (kh, kw, cin, self.features))
        bias = self.param("bias", torch_bias_init(kh * kw * cin), (self.features,))
        pads = explicit_pads(x.shape[2:4], (kh, kw), (1, 1), self.padding)
        wt = kernel.reshape(kh * kw * cin, self.features).T
        if self.phase:
            p = _phase_patches(x, (kh, kw), pads)
            y = (wt @ p.reshape(p.shape[0], -1)).reshape(self.features, *p.shape[1:])
            y = _max_over_window(y)
        else:
            p = _cf_patches(x, (kh, kw), pads)
            y = _max_pool_cf((wt @ p.reshape(p.shape[0], -1)).reshape(self.features, *p.shape[1:]))
        return nn.relu(y + bias[:, None, None, None])


# --------------------------------------------------------------------------- #
# Layers
# --------------------------------------------------------------------------- #
class Conv2D(nn.Module):
    """``nn.Conv``-compatible conv ("kernel" [kh, kw, C_in, C_out], "bias") with a choice of impl."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: Any = "SAME"
    use_bias: bool = True
    impl: str = "xla"
    kernel_init: Callable = torch_kernel_init

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel_size
        cin = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (kh, kw, cin, self.features))
        y = conv2d(x, kernel, self.strides, self.padding, self.impl)
        if self.use_bias:
            y = y + self.param("bias", torch_bias_init(kh * kw * cin), (self.features,))
        return y


class Dense(nn.Module):
    """``nn.Dense`` ("kernel" [d_in, d_out], "bias") with PyTorch's ``nn.Linear`` init."""

    features: int

    @nn.compact
    def __call__(self, x):
        d_in = x.shape[-1]
        kernel = self.param("kernel", torch_kernel_init, (d_in, self.features))
        bias = self.param("bias", torch_bias_init(d_in), (self.features,))
        return x @ kernel + bias


# --------------------------------------------------------------------------- #
# Architectures
# --------------------------------------------------------------------------- #
class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling. x: [B, H, W, C] -> [B, K].

    ``conv`` (a ``Conv2D``-compatible module, as flax's imagenet example passes ``conv=nn.Conv``)
    and ``pool`` (2x2 max pooling of [B, H, W, C]) choose the formulation; :class:`LeNet5Phase` is
    the channels-first variant with fused conv -> pool blocks. Same parameters in all.
    """

    num_classes: int
    conv: tuple[int, int] = (6, 16)
    fc: tuple[int, int] = (120, 84)
    conv1_padding: Any = "SAME"
    conv_module: ModuleDef = Conv2D
    pool: Callable = max_pool_2x2

    def features(self, x):
        x = self.conv_module(self.conv[0], (5, 5), padding=self.conv1_padding, name="conv1")(x)
        x = self.pool(nn.relu(x))
        x = self.conv_module(self.conv[1], (5, 5), padding="VALID", name="conv2")(x)
        return self.pool(nn.relu(x))

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.features(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(Dense(self.fc[0], name="fc1")(x))
        x = nn.relu(Dense(self.fc[1], name="fc2")(x))
        return Dense(self.num_classes, name="fc3")(x)


class LeNet5Phase(LeNet5):
    """LeNet-5 with channels-first conv -> max pool -> bias -> ReLU blocks (``ConvPoolReLU``): the
    "phase" formulation, fastest on XLA:CPU (module docstring). Same parameters as :class:`LeNet5`."""

    def features(self, x):
        h = jnp.transpose(x, (3, 0, 1, 2))  # [C, B, H, W]
        h = ConvPoolReLU(self.conv[0], (5, 5), self.conv1_padding, phase=True, name="conv1")(h)
        h = ConvPoolReLU(self.conv[1], (5, 5), "VALID", phase=False, name="conv2")(h)
        return jnp.transpose(h, (1, 2, 3, 0))  # back to [B, H, W, C]: fc1 reads (h, w, c) order


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS, name=name)


class BasicBlock(nn.Module):
    """He et al. (2016) basic block with an option-A (parameter-free) shortcut."""

    features: int
    stride: int = 1
    conv_module: ModuleDef = Conv2D

    @nn.compact
    def __call__(self, x, train: bool = False):
        pad = "SAME" if self.stride == 1 else ((1, 1), (1, 1))  # PyTorch padding=1
        conv = lambda s, p, n: self.conv_module(  # noqa: E731
            self.features, (3, 3), (s, s), p, use_bias=False, kernel_init=he_normal_init, name=n
        )
        y = conv(self.stride, pad, "conv1")(x)
        y = nn.relu(_batch_norm(train, "bn1")(y))
        y = conv(1, "SAME", "conv2")(y)
        y = _batch_norm(train, "bn2")(y)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            # Option A: subsample and zero-pad the new channels (He et al. 2016, Sec. 4.2).
            shortcut = x[:, :: self.stride, :: self.stride, :]
            extra = self.features - x.shape[-1]
            shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        return nn.relu(y + shortcut)


class ResNetCifar(nn.Module):
    """CIFAR ResNet-(6n+2) of He et al. (2016). x: [B, H, W, C] -> [B, K]."""

    num_classes: int
    widths: tuple[int, ...] = (16, 32, 64)
    blocks: int = 3
    conv_module: ModuleDef = Conv2D

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.conv_module(self.widths[0], (3, 3), use_bias=False, kernel_init=he_normal_init, name="conv1")(x)
        x = nn.relu(_batch_norm(train, "bn1")(x))
        for s, width in enumerate(self.widths):
            for b in range(self.blocks):
                stride = 2 if (s > 0 and b == 0) else 1
                x = BasicBlock(width, stride, self.conv_module, name=f"stage{s + 1}_block{b}")(x, train)
        x = x.mean(axis=(1, 2))
        return Dense(self.num_classes, name="fc")(x)


class EncoderBlock(nn.Module):
    """Pre-LN transformer encoder block (Dosovitskiy et al. 2021, Eq. 2-3). x: [B, T, d]."""

    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        y = nn.LayerNorm(epsilon=LN_EPS, name="ln1")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.heads,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.zeros,
            deterministic=True,
            name="attn",
        )(y)
        x = x + y
        y = nn.LayerNorm(epsilon=LN_EPS, name="ln2")(x)
        y = nn.gelu(Dense(self.mlp, name="mlp1")(y), approximate=False)
        return x + Dense(d, name="mlp2")(y)


class ViT(nn.Module):
    """Vision Transformer for small images. x: [B, H, W, C] -> [B, K]."""

    num_classes: int
    patch: int = 4
    dim: int = 64
    depth: int = 6
    heads: int = 4
    mlp: int = 128
    conv_module: ModuleDef = Conv2D

    @nn.compact
    def __call__(self, x, train: bool = False):
        p = self.patch
        x = self.conv_module(self.dim, (p, p), (p, p), "VALID", name="patch_embed")(x)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
        x = x + self.param("pos_embed", nn.initializers.normal(0.02), (1, h * w + 1, d))
        for i in range(self.depth):
            x = EncoderBlock(self.heads, self.mlp, name=f"encoder{i}")(x)
        x = nn.LayerNorm(epsilon=LN_EPS, name="norm")(x)
        return Dense(self.num_classes, name="head")(x[:, 0])


# --------------------------------------------------------------------------- #
# Layouts (built by construction; tests check them against the forward pass)
# --------------------------------------------------------------------------- #
def _conv_out(hw: int, k: int, s: int, padding) -> int:
    if padding == "SAME":
        return -(-hw // s)
    if padding == "VALID":
        return (hw - k) // s + 1
    lo, hi = padding[0]
    return (hw + lo + hi - k) // s + 1


def _cnn_layout(input_shape, num_classes, conv, fc, conv1_padding) -> Layout:
    h, w, c = input_shape
    P = lambda *k: ("params",) + k  # noqa: E731
    layers = [LinearLayer("conv1", "conv", P("conv1", "kernel"), (h, w, c), padding=conv1_padding)]
    h = _conv_out(h, 5, 1, conv1_padding) // 2
    layers.append(LinearLayer("conv2", "conv", P("conv2", "kernel"), (h, h, conv[0]), padding="VALID"))
    h = _conv_out(h, 5, 1, "VALID") // 2
    layers += [
        LinearLayer("fc1", "dense", P("fc1", "kernel"), (h * h * conv[1],)),
        LinearLayer("fc2", "dense", P("fc2", "kernel"), (fc[0],)),
        LinearLayer("fc3", "dense", P("fc3", "kernel"), (fc[1],)),
    ]
    return tuple(layers)


def _bn(name: str, scope: tuple[str, ...], shape, feeder: str) -> LinearLayer:
    # fold_into: the conv that feeds this BatchNorm (jaxnorm.norms folds its eval-mode scale into it).
    return LinearLayer(
        name, "diag", ("params",) + scope + ("scale",), tuple(shape),
        var_path=("batch_stats",) + scope + ("var",), eps=BN_EPS,
        residual=False, fold_into=(feeder,),
    )


def _resnet_layout(input_shape, num_classes, widths, blocks) -> Layout:
    h, w, c = input_shape
    layers = [
        LinearLayer("conv1", "conv", ("params", "conv1", "kernel"), (h, w, c)),
        _bn("bn1", ("bn1",), (h, w, widths[0]), "conv1"),
    ]
    cin = widths[0]
    for s, width in enumerate(widths):
        for b in range(blocks):
            stride = 2 if (s > 0 and b == 0) else 1
            identity = stride == 1 and cin == width
            blk = f"stage{s + 1}_block{b}"
            pad = "SAME" if stride == 1 else ((1, 1), (1, 1))
            layers.append(
                LinearLayer(f"{blk}/conv1", "conv", ("params", blk, "conv1", "kernel"), (h, w, cin),
                            strides=(stride, stride), padding=pad, residual=identity)
            )
            h, w = _conv_out(h, 3, stride, pad), _conv_out(w, 3, stride, pad)
            layers.append(dataclasses.replace(_bn(f"{blk}/bn1", (blk, "bn1"), (h, w, width), f"{blk}/conv1"),
                                              residual=identity))
            layers.append(
                LinearLayer(f"{blk}/conv2", "conv", ("params", blk, "conv2", "kernel"), (h, w, width),
                            residual=identity)
            )
            layers.append(dataclasses.replace(_bn(f"{blk}/bn2", (blk, "bn2"), (h, w, width), f"{blk}/conv2"),
                                              residual=identity))
            cin = width
    layers.append(LinearLayer("fc", "dense", ("params", "fc", "kernel"), (cin,)))
    return tuple(layers)


def _vit_layout(input_shape, num_classes, patch, dim, depth, heads, mlp) -> Layout:
    h, w, c = input_shape
    t = (h // patch) * (w // patch) + 1
    layers = [
        LinearLayer("patch_embed", "conv", ("params", "patch_embed", "kernel"), (h, w, c),
                    strides=(patch, patch), padding="VALID")
    ]
    for i in range(depth):
        e = f"encoder{i}"
        P = lambda *k: ("params", e) + k  # noqa: E731
        layers += [
            # fold_into: the layers that read the LayerNorm's output (its scale is their input-side factor);
            # stack: q, k, v read the same input and may be counted as one operator [q; k; v].
            LinearLayer(f"{e}/ln1", "diag", P("ln1", "scale"), (t, dim), residual=True, eps=LN_EPS,
                        fold_into=(f"{e}/attn/query", f"{e}/attn/key", f"{e}/attn/value")),
            LinearLayer(f"{e}/attn/query", "dense", P("attn", "query", "kernel"), (t, dim), residual=True,
                        stack=f"{e}/attn/qkv"),
            LinearLayer(f"{e}/attn/key", "dense", P("attn", "key", "kernel"), (t, dim), residual=True,
                        stack=f"{e}/attn/qkv"),
            LinearLayer(f"{e}/attn/value", "dense", P("attn", "value", "kernel"), (t, dim), residual=True,
                        stack=f"{e}/attn/qkv"),
            LinearLayer(f"{e}/attn/out", "dense", P("attn", "out", "kernel"), (t, dim), kernel_in_ndim=2,
                        residual=True),
            LinearLayer(f"{e}/ln2", "diag", P("ln2", "scale"), (t, dim), residual=True, eps=LN_EPS,
                        fold_into=(f"{e}/mlp1",)),
            LinearLayer(f"{e}/mlp1", "dense", P("mlp1", "kernel"), (t, dim), residual=True,
                        lipschitz=GELU_LIPSCHITZ),
            LinearLayer(f"{e}/mlp2", "dense", P("mlp2", "kernel"), (t, mlp), residual=True),
        ]
    layers += [
        LinearLayer("norm", "diag", ("params", "norm", "scale"), (t, dim), eps=LN_EPS, fold_into=("head",)),
        LinearLayer("head", "dense", ("params", "head", "kernel"), (dim,)),
    ]
    return tuple(layers)


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class Model:
    """A Flax module with its shapes and linear-operator layout; all methods are pure.

    Attributes:
      name: "cnn", "resnet" or "vit".
      input_shape: (H, W, C) of one example.
      num_classes: K.
      size: "paper" or "small".
      conv_impl: the resolved convolution implementation ("xla", "patches", "im2col", "phase").
      module: the Flax module.
      layout: every linear operator, in forward order (``jaxnorm.layout``).
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    size: str
    conv_impl: str
    module: nn.Module
    layout: Layout

    @property
    def has_batch_stats(self) -> bool:
        return self.name == "resnet"

    def init(self, key: jax.Array) -> dict:
        """Returns the variables: {"params": ...} (+ "batch_stats" for ResNet)."""
        x = jnp.zeros((1,) + tuple(self.input_shape), jnp.float32)
        return dict(self.module.init(key, x, train=False))

    def apply(self, variables: dict, x: jax.Array, train: bool) -> tuple[jax.Array, dict]:
        """Forward pass.

        Args:
          variables: as returned by ``init`` (one replica; vmap for many).
          x: [B, H, W, C] float32.
          train: BatchNorm uses batch statistics and updates its running ones.

        Returns:
          (logits [B, K], new_state) with new_state the non-param collections:
          {} for cnn and vit; {"batch_stats": ...} for resnet (updated when
          ``train``, unchanged otherwise), so ``{**variables, **new_state}``
          is always the next variables dict.
        """
        if not self.has_batch_stats:
            return self.module.apply({"params": variables["params"]}, x, train=train), {}
        if train:
            logits, state = self.module.apply(variables, x, train=True, mutable=["batch_stats"])
            return logits, {"batch_stats": state["batch_stats"]}
        logits = self.module.apply(variables, x, train=False)
        return logits, {"batch_stats": variables["batch_stats"]}


def count_params(variables: dict) -> int:
    """Number of trainable parameters (leaves of variables["params"])."""
    return int(sum(np.prod(v.shape) for v in jax.tree.leaves(variables["params"])))


def get_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    size: str = "paper",
    conv_impl: str = "auto",
) -> Model:
    """Builds one of the paper's architectures.

    Args:
      name: one of ``MODELS`` ("cnn", "resnet", "vit").
      input_shape: (H, W, C), one of ``INPUT_SHAPES``: (28, 28, 1) or (32, 32, 3).
      num_classes: K >= 2 (10 or 100 in the paper).
      size: "paper" (the widths of the module docstring) or "small" (CPU tests).
      conv_impl: one of ``CONV_IMPLS``; "auto" picks per backend.

    Returns:
      A ``Model``.
    """
    if name not in MODELS:
        raise ValueError(f"model name={name!r}; allowed: {MODELS}")
    if size not in SIZES:
        raise ValueError(f"size={size!r}; allowed: {SIZES}")
    try:
        input_shape = tuple(int(v) for v in input_shape)
    except TypeError as err:
        raise ValueError(f"input_shape={input_shape!r}; allowed: {INPUT_SHAPES}") from err
    if input_shape not in INPUT_SHAPES:
        raise ValueError(f"input_shape={input_shape} for model {name!r}; allowed: {INPUT_SHAPES}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r}; allowed: an integer >= 2 (e.g. 10, 100)")
    num_classes = int(num_classes)
    impl = resolve_conv_impl(conv_impl, arch=name)
    cfg = WIDTHS[name][size]
    # The implementation is injected as modules (flax examples/imagenet: conv=nn.Conv), not threaded.
    conv = functools.partial(Conv2D, impl=impl) if impl != "phase" else Conv2D
    if name == "cnn":
        # LeCun et al. padded 28x28 MNIST to 32x32: padding 2 on a 5x5 conv is "SAME".
        pad = "SAME" if input_shape[0] == 28 else "VALID"
        if impl == "phase":
            module = LeNet5Phase(num_classes, cfg["conv"], cfg["fc"], pad)
        else:
            module = LeNet5(num_classes, cfg["conv"], cfg["fc"], pad, conv, functools.partial(max_pool_2x2, impl=impl))
        layout = _cnn_layout(input_shape, num_classes, cfg["conv"], cfg["fc"], pad)
    elif name == "resnet":
        module = ResNetCifar(num_classes, cfg["widths"], cfg["blocks"], conv)
        layout = _resnet_layout(input_shape, num_classes, cfg["widths"], cfg["blocks"])
    else:
        module = ViT(num_classes, conv_module=conv, **cfg)
        layout = _vit_layout(input_shape, num_classes, **cfg)
    return Model(name, input_shape, num_classes, size, impl, module, layout)

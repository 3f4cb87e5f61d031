"""Tests of jaxnorm.models: shapes, parameter counts, layouts, conv implementations, vmap, training."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnorm import models as M
from jaxnorm.layout import get_path

CASES = [((28, 28, 1), 10), ((32, 32, 3), 100), ((32, 32, 3), 10)]


# --------------------------------------------------------------------------- #
# Closed-form parameter counts (from the architecture definitions, not the code)
# --------------------------------------------------------------------------- #
def cnn_params(c, k, conv, fc):
    c1, c2 = conv
    f1, f2 = fc
    # After conv1 (28x28 out for both inputs), pool, conv2 5x5 valid (10x10), pool -> 5x5.
    return (25 * c * c1 + c1) + (25 * c1 * c2 + c2) + (25 * c2 * f1 + f1) + (f1 * f2 + f2) + (f2 * k + k)


def resnet_params(c, k, widths, blocks):
    total = 9 * c * widths[0] + 2 * widths[0]  # stem conv (no bias) + BN scale/bias
    cin = widths[0]
    for w in widths:
        for _ in range(blocks):
            total += 9 * cin * w + 9 * w * w + 2 * 2 * w  # two convs + two BNs; option-A shortcut is free
            cin = w
    return total + widths[-1] * k + k


def resnet_batch_stats(widths, blocks):
    return 2 * (widths[0] + sum(2 * w * blocks for w in widths))


def vit_params(h, w, c, k, patch, dim, depth, heads, mlp):
    t = (h // patch) * (w // patch) + 1
    block = 2 * 2 * dim + 4 * (dim * dim + dim) + (dim * mlp + mlp) + (mlp * dim + dim)
    return (patch * patch * c * dim + dim) + dim + t * dim + depth * block + 2 * dim + dim * k + k


def expected_params(name, size, shape, k):
    cfg = M.WIDTHS[name][size]
    h, w, c = shape
    if name == "cnn":
        return cnn_params(c, k, cfg["conv"], cfg["fc"])
    if name == "resnet":
        return resnet_params(c, k, cfg["widths"], cfg["blocks"])
    return vit_params(h, w, c, k, **cfg)


@functools.lru_cache(maxsize=None)
def replica_variables(name, r=3, shape=(28, 28, 1), k=10):
    """R replicas of a small model (eager vmapped init, shared by tests: random-init compiles are slow)."""
    model = M.get_model(name, shape, k, size="small", conv_impl="xla")
    return jax.vmap(model.init)(jax.random.split(jax.random.key(0), r))


def replica(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def abstract_variables(model):
    return jax.eval_shape(model.init, jax.random.key(0))


# --------------------------------------------------------------------------- #
# Shapes and counts (abstract evaluation: no compilation, so paper sizes are cheap)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("size", M.SIZES)
@pytest.mark.parametrize("name", M.MODELS)
@pytest.mark.parametrize("shape,k", CASES)
def test_output_shapes_and_parameter_counts(name, size, shape, k):
    model = M.get_model(name, shape, k, size=size)
    variables = abstract_variables(model)
    assert M.count_params(variables) == expected_params(name, size, shape, k)
    if name == "resnet":
        cfg = M.WIDTHS[name][size]
        n_stats = sum(math.prod(v.shape) for v in jax.tree.leaves(variables["batch_stats"]))
        assert n_stats == resnet_batch_stats(cfg["widths"], cfg["blocks"])
    else:
        assert set(variables) == {"params"}
    for train in (True, False):
        logits, state = jax.eval_shape(lambda v, x: model.apply(v, x, train), variables, jnp.zeros((5,) + shape))
        assert logits.shape == (5, k)
        assert set(state) == ({"batch_stats"} if name == "resnet" else set())


def test_paper_sizes_match_the_documented_table():
    # The module docstring's table (copied to BUILD.md) must agree with the formulas.
    doc = M.__doc__
    for name in M.MODELS:
        for shape, k in CASES:
            row = [name, "x".join(map(str, shape)) + ",", str(k)]
            line = next(ln for ln in doc.splitlines() if ln.split()[:3] == row)
            paper, small = (int(v.replace(",", "")) for v in line.split()[3:5])
            assert paper == expected_params(name, "paper", shape, k)
            assert small == expected_params(name, "small", shape, k)


# --------------------------------------------------------------------------- #
# Layout
# --------------------------------------------------------------------------- #
def record_calls(model, variables, x, train):
    """Input and output shapes of every module call, keyed by module path (abstractly)."""
    rec = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            rec[context.module.path] = (tuple(args[0].shape), tuple(out.shape))
        return out

    def run(v, x):
        with nn.intercept_methods(interceptor):
            return model.apply(v, x, train)

    jax.eval_shape(run, variables, x)
    return rec


@pytest.mark.parametrize("size", M.SIZES)
@pytest.mark.parametrize("name", M.MODELS)
@pytest.mark.parametrize("shape,k", CASES[:2])
def test_layout_matches_forward_pass(name, size, shape, k):
    # The layout does not depend on conv_impl; "xla" keeps every module's input in [B, H, W, C]
    # ("phase" runs channels-first; it is checked against "xla" below).
    model = M.get_model(name, shape, k, size=size, conv_impl="xla")
    variables = abstract_variables(model)
    b = 3
    rec = record_calls(model, variables, jnp.zeros((b,) + shape), train=True)
    names = [layer.name for layer in model.layout]
    assert len(set(names)) == len(names)
    for layer in model.layout:
        w = get_path(variables, layer.path)
        seen_in, seen_out = rec[layer.path[1:-1]]
        assert seen_in[0] == b
        if layer.kind == "conv":
            assert seen_in[1:] == layer.input_shape
            assert w.ndim == 4 and w.shape[2] == layer.input_shape[-1]
            # Applying the recorded operator to one example gives the activation seen in the forward pass.
            out = jax.eval_shape(
                lambda z, w=w, layer=layer: jax.lax.conv_general_dilated(
                    z[None], w, layer.strides, layer.padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
                ),
                jax.ShapeDtypeStruct(layer.input_shape, jnp.float32),
            )
            assert out.shape[1:] == seen_out[1:]
        elif layer.kind == "dense":
            kin = layer.kernel_in_ndim
            d_in = math.prod(w.shape[:kin])
            assert d_in == layer.input_shape[-1]
            # Per token: the last kin recorded input axes are the operator's input.
            assert seen_in[1 : len(seen_in) - kin] == layer.input_shape[:-1]
            assert math.prod(seen_in[len(seen_in) - kin :]) == d_in
            tokens = layer.input_shape[:-1]
            assert math.prod(seen_out[1:]) == math.prod(tokens) * math.prod(w.shape[kin:])
        else:
            assert layer.kind == "diag"
            assert seen_in[1:] == layer.input_shape
            assert w.shape == (layer.input_shape[-1],)
            if layer.var_path is not None:
                assert get_path(variables, layer.var_path).shape == w.shape
                assert layer.eps == M.BN_EPS
            else:
                assert layer.eps == M.LN_EPS
        assert layer.lipschitz == 1.0
    # Every kernel and every normalizer scale is listed, nothing else.
    leaves = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    linear = {("params",) + tuple(p.key for p in path) for path, _ in leaves if path[-1].key in ("kernel", "scale")}
    assert linear == {layer.path for layer in model.layout}


def test_layout_residual_flags():
    resnet = M.get_model("resnet", (32, 32, 3), 10, size="paper")
    flags = {layer.name: layer.residual for layer in resnet.layout}
    assert flags["stage1_block0/conv1"] and flags["stage1_block2/bn2"] and flags["stage3_block1/conv2"]
    # Downsampling blocks have an option-A (non-identity) shortcut; stem and head are not residual.
    assert not flags["stage2_block0/conv1"] and not flags["stage3_block0/conv2"]
    assert not flags["conv1"] and not flags["bn1"] and not flags["fc"]
    vit = M.get_model("vit", (28, 28, 1), 10, size="small")
    flags = {layer.name: (layer.residual, layer.kernel_in_ndim) for layer in vit.layout}
    assert flags["encoder0/attn/query"] == (True, 1) and flags["encoder1/attn/out"] == (True, 2)
    assert flags["patch_embed"] == (False, 1) and flags["head"] == (False, 1)
    assert vit.layout[0].strides == (4, 4) and vit.layout[0].padding == "VALID"


# --------------------------------------------------------------------------- #
# Convolution implementations
# --------------------------------------------------------------------------- #
CONV_CASES = [  # (spatial, kernel, stride, padding)
    (9, 5, 1, "SAME"),
    (9, 5, 1, "VALID"),
    (8, 3, 2, ((1, 1), (1, 1))),
    (8, 3, 2, "VALID"),  # the last row and column are never read
    (11, 5, 3, ((2, 1), (0, 2))),
    (8, 4, 4, "VALID"),  # non-overlapping: the reshape path
    (7, 3, 1, ((2, 0), (1, 3))),
]


# float32 sums of <= 75 products of O(1) numbers in a different order: the
# difference is a few ulps of the largest partial sums (~10), i.e. ~1e-5.
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hw,ks,s,pad", CONV_CASES)
@pytest.mark.parametrize("cin,cout", [(3, 4), (5, 18)])  # "canonical" pads C_out <= 16 to 17
def test_conv_impls_agree_with_xla_in_value_and_gradient(hw, ks, s, pad, cin, cout):
    r, b = 3, 2
    kx, kk, kg = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (r, b, hw, hw, cin))
    w = jax.random.normal(kk, (r, ks, ks, cin, cout))
    impls = ("xla", "canonical", "patches", "im2col")

    @jax.jit
    def run(x, w, g):
        out = {}
        for impl in impls:
            f = lambda x, w, impl=impl: M.conv2d(x, w, (s, s), pad, impl)  # noqa: E731
            # Gradients through a random linear functional, vmapped over replicas (per-replica kernels).
            loss = lambda x, w, g, f=f: jnp.sum(f(x, w) * g)  # noqa: E731
            out[impl] = (jax.vmap(f)(x, w), f(x[0], w[0])) + jax.vmap(jax.grad(loss, argnums=(0, 1)))(x, w, g)
        return out

    shape = jax.eval_shape(jax.vmap(lambda x, w: M.conv2d(x, w, (s, s), pad, "xla")), x, w).shape
    out = run(x, w, jax.random.normal(kg, shape))
    ref = out["xla"]
    np.testing.assert_allclose(ref[1], ref[0][0], **TOL)
    for impl in impls[1:]:
        assert out[impl][0].shape == shape
        for a, bb in zip(out[impl], ref):
            np.testing.assert_allclose(a, bb, **TOL)


@pytest.mark.parametrize("s,pad", [(1, "SAME"), (2, ((1, 1), (1, 1)))])
def test_canonical_conv_gradients_stay_in_xla_cpus_fast_form_inside_a_loop(s, pad):
    # Why "canonical" exists: inside a rolled lax.scan, XLA:CPU does not rewrite JAX's gradient
    # convolutions into the NHWC x HWIO -> NHWC form that it hands to Eigen (17-25x slower).
    # Every convolution in the optimized HLO of a scanned "canonical" train step must have that
    # form; the plain lax conv is the control (its kernel gradient keeps f01b_i01o->01bf).
    def convs(impl):
        loss = lambda xw: jnp.sum(M.conv2d(*xw, (s, s), pad, impl) ** 2)  # noqa: E731
        body = lambda xw, _: (jax.tree.map(lambda a, g: a - 1e-3 * g, xw, jax.grad(loss)(xw)), None)  # noqa: E731
        xw = (jnp.ones((4, 8, 8, 3)), jnp.ones((3, 3, 3, 5)))
        hlo = jax.jit(lambda xw: jax.lax.scan(body, xw, None, length=3)[0]).lower(xw).compile().as_text()
        return [line for line in hlo.splitlines() if " convolution(" in line]

    def labels(lines):
        return [line.split("dim_labels=")[1].split(",")[0] for line in lines]

    canonical = convs("canonical")
    assert len(canonical) == 3 and set(labels(canonical)) == {"b01f_01io->b01f"}, labels(canonical)
    # A stride is kept as a dilation of the gradient convs, not as a zero-interleaved cotangent
    # (s^2 times the work): the input gradient is lhs-dilated, the kernel gradient rhs-dilated.
    windows = [line.split("window={")[1].split("}")[0] for line in canonical]
    assert sum(f"lhs_dilate={s}x{s}" in w for w in windows) == (s > 1), windows
    assert sum(f"rhs_dilate={s}x{s}" in w for w in windows) == (s > 1), windows
    # <= 16 channels: the output gets a zero channel, so XLA:CPU hands the conv to YNNPACK.
    for line, w in zip(canonical, windows):
        if "lhs_dilate" not in w:
            out_features = int(line.split(" = f32[")[1].split("]")[0].split(",")[-1])
            assert out_features == M.YNN_MIN_FEATURES, line
    if jax.default_backend() == "cpu":
        assert set(labels(convs("xla"))) != {"b01f_01io->b01f"}


def test_max_pool_impls_agree():
    x = jax.random.normal(jax.random.key(2), (2, 10, 11, 3))
    ref = M.max_pool_2x2(x, "xla")
    np.testing.assert_array_equal(M.max_pool_2x2(x, "patches"), ref)
    g = jax.random.normal(jax.random.key(3), ref.shape)
    ga = jax.grad(lambda x: jnp.sum(M.max_pool_2x2(x, "xla") * g))(x)
    gb = jax.grad(lambda x: jnp.sum(M.max_pool_2x2(x, "patches") * g))(x)
    np.testing.assert_array_equal(ga, gb)  # no ties in continuous random data


def test_auto_conv_impl_is_chosen_per_backend():
    assert M.resolve_conv_impl("auto", "cpu") == "phase"
    assert M.resolve_conv_impl("auto", "cpu", arch="resnet") == "canonical"
    assert M.resolve_conv_impl("auto", "cpu", arch="vit") == "patches"
    assert M.resolve_conv_impl("auto", "gpu") == "xla"
    assert M.resolve_conv_impl("auto", "tpu", arch="vit") == "xla"
    assert M.resolve_conv_impl("im2col", "cpu") == "im2col"
    with pytest.raises(ValueError, match="not 'resnet'; allowed for 'resnet'.*'patches'"):
        M.resolve_conv_impl("phase", "cpu", arch="resnet")


@pytest.mark.parametrize("hw,pad", [(8, ((2, 2), (2, 2))), (11, ((0, 0), (0, 0))), (10, ((1, 2), (0, 1)))])
def test_phase_patches_are_the_conv_output_in_window_order(hw, pad):
    # float64 brute force: the matmul with the phase-ordered patches is the zero-padded conv
    # at (2*h2 + dh, 2*w2 + dw), odd last rows/columns dropped ("VALID" pooling's floor).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, hw, hw + 1))  # [C, B, H, W]
    w = rng.normal(size=(5, 5, 2, 4))
    xp = np.pad(x, ((0, 0), (0, 0)) + pad)
    ho, wo = xp.shape[2] - 4, xp.shape[3] - 4
    ref = np.zeros((4, 3, ho, wo))
    for i in range(5):
        for j in range(5):
            ref += np.einsum("cbhw,co->obhw", xp[:, :, i:i + ho, j:j + wo], w[i, j])
    with jax.enable_x64():
        p = M._phase_patches(jnp.asarray(x), (5, 5), pad)
        y = np.asarray(jnp.asarray(w.reshape(50, 4)).T @ p.reshape(50, -1)).reshape(4, 2, 2, 3, ho // 2, wo // 2)
        cf = M._cf_patches(jnp.asarray(x), (5, 5), pad)
        np.testing.assert_allclose(np.asarray(jnp.asarray(w.reshape(50, 4)).T @ cf.reshape(50, -1)).reshape(ref.shape),
                                   ref, rtol=1e-12, atol=1e-12)
    for dh in (0, 1):
        for dw in (0, 1):
            np.testing.assert_allclose(y[:, dh, dw], ref[:, :, dh:2 * (ho // 2):2, dw:2 * (wo // 2):2],
                                       rtol=1e-12, atol=1e-12)


def test_phase_window_max_gradient_goes_to_the_max():
    y = jnp.asarray([[[1.0, 5.0], [3.0, -1.0], [2.0, 7.0], [0.0, 6.0]]])  # [C=1, 4, 2]
    g = jax.grad(lambda y: jnp.sum(M._max_over_window(y) * jnp.asarray([[10.0, 20.0]])))(y)
    np.testing.assert_array_equal(M._max_over_window(y), [[3.0, 7.0]])
    np.testing.assert_array_equal(g, [[[0, 0], [10, 0], [0, 20], [0, 0]]])


@pytest.mark.parametrize("size", M.SIZES)
@pytest.mark.parametrize("shape,k", CASES[:2])
def test_phase_lenet_equals_xla_lenet(shape, k, size):
    # Same parameters (names, shapes and init values), same logits and gradients, vmapped over
    # replicas, in both input geometries (28x28 "SAME" conv1, 32x32 "VALID" conv1).
    ref, phase = (M.get_model("cnn", shape, k, size=size, conv_impl=c) for c in ("xla", "phase"))
    keys = jax.random.split(jax.random.key(4), 2)
    variables = jax.vmap(ref.init)(keys)
    jax.tree.map(np.testing.assert_array_equal, jax.vmap(phase.init)(keys), variables)
    x = jax.random.normal(jax.random.key(5), (2, 6) + shape)
    y = jax.random.randint(jax.random.key(6), (2, 6), 0, k)

    def run(model):
        fn = jax.value_and_grad(lambda v, x, y: cross_entropy(model, v, x, y)[0])
        return jax.jit(jax.vmap(fn))(variables, x, y)

    (loss, grad), (ref_loss, ref_grad) = run(phase), run(ref)
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), grad, ref_grad)
    np.testing.assert_allclose(phase.apply(jax.tree.map(lambda v: v[0], variables), x[0], False)[0],
                               ref.apply(jax.tree.map(lambda v: v[0], variables), x[0], False)[0], **TOL)


def cross_entropy(model, variables, x, y, train=True):
    logits, state = model.apply(variables, x, train)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state


@pytest.mark.parametrize(
    "name", ["cnn", pytest.param("resnet", marks=pytest.mark.slow), pytest.param("vit", marks=pytest.mark.slow)]
)
def test_model_conv_impls_agree_vmapped(name):
    # Same parameters for every impl (same names, shapes, init), same logits and gradients.
    r, b = 3, 4
    shape, k = (28, 28, 1), 10
    # im2col is checked layer by layer above; here the full model, pooling included. The parameter
    # structure is the same for every impl (init does not depend on it: same names, shapes, keys).
    models = {impl: M.get_model(name, shape, k, size="small", conv_impl=impl) for impl in ("xla", "canonical", "patches")}
    variables = replica_variables(name)
    assert jax.tree.structure(abstract_variables(models["patches"])) == jax.tree.structure(variables)
    x = jax.random.normal(jax.random.key(1), (r, b) + shape)
    y = jax.random.randint(jax.random.key(2), (r, b), 0, k)

    def run(model):
        fn = jax.value_and_grad(lambda v, x, y: cross_entropy(model, v, x, y)[0])
        return jax.jit(jax.vmap(fn))(variables, x, y)

    ref_loss, ref_grad = run(models["xla"])
    for impl in ("canonical", "patches"):
        loss, grad = run(models[impl])
        np.testing.assert_allclose(loss, ref_loss, **TOL)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), grad, ref_grad)


# --------------------------------------------------------------------------- #
# Replicas
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", M.MODELS)
def test_vmapped_apply_equals_per_replica_apply(name):
    r, b = 3, 4
    shape, k = (28, 28, 1), 10
    model = M.get_model(name, shape, k, size="small")
    variables = replica_variables(name, r)
    x = jax.random.normal(jax.random.key(1), (r, b) + shape)
    # Train mode only (eval mode differs just in BatchNorm, tested below); one compile each side.
    for train in (True,):
        apply = jax.jit(lambda v, x, train=train: model.apply(v, x, train))
        logits, state = jax.jit(jax.vmap(lambda v, x, train=train: model.apply(v, x, train)))(variables, x)
        for i in range(r):
            vi = replica(variables, i)
            li, si = apply(vi, x[i])
            # Batched vs unbatched matmuls may sum in another order: float32 ulps.
            np.testing.assert_allclose(logits[i], li, rtol=1e-5, atol=1e-5)
            jax.tree.map(lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6), state, si)
        # Distinct replicas (distinct keys) give distinct outputs.
        assert not np.allclose(logits[0], logits[1])


def test_batchnorm_state_is_returned_unchanged_in_eval_mode():
    model = M.get_model("resnet", (28, 28, 1), 10, size="small")
    variables = replica(replica_variables("resnet"), 0)
    bn = variables["batch_stats"]["stage1_block0"]["bn1"]
    assert np.all(bn["mean"] == 0) and np.all(bn["var"] == 1)  # PyTorch's initial running stats
    # In eval mode the returned state is the input state itself: every output of the traced program
    # is one of its inputs (tracing only; the train-mode update is checked in the Adam test).
    jaxpr = jax.make_jaxpr(lambda bs, x: model.apply({**variables, "batch_stats": bs}, x, False)[1])(
        variables["batch_stats"], jnp.zeros((2, 28, 28, 1))
    ).jaxpr
    assert len(jaxpr.outvars) == len(jax.tree.leaves(variables["batch_stats"]))
    assert all(v in jaxpr.invars for v in jaxpr.outvars)


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", M.MODELS)
def test_adam_steps_reduce_the_loss(name):
    shape, k = (28, 28, 1), 10
    model = M.get_model(name, shape, k, size="small")
    variables = replica(replica_variables(name), 0)
    x = jax.random.normal(jax.random.key(1), (16,) + shape)
    y = jnp.arange(16) % k
    opt = optax.adam(1e-3 if name == "vit" else 3e-3)
    opt_state = opt.init(variables["params"])

    @jax.jit
    def step(variables, opt_state):
        def loss_fn(params):
            return cross_entropy(model, {**variables, "params": params}, x, y)

        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = opt.update(grads, opt_state)
        params = optax.apply_updates(variables["params"], updates)
        return {**variables, **state, "params": params}, opt_state, loss

    losses = []
    for _ in range(25):
        variables, opt_state, loss = step(variables, opt_state)
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    if name == "resnet":  # BatchNorm running statistics moved towards the batch statistics
        assert not np.allclose(variables["batch_stats"]["bn1"]["mean"], 0.0)
    # Memorising 16 random examples: the loss must clearly fall from ~log(10).
    assert losses[-1] < 0.7 * losses[0], losses


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="mlp"), "allowed: \\('cnn', 'resnet', 'vit'\\)"),
        (dict(input_shape=(32, 32, 1)), "allowed: \\(\\(28, 28, 1\\), \\(32, 32, 3\\)\\)"),
        (dict(input_shape=(28, 28)), "allowed"),
        (dict(num_classes=1), ">= 2"),
        (dict(num_classes=2.5), ">= 2"),
        (dict(size="large"), "allowed: \\('paper', 'small'\\)"),
        (dict(conv_impl="cudnn"), "allowed: \\('auto', 'xla', 'canonical', 'patches', 'im2col', 'phase'\\)"),
        (dict(name="vit", conv_impl="phase"), "allowed for 'vit'"),
    ],
)
def test_bad_input_raises_value_error(kwargs, match):
    args = dict(name="cnn", input_shape=(28, 28, 1), num_classes=10) | kwargs
    name, shape, k = args.pop("name"), args.pop("input_shape"), args.pop("num_classes")
    with pytest.raises(ValueError, match=match):
        M.get_model(name, shape, k, **args)

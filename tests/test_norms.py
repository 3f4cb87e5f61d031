"""Tests of jaxnorm.norms against brute force: the unrolled operator of each layer built with
``jax.jacobian`` of ``flax.linen.Conv`` / ``x @ K`` (independent of the code under test), its numpy SVD and
direct row/column sums, and the paper's Eq. 2 written out by hand.

Tolerances: the brute-force references run in float64 (``x64`` fixture, tests/conftest.py); the only
approximate quantity is the power-iteration estimate of ||A||_sigma, run to a relative change of 1e-12, so
the issue's bound rel. err < 1e-4 leaves a wide margin (observed ~1e-10). The (2,1) norms are exact sums
and agree to ~1e-15; we still use 1e-10.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm import norms
from jaxnorm.layout import LinearLayer

TIGHT = dict(tol=1e-12, max_iters=20000)


def unrolled_conv(kernel, input_shape, strides, padding):
    """A with y = A x, rows = (h_out, w_out, c_out), columns = (h, w, c_in), from flax.linen.Conv."""
    conv = nn.Conv(kernel.shape[3], kernel.shape[:2], strides=strides, padding=padding, use_bias=False)
    f = lambda x: conv.apply({"params": {"kernel": kernel}}, x[None])[0]
    # jit: one compile instead of one per eager op (the CPU cost of this file is mostly compilation).
    jac = np.asarray(jax.jit(jax.jacfwd(f))(jnp.zeros(input_shape, kernel.dtype)))
    return jac.reshape(int(np.prod(jac.shape[:3])), -1)


def unrolled_dense(kernel, input_shape, kernel_in_ndim=1):
    """A of x -> x @ K applied per token on the whole input (K^T (x) I_T)."""
    d_in = int(np.prod(kernel.shape[:kernel_in_ndim]))
    k2 = kernel.reshape(d_in, -1)
    f = lambda x: (x.reshape(-1, d_in) @ k2).reshape(-1)
    jac = np.asarray(jax.jit(jax.jacfwd(f))(jnp.zeros(input_shape, kernel.dtype)))
    return jac.reshape(jac.shape[0], -1)


def l21_reference(a):
    """Each definition of the module docstring, written on the explicit matrix A - M."""
    rows, cols = np.linalg.norm(a, axis=1), np.linalg.norm(a, axis=0)
    return {"paper": rows.mean(), "bartlett": rows.sum(), "paper_input": cols.mean()}


def sigma_max(a):
    return np.linalg.svd(a, compute_uv=False)[0]


def parts_all_definitions(kernel, layer, **kw):
    """spectral_complexity's parts of a one-layer layout, for every definition, in one compiled call."""
    layout = (layer,)
    variables = {"params": {"k": kernel}}

    @jax.jit
    def f(variables):
        return {d: norms.spectral_complexity(variables, layout, definition=d, **kw, **TIGHT)[1][layer.name]
                for d in norms.OPERATOR_DEFINITIONS}

    return jax.tree.map(float, f(variables))


def rel(a, b):
    return abs(a - b) / abs(b)


CONV_CASES = [
    # (kernel size, stride, padding, C_in, C_out): every k in {1,3,5} x stride in {1,2} x SAME/VALID,
    # channel counts varied (1, 2, 3, 4; C_in < C_out and C_in > C_out).
    (1, 1, "SAME", 2, 3), (1, 2, "VALID", 3, 2), (1, 2, "SAME", 1, 4), (1, 1, "VALID", 4, 4),
    (3, 1, "SAME", 3, 4), (3, 2, "SAME", 2, 2), (3, 1, "VALID", 1, 3), (3, 2, "VALID", 4, 1),
    (5, 1, "SAME", 2, 3), (5, 2, "SAME", 3, 2), (5, 1, "VALID", 2, 2), (5, 2, "VALID", 1, 3),
]


@pytest.mark.parametrize("k,s,padding,cin,cout", CONV_CASES)
def test_conv_norms_match_unrolled_operator(x64, k, s, padding, cin, cout):
    shape = (7, 6, cin)  # odd and even sides: SAME pads asymmetrically on one of them for stride 2
    kernel = jnp.asarray(np.random.default_rng(k * 100 + s * 10 + cin).normal(size=(k, k, cin, cout)))
    a = unrolled_conv(kernel, shape, s, padding)
    layer = LinearLayer("c", "conv", ("params", "k"), shape, strides=(s, s), padding=padding)
    got = parts_all_definitions(kernel, layer)
    ref = l21_reference(a)
    for d in norms.OPERATOR_DEFINITIONS:
        assert rel(got[d]["spec"], sigma_max(a)) < 1e-4
        assert rel(got[d]["l21"], ref[d]) < 1e-10, d
    # The public one-call function too.
    assert rel(float(norms.conv_operator_norm(kernel, shape, s, padding, **TIGHT)), sigma_max(a)) < 1e-4


def test_conv_row_norms_are_output_side_and_column_norms_input_side(x64):
    kernel = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, 2, 5)))
    shape = (6, 5, 2)
    a = unrolled_conv(kernel, shape, 2, "SAME")
    rows, cols = norms.conv_row_col_sq_norms(kernel, shape, 2, "SAME")
    assert rows.shape == (3, 3, 5) and cols.shape == shape
    np.testing.assert_allclose(np.asarray(rows).reshape(-1), (a * a).sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(cols).reshape(-1), (a * a).sum(axis=0), rtol=1e-12)


def test_explicit_padding_matches_flax(x64):
    kernel = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 2, 3)))
    shape, pad = (6, 6, 2), ((1, 2), (0, 1))
    a = unrolled_conv(kernel, shape, 2, pad)
    layer = LinearLayer("c", "conv", ("params", "k"), shape, strides=(2, 2), padding=pad)
    got = parts_all_definitions(kernel, layer)
    assert rel(got["paper"]["spec"], sigma_max(a)) < 1e-4
    assert rel(got["bartlett"]["l21"], l21_reference(a)["bartlett"]) < 1e-10


@pytest.mark.parametrize("shape,kernel_shape,kin", [((5,), (5, 3), 1), ((4, 6), (6, 2), 1), ((3, 6), (2, 3, 4), 2)])
def test_dense_operator_on_whole_token_sequence(x64, shape, kernel_shape, kin):
    kernel = jnp.asarray(np.random.default_rng(2).normal(size=kernel_shape))
    a = unrolled_dense(kernel, shape, kin)
    ref = l21_reference(a)
    layout = (LinearLayer("d", "dense", ("params", "k"), shape, kernel_in_ndim=kin),)
    f = jax.jit(lambda v: {(m, d): norms.spectral_complexity(v, layout, definition=d, dense_method=m, **TIGHT)[1]["d"]
                           for m in norms.DENSE_METHODS for d in norms.OPERATOR_DEFINITIONS})
    for (m, d), got in f({"params": {"k": kernel}}).items():
        assert rel(float(got["spec"]), sigma_max(a)) < 1e-4, m
        assert rel(float(got["l21"]), ref[d]) < 1e-10, (m, d)


@pytest.mark.parametrize(
    "k,padding,c",
    [(3, "SAME", 3), (1, "VALID", 2), (3, ((1, 1), (1, 1)), 2), (4, "SAME", 2), (5, ((2, 2), (2, 2)), 1)],
)
def test_residual_conv_uses_identity_reference(x64, k, padding, c):
    shape = (5, 6, c)
    kernel = jnp.asarray(np.random.default_rng(3).normal(size=(k, k, c, c)) * 0.3)
    a = unrolled_conv(kernel, shape, 1, padding)
    assert a.shape[0] == a.shape[1]
    layer = LinearLayer("c", "conv", ("params", "k"), shape, padding=padding, residual=True)
    got = parts_all_definitions(kernel, layer)
    ref = l21_reference(a - np.eye(a.shape[0]))
    for d in norms.OPERATOR_DEFINITIONS:
        assert rel(got[d]["spec"], sigma_max(a)) < 1e-4  # Eq. 2's spectral factor is ||A||, not ||A - I||
        assert rel(got[d]["l21"], ref[d]) < 1e-10, d


def test_residual_non_square_keeps_zero_reference(x64):
    kernel = jnp.asarray(np.random.default_rng(4).normal(size=(3, 3, 2, 2)))
    shape = (6, 6, 2)
    plain = LinearLayer("c", "conv", ("params", "k"), shape, strides=(2, 2))
    resid = dataclasses.replace(plain, residual=True)
    assert parts_all_definitions(kernel, resid) == parts_all_definitions(kernel, plain)
    dense = jnp.asarray(np.random.default_rng(5).normal(size=(4, 4)))
    layer = LinearLayer("d", "dense", ("params", "k"), (3, 4), residual=True)
    got = parts_all_definitions(dense, layer)
    ref = l21_reference(unrolled_dense(dense, (3, 4)) - np.eye(12))
    assert rel(got["bartlett"]["l21"], ref["bartlett"]) < 1e-10


def test_warm_start_converges_to_same_value_in_fewer_iterations(x64):
    rng = np.random.default_rng(6)
    shape = (8, 8, 4)
    k0 = jnp.asarray(rng.normal(size=(3, 3, 4, 4)))
    k1 = k0 + 0.01 * jnp.asarray(rng.normal(size=k0.shape))  # one small training step later
    layout = (LinearLayer("c", "conv", ("params", "k"), shape),)
    f = jax.jit(lambda v, s: norms.spectral_complexity(v, layout, s, tol=1e-9, max_iters=20000))
    state0 = norms.init_norm_state(layout, jax.random.PRNGKey(1), jnp.float64)
    _, _, state = f({"params": {"k": k0}}, state0)
    _, cold_parts, cold_state = f({"params": {"k": k1}}, state0)
    _, warm_parts, warm_state = f({"params": {"k": k1}}, state)
    truth = sigma_max(unrolled_conv(k1, shape, 1, "SAME"))
    assert rel(float(cold_parts["c"]["spec"]), truth) < 1e-4
    assert rel(float(warm_parts["c"]["spec"]), truth) < 1e-4
    assert int(warm_state["iters"][0]) < int(cold_state["iters"][0]) / 2
    assert float(warm_state["delta"][0]) <= 1e-9


def _toy(residual=False):
    """A conv -> dense toy network (conv1 square so that it can carry M = I) and its variables."""
    rng = np.random.default_rng(7)
    layout = (
        LinearLayer("conv1", "conv", ("params", "conv1", "kernel"), (5, 5, 2), residual=residual),
        LinearLayer("conv2", "conv", ("params", "conv2", "kernel"), (5, 5, 2), strides=(2, 2), lipschitz=2.0),
        LinearLayer("bn", "diag", ("params", "bn", "scale"), (3, 3, 3), var_path=("batch_stats", "bn", "var"),
                    eps=1e-5),
        LinearLayer("fc", "dense", ("params", "fc", "kernel"), (27,), lipschitz=0.5),
    )
    variables = {
        "params": {
            "conv1": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 2)) * 0.4)},
            "conv2": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 3)))},
            "bn": {"scale": jnp.asarray(rng.normal(size=(3,)))},
            "fc": {"kernel": jnp.asarray(rng.normal(size=(27, 4)))},
        },
        "batch_stats": {"bn": {"var": jnp.asarray(rng.uniform(0.5, 2.0, size=(3,)))}},
    }
    return layout, variables


def _hand_total(layout, variables, definition, include_norm):
    """Eq. 2 written out on brute-force matrices."""
    p = variables["params"]
    mats = {
        "conv1": unrolled_conv(p["conv1"]["kernel"], (5, 5, 2), 1, "SAME"),
        "conv2": unrolled_conv(p["conv2"]["kernel"], (5, 5, 2), 2, "SAME"),
        "bn": np.kron(np.eye(9), np.diag(np.asarray(p["bn"]["scale"])
                                          / np.sqrt(np.asarray(variables["batch_stats"]["bn"]["var"]) + 1e-5))),
        "fc": np.asarray(p["fc"]["kernel"]).T,
    }
    prod, acc = 1.0, 0.0
    for layer in layout:
        if layer.kind == "diag" and not include_norm:
            continue
        a = mats[layer.name]
        m = np.eye(a.shape[0]) if layer.residual else 0.0
        spec = sigma_max(a)
        prod *= layer.lipschitz * spec
        acc += (l21_reference(a - m)[definition] / spec) ** (2 / 3)
    return prod * acc ** 1.5


@pytest.mark.parametrize("residual", [False, True])
def test_toy_layout_total_matches_hand_computation(x64, residual):
    layout, variables = _toy(residual)
    f = jax.jit(lambda v: {(d, n): norms.spectral_complexity(v, layout, definition=d, norm_layers=n, **TIGHT)[0]
                           for d in norms.OPERATOR_DEFINITIONS for n in norms.NORM_LAYERS})
    got = f(variables)
    for (d, n), total in got.items():
        assert rel(float(total), _hand_total(layout, variables, d, n == "include")) < 1e-4, (d, n)


def test_scaling_one_layer_by_c_scales_total_by_c(x64):
    # Eq. 2: ||cA||_sigma = c||A||_sigma and ||cA||_{2,1} = c||A||_{2,1}, so the ratio is invariant and the
    # product gains exactly one factor c: R_A -> c R_A (M = 0 layers).
    layout, variables = _toy()
    f = jax.jit(lambda v: norms.spectral_complexity(v, layout, **TIGHT)[0])
    base = float(f(variables))
    scaled = jax.tree.map(lambda x: x, variables)
    scaled["params"]["fc"]["kernel"] = 3.0 * variables["params"]["fc"]["kernel"]
    assert rel(float(f(scaled)), 3.0 * base) < 1e-8


def test_rescaling_c_and_one_over_c_leaves_total_invariant_only_without_identity_reference(x64):
    # For M = 0 both the product and every ratio are invariant: R_A is unchanged (as the ReLU net's
    # function is). With M = I on the rescaled layer, ||cA - I||_{2,1} / ||cA||_sigma changes: only the
    # product term is invariant.
    for residual in (False, True):
        layout, variables = _toy(residual)
        f = jax.jit(lambda v: norms.spectral_complexity(v, layout, **TIGHT))
        total, parts, _ = f(variables)
        moved = jax.tree.map(lambda x: x, variables)
        moved["params"]["conv1"]["kernel"] = 2.0 * variables["params"]["conv1"]["kernel"]
        moved["params"]["conv2"]["kernel"] = 0.5 * variables["params"]["conv2"]["kernel"]
        total2, parts2, _ = f(moved)
        prod = lambda ps: ps["conv1"]["spec"] * ps["conv2"]["spec"] * ps["fc"]["spec"]
        assert rel(float(prod(parts2)), float(prod(parts))) < 1e-8
        if residual:
            assert rel(float(total2), float(total)) > 1e-3
        else:
            assert rel(float(total2), float(total)) < 1e-8


def test_replica_batched_call_equals_per_replica_calls(x64):
    layout, v = _toy(residual=True)
    r = 3
    batch = jax.tree.map(lambda x: jnp.stack([x * (1 + 0.1 * i) + 0.05 * i for i in range(r)]), v)
    states = jax.vmap(lambda k: norms.init_norm_state(layout, k, jnp.float64))(jax.random.split(jax.random.PRNGKey(0), r))
    opts = dict(norm_layers="include", dense_method="power", tol=1e-10, max_iters=20000)
    total, parts, new_state = norms.spectral_complexity_fn(layout, **opts)(batch, states)
    assert total.shape == (r,) and parts["conv1"]["spec"].shape == (r,)
    single = jax.jit(lambda v, s: norms.spectral_complexity(v, layout, s, **opts))
    for i in range(r):
        take = lambda x: x[i]
        t_i, p_i, s_i = single(jax.tree.map(take, batch), jax.tree.map(take, states))
        # Converged lanes are frozen by the batched while_loop, so they see the same iterations: agreement
        # is at rounding level; 1e-9 allows for a different reduction order under vmap.
        assert rel(float(total[i]), float(t_i)) < 1e-9
        for name in p_i:
            assert rel(float(parts[name]["spec"][i]), float(p_i[name]["spec"])) < 1e-9
            assert rel(float(parts[name]["l21"][i]), float(p_i[name]["l21"])) < 1e-9


def test_norm_layers_option_and_zero_layer():
    layout, v = _toy()
    v = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), v)
    # One compiled program for the four option sets (eager calls would compile every op separately).
    f = jax.jit(lambda v, v0: (norms.spectral_complexity(v, layout)[1],
                               norms.spectral_complexity(v, layout, norm_layers="include")[1],
                               norms.spectral_complexity(v0, layout)[0],
                               norms.spectral_complexity(v0, layout, log=True)[0]))
    # A zero layer (e.g. a zero-initialized head): R_A is 0 (the limit c -> 0 of c R_A), not NaN.
    v0 = jax.tree.map(lambda x: x, v)
    v0["params"]["fc"]["kernel"] = jnp.zeros_like(v["params"]["fc"]["kernel"])
    excl, incl, total0, log_total0 = f(v, v0)
    assert "bn" not in excl and set(incl) == {l.name for l in layout}
    s = v["params"]["bn"]["scale"] / jnp.sqrt(v["batch_stats"]["bn"]["var"] + 1e-5)
    np.testing.assert_allclose(float(incl["bn"]["spec"]), float(jnp.max(jnp.abs(s))), rtol=1e-6)
    assert float(total0) == 0.0 and np.isneginf(float(log_total0))


def test_log_total_survives_float32_overflow():
    # 40 layers of norm 10 -> R_A ~ 1e40 overflows float32; the log stays exact.
    spec = jnp.full((40,), 10.0, jnp.float32)
    log_r = norms.complexity_from_parts(spec, spec, jnp.ones(40), log=True)
    np.testing.assert_allclose(float(log_r), 40 * np.log(10.0) + 1.5 * np.log(40.0), rtol=1e-6)


def test_bad_arguments_raise_value_error():
    layout, v = _toy()
    for kw, word in [({"definition": "mean"}, "definition"), ({"norm_layers": "maybe"}, "norm_layers"),
                     ({"dense_method": "qr"}, "dense_method")]:
        with pytest.raises(ValueError, match=word):
            norms.spectral_complexity(v, layout, **kw)
        with pytest.raises(ValueError, match=word):
            norms.spectral_complexity_fn(layout, **kw)
    with pytest.raises(ValueError, match="padding"):
        norms.conv_operator_norm(jnp.ones((3, 3, 1, 1)), (4, 4, 1), padding="CIRCULAR")
    with pytest.raises(ValueError, match="does not match"):
        norms.conv_operator_norm(jnp.ones((3, 3, 2, 1)), (4, 4, 1))
    with pytest.raises(ValueError, match="init_norm_state"):
        norms.spectral_complexity(v, layout, {"v": (), "iters": jnp.zeros(0), "delta": jnp.zeros(0)})


# ResNet-8 and ViT compile ~10 s each on this 2-core machine: slow-marked; the CNN keeps the default run honest.
@pytest.mark.parametrize(
    "arch", ["cnn", pytest.param("resnet", marks=pytest.mark.slow), pytest.param("vit", marks=pytest.mark.slow)]
)
def test_runs_on_the_models_layouts(arch):
    # The layout's paths and shapes must match the model's variables. Random weights with the shapes of
    # model.init (jax.eval_shape: tracing only; model.init itself compiles the forward pass, ~10 s here).
    from jaxnorm.models import get_model

    model = get_model(arch, (28, 28, 1), 10, size="small")
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    leaves, treedef = jax.tree.flatten(shapes)
    rng, r = np.random.default_rng(8), 2
    # Uniform in [0.5, 1.5): positive, as BN variances must be. numpy, not eager jax.random (a compile per shape).
    variables = treedef.unflatten([jnp.asarray(rng.uniform(0.5, 1.5, (r,) + x.shape), jnp.float32) for x in leaves])
    states = jax.vmap(lambda k: norms.init_norm_state(model.layout, k))(jax.random.split(jax.random.PRNGKey(1), r))
    total, parts, new_state = norms.spectral_complexity_fn(model.layout, norm_layers="include")(variables, states)
    assert total.shape == (r,) and bool(jnp.all(jnp.isfinite(total)) and jnp.all(total > 0))
    assert set(parts) == set(norms.operator_names(model.layout, norm_layers="include"))
    assert jax.tree.structure(new_state) == jax.tree.structure(states)


# ----------------------------------------------------------------------------------------------
# Issue 11: folding, certified bounds, the reference formula, ViT conventions, the zoo, array-likes
# ----------------------------------------------------------------------------------------------


def _small_model_variables(arch, steps=0, seed=0):
    """A small model and its variables after ``steps`` Adam steps (lr 1e-2) on random data (float32)."""
    import optax

    from jaxnorm.models import get_model

    model = get_model(arch, (28, 28, 1), 10, size="small")
    variables = model.init(jax.random.PRNGKey(seed))
    if steps:
        rng = np.random.default_rng(seed)
        x = jnp.asarray(rng.normal(size=(steps, 16, 28, 28, 1)), jnp.float32)
        y = jnp.asarray(rng.integers(0, 10, size=(steps, 16)), jnp.int32)
        tx = optax.adam(1e-2)

        def step(carry, batch):
            v, opt = carry

            def loss(p):
                logits, new = model.apply({**v, "params": p}, batch[0], True)
                return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean(), new

            (_, new), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
            upd, opt = tx.update(g, opt, v["params"])
            out = {**v, **new, "params": optax.apply_updates(v["params"], upd)}
            return (jax.tree.map(lambda a, b: a.astype(b.dtype), out, v), opt), None  # x64 tests: keep float32

        (variables, _), _ = jax.jit(lambda v: jax.lax.scan(step, (v, tx.init(v["params"])), (x, y)))(variables)
    return model, variables


def test_folded_batchnorm_makes_R_A_a_function_of_the_network(x64):
    # Scaling the kernel that feeds a BatchNorm by c, its running mean by c and its running variance so that
    # var + eps -> c^2 (var + eps) leaves the eval-mode network exactly unchanged (BN divides by sqrt(var + eps)); the "variance x 100"
    # would change the function by eps/var ~ 1e-5 too. Folded, R_A must not move (1e-6: both runs see the same
    # operators up to rounding, so the power iterations are identical); excluded, it moves by ~c (the defect).
    model, variables = _small_model_variables("resnet")
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    rng = np.random.default_rng(0)
    stats = variables["batch_stats"]
    variables["batch_stats"] = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.2, 3.0, a.shape)), stats)
    variables["params"] = jax.tree.map(lambda a: a * (1 + 0.3 * jnp.asarray(rng.normal(size=a.shape))),
                                       variables["params"])
    c, eps = 10.0, 1e-5
    moved = jax.tree.map(lambda a: a, variables)
    blk = "stage2_block0"
    moved["params"][blk]["conv1"]["kernel"] = c * variables["params"][blk]["conv1"]["kernel"]
    moved["batch_stats"][blk]["bn1"]["var"] = c ** 2 * (variables["batch_stats"][blk]["bn1"]["var"] + eps) - eps
    moved["batch_stats"][blk]["bn1"]["mean"] = c * variables["batch_stats"][blk]["bn1"]["mean"]
    x = jnp.asarray(rng.normal(size=(4, 28, 28, 1)))

    @jax.jit
    def f(v):
        out = {"logits": model.apply(v, x, False)[0]}
        for n in ("fold", "exclude"):
            # tol below reach: both runs make exactly max_iters iterations from the same start vector, so the
            # readings agree to rounding whatever their distance to the exact norm.
            out[n] = norms.spectral_complexity(v, model.layout, norm_layers=n, tol=1e-14, max_iters=20)[0]
        return out

    a, b = f(variables), f(moved)
    np.testing.assert_allclose(np.asarray(b["logits"]), np.asarray(a["logits"]), rtol=1e-9, atol=1e-9)
    assert rel(float(b["fold"]), float(a["fold"])) < 1e-6
    assert rel(float(b["exclude"]), float(a["exclude"])) > 1.0  # unfolded R_A is not a function of the net (x~10)
    # The folded kernel is the conv's kernel times scale / sqrt(var + eps) per output channel.
    ops = {o.name: o.kernel for o in norms.operators(variables, model.layout)}
    bn = variables["params"][blk]["bn1"]
    want = variables["params"][blk]["conv1"]["kernel"] * bn["scale"] / jnp.sqrt(
        variables["batch_stats"][blk]["bn1"]["var"] + eps)
    np.testing.assert_allclose(np.asarray(ops[f"{blk}/conv1"]), np.asarray(want), rtol=1e-12)


@pytest.mark.slow  # ViT compile, ~13 s here
def test_folded_layernorm_scale_is_invariant_to_moving_it_into_the_next_kernels(x64):
    # Pre-LN: q = (gamma * xhat) K_q. gamma -> c gamma, K_{q,k,v} -> K / c leaves the network and folded R_A equal.
    model, variables = _small_model_variables("vit")
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    moved = jax.tree.map(lambda a: a, variables)
    e = moved["params"]["encoder1"]
    e["ln1"]["scale"] = 4.0 * e["ln1"]["scale"]
    for name in ("query", "key", "value"):
        e["attn"][name]["kernel"] = e["attn"][name]["kernel"] / 4.0
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 28, 28, 1)))
    f = jax.jit(lambda v: (model.apply(v, x, False)[0], norms.spectral_complexity(v, model.layout)[0],
                           norms.spectral_complexity(v, model.layout, norm_layers="exclude")[0]))
    (la, ra, xa), (lb, rb, xb) = f(variables), f(moved)
    np.testing.assert_allclose(np.asarray(lb), np.asarray(la), rtol=1e-9, atol=1e-9)
    assert rel(float(rb), float(ra)) < 1e-9  # dense layers: exact SVD
    assert rel(float(xb), float(xa)) > 1e-2


@pytest.mark.parametrize(
    "arch", ["cnn", pytest.param("resnet", marks=pytest.mark.slow), pytest.param("vit", marks=pytest.mark.slow)]
)
def test_certified_interval_contains_the_true_norm_on_trained_weights(x64, arch):
    # Trained weights (20 Adam steps, lr 1e-2, so that the kernels are no longer i.i.d.), every operator of R_A
    # (folded, stacked). Convs are re-evaluated on small inputs (8 x 8 or 9 x 9) where the unrolled operator's SVD
    # is cheap; dense layers as they are. The sweep's tol 1e-5 must give an interval [spec, spec_upper] that
    # contains the SVD value (1e-9 allows for float64 rounding only) and whose certified gap is <= tol.
    # max_iters 5000, not the sweep's 500: at 1e-5 some power iterations need ~1000 steps (ResNet's stem conv on a
    # 9 x 9 map stopped 1.7e-5 low at 500; such a reading is flagged unconverged, its interval still certified).
    model, variables = _small_model_variables(arch, steps=20)
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    cases, truths = [], []  # (one-layer layout, kernel, dense method)
    for op in norms.operators(variables, model.layout):
        if op.layer.kind == "conv":
            side = 8 if op.layer.strides == (4, 4) else 9
            shape = (side, side, op.kernel.shape[2])
            layer = dataclasses.replace(op.layer, input_shape=shape, path=("params", "k"), residual=False)
            truth = sigma_max(unrolled_conv(op.kernel, shape, op.layer.strides, op.layer.padding))
            methods = ("svd",)
        else:
            layer = dataclasses.replace(op.layer, path=("params", "k"), residual=False)
            d_in = int(np.prod(op.kernel.shape[: op.layer.kernel_in_ndim]))
            truth = sigma_max(np.asarray(op.kernel).reshape(d_in, -1))
            methods = norms.DENSE_METHODS
        for m in methods:
            cases.append(((layer,), op.kernel, m))
            truths.append((op.name, m, truth))

    @jax.jit  # one program for all operators (eager calls would compile every op of every layer)
    def readings(kernels):
        out = []
        for (layout, _, m), k in zip(cases, kernels):
            p = norms.spectral_complexity({"params": {"k": k}}, layout, dense_method=m, max_iters=5000)[1]
            p = p[layout[0].name]
            out.append((p["spec"], p["spec_upper"]))
        return out

    got = readings([k for _, k, _ in cases])
    for (name, m, truth), (lo, hi) in zip(truths, got):
        assert float(lo) <= truth * (1 + 1e-9) and truth <= float(hi) * (1 + 1e-9), (name, m, float(lo), truth, float(hi))
        # Convs: exact certificate; dense: exact SVD, or power iteration with a Gram bound within tol / 4: the
        # interval is within the sweep's tol (hi = (1 + tol) lo at worst, up to rounding).
        assert float(hi) / float(lo) - 1 <= 1e-5 * (1 + 1e-6), (name, m, float(lo), truth, float(hi))
    assert {n for n, _, _ in truths} == set(norms.operator_names(model.layout))  # every operator of R_A


CERT_SIZES = [(7, 7), (8, 8), (9, 6)]


@pytest.mark.parametrize("k,s,padding,cin,cout", CONV_CASES)
def test_conv_certificate_decides_the_svd_norm_exactly(x64, k, s, padding, cin, cout):
    # conv_bound_holds(gamma) is an exact test of ||A|| < gamma: true just above the SVD value, false just below
    # (1e-9 apart: float64 rounding of the Gram matrix and of its Cholesky factor is ~1e-14 here).
    rng = np.random.default_rng(100 + k * 10 + s)
    for hw in CERT_SIZES:
        kernel = jnp.asarray(rng.normal(size=(k, k, cin, cout)))
        shape = hw + (cin,)
        truth = sigma_max(unrolled_conv(kernel, shape, s, padding))
        f = jax.jit(lambda g: norms.conv_bound_holds(kernel, shape, s, padding, g))
        assert bool(f(truth * (1 + 1e-9))) and not bool(f(truth * (1 - 1e-9))), (hw, truth)


@pytest.mark.parametrize("dtype", ["float32"])  # the sweeps' dtype; float64 exactness: the test above
@pytest.mark.parametrize("k,s,padding,cin,cout", [c for c in CONV_CASES if c[0] > 1])
def test_conv_interval_contains_the_svd_norm_and_is_within_tol(x64, dtype, k, s, padding, cin, cout):
    # The default conv bound (exact certificate) closes the interval to tol = 1e-3 on random kernels, for
    # SAME/VALID, strides 1 and 2, three input sizes. Containment: 1e-9 (float64) or 1e-6 (float32 rounding of
    # the Rayleigh quotient and of the Cholesky test) relative slack.
    rng = np.random.default_rng(200 + k * 10 + s)
    slack = 1e-9 if dtype == "float64" else 1e-6
    layers, kernels, truths = [], [], []
    for j, hw in enumerate(CERT_SIZES):
        kernel = rng.normal(size=(k, k, cin, cout))
        shape = hw + (cin,)
        truths.append(sigma_max(unrolled_conv(jnp.asarray(kernel), shape, s, padding)))
        layers.append(LinearLayer(f"c{j}", "conv", ("params", f"c{j}"), shape, strides=(s, s), padding=padding))
        kernels.append(jnp.asarray(kernel, dtype))
    layout = tuple(layers)
    state = norms.init_norm_state(layout, jax.random.PRNGKey(0), jnp.dtype(dtype))
    # max_iters 5000: from some start vectors the top singular vector (here 1.2e-3 above the next) emerges slowly.
    r = jax.jit(lambda v: norms.evaluate(v, layout, state, zoo=False, tol=1e-3, max_iters=5000))(
        {"params": {f"c{j}": kk for j, kk in enumerate(kernels)}})
    assert int(r.unconverged) == 0
    for j, truth in enumerate(truths):
        lo, hi = float(r.parts[f"c{j}"]["spec"]), float(r.parts[f"c{j}"]["spec_upper"])
        assert lo <= truth * (1 + slack) and truth <= hi * (1 + slack), (j, lo, truth, hi)
        assert hi / lo - 1 <= 1e-3 + 1e-6, (j, lo, truth, hi)  # hi = (1 + tol) lo, rounded (float32: ~1e-7)


def test_upper_bound_is_exact_for_patch_convs_and_gap_stops_power_iteration(x64):
    # A stride-4, 4x4 VALID conv (ViT's patch embedding) is block diagonal: the polyphase circular bound is its
    # exact norm, so the certified gap closes and the power iteration stops long before max_iters.
    kernel = jnp.asarray(np.random.default_rng(9).normal(size=(4, 4, 2, 5)))
    shape = (8, 12, 2)
    truth = sigma_max(unrolled_conv(kernel, shape, 4, "VALID"))
    assert rel(float(norms.conv_upper_bound(kernel, shape, 4, "VALID", gram_iters=10)), truth) < 1e-9
    layout = (LinearLayer("c", "conv", ("params", "k"), shape, strides=(4, 4), padding="VALID"),)
    r = jax.jit(lambda v: norms.evaluate(v, layout, tol=1e-8, max_iters=10000, zoo=False, gram_iters=10))(
        {"params": {"k": kernel}})
    assert float(r.max_gap) <= 1e-8 and int(r.state["iters"][0]) < 10000 and int(r.unconverged) == 0


def test_reading_that_hits_max_iters_is_flagged(x64):
    kernel = jnp.asarray(np.random.default_rng(10).normal(size=(3, 3, 3, 3)))
    layout = (LinearLayer("c", "conv", ("params", "k"), (7, 7, 3)),)
    f = jax.jit(lambda k: (norms.evaluate({"params": {"k": k}}, layout, zoo=False, min_iters=1, max_iters=2, tol=1e-12),
                           norms.evaluate({"params": {"k": k}}, layout, zoo=False, max_iters=20000, tol=1e-3)))
    stuck, ok = f(kernel)
    assert int(stuck.unconverged) == 1 and float(stuck.max_gap) > 1e-12
    assert int(ok.unconverged) == 0
    truth = sigma_max(unrolled_conv(kernel, (7, 7, 3), 1, "SAME"))
    for r in (stuck, ok):  # flagged or not, the interval is certified
        assert float(r.parts["c"]["spec"]) <= truth * (1 + 1e-9) <= float(r.parts["c"]["spec_upper"]) * (1 + 2e-9)
    # R_A is nondecreasing in each spectral norm, so [total, total_upper] contains the exact R_A.
    exact = float(norms.complexity_from_parts(jnp.asarray([truth]), ok.parts["c"]["l21"][None], jnp.ones(1)))
    assert float(ok.total) <= exact * (1 + 1e-9) <= float(ok.total_upper) * (1 + 2e-9)


def _torch_layout_net():
    """conv 3x3 SAME 2->3 on 5x5, conv 3x3 VALID stride 2 3->4, dense 16->6, dense 6->3, PyTorch layout."""
    rng = np.random.default_rng(11)
    w = {"c1": rng.normal(size=(3, 2, 3, 3)), "c2": rng.normal(size=(4, 3, 3, 3)),
         "f1": rng.normal(size=(6, 16)), "f2": rng.normal(size=(3, 6))}
    layout = (
        LinearLayer("c1", "conv", ("params", "c1", "kernel"), (5, 5, 2)),
        LinearLayer("bn", "diag", ("params", "bn", "scale"), (5, 5, 3), var_path=("batch_stats", "bn", "var"),
                    eps=1e-5, fold_into=("c1",)),
        LinearLayer("c2", "conv", ("params", "c2", "kernel"), (5, 5, 3), strides=(2, 2), padding="VALID"),
        LinearLayer("f1", "dense", ("params", "f1", "kernel"), (16,)),
        LinearLayer("f2", "dense", ("params", "f2", "kernel"), (6,)),
    )
    flax_vars = {"params": {"c1": {"kernel": w["c1"].transpose(2, 3, 1, 0)}, "c2": {"kernel": w["c2"].transpose(2, 3, 1, 0)},
                            "f1": {"kernel": w["f1"].T}, "f2": {"kernel": w["f2"].T},
                            "bn": {"scale": rng.uniform(0.5, 2, 3)}},
                 "batch_stats": {"bn": {"var": rng.uniform(0.5, 2, 3)}}}
    return w, layout, flax_vars


def test_deep_norm_matches_numpy_on_pytorch_layout_weights(x64):
    # Independent computation of the reference formula on the PyTorch-layout weights (OIHW, (out, in)).
    w, layout, flax_vars = _torch_layout_net()
    mats = [w[k].reshape(w[k].shape[0], -1) for k in ("c1", "c2", "f1", "f2")]
    s = [np.linalg.svd(m, compute_uv=False)[0] for m in mats]
    t = [np.linalg.norm(m, axis=0).sum() for m in mats]
    corr = sum((sum(t[i + 1:]) ** (2 / 3) if i < 3 else 0.0) / s[i] ** (2 / 3) for i in range(4))
    want = np.prod(s) * corr ** 1.5
    total, parts, _ = jax.jit(lambda v: norms.spectral_complexity(v, layout, definition="deep_norm"))(flax_vars)
    assert rel(float(total), want) < 1e-12
    assert [rel(float(parts[k]["l21"]), tk) for k, tk in zip(("c1", "c2", "f1", "f2"), t)] == pytest.approx([0] * 4, abs=1e-12)
    assert "bn" not in parts  # the reference formula ignores normalization layers


def test_deep_norm_matches_a_transcription_of_the_reference_code(x64):
    torch = pytest.importorskip("torch")
    w, layout, flax_vars = _torch_layout_net()

    # Literal transcription of compute_model_norm (Francill99/deep_norm, cnn/model.py).
    def spectral_norm(weight):
        ww = weight.view(weight.size(0), -1) if weight.ndim > 2 else weight
        return torch.linalg.svdvals(ww)[0]

    def two_one_norm(weight):
        ww = weight.view(weight.size(0), -1) if weight.ndim > 2 else weight
        return torch.sum(torch.norm(ww, p=2, dim=0))

    s_list = [spectral_norm(torch.tensor(w[k])) for k in ("c1", "c2", "f1", "f2")]
    t_list = [two_one_norm(torch.tensor(w[k])) for k in ("c1", "c2", "f1", "f2")]
    prod_spec = torch.tensor(1.0, dtype=torch.float64)
    for s in s_list:
        prod_spec = prod_spec * s
    correction_sum = torch.tensor(0.0, dtype=torch.float64)
    for i in range(4):
        t_sum = sum(t_list[i + 1:]) if i < 3 else torch.tensor(0.0, dtype=torch.float64)
        correction_sum = correction_sum + (t_sum ** (2.0 / 3.0)) / (s_list[i] ** (2.0 / 3.0))
    want = float(prod_spec * correction_sum ** 1.5)
    assert rel(float(norms.spectral_complexity(flax_vars, layout, definition="deep_norm")[0]), want) < 1e-12


def _attention_toy():
    rng = np.random.default_rng(12)
    t, d = 3, 4
    P = lambda *k: ("params",) + k  # noqa: E731
    layout = (
        LinearLayer("ln", "diag", P("ln", "scale"), (t, d), residual=True, fold_into=("q", "k", "v")),
        LinearLayer("q", "dense", P("q", "kernel"), (t, d), residual=True, stack="qkv"),
        LinearLayer("k", "dense", P("k", "kernel"), (t, d), residual=True, stack="qkv"),
        LinearLayer("v", "dense", P("v", "kernel"), (t, d), residual=True, stack="qkv"),
        LinearLayer("out", "dense", P("out", "kernel"), (t, d), residual=True),
        LinearLayer("mlp", "dense", P("mlp", "kernel"), (t, d), residual=True, lipschitz=1.5),
    )
    variables = {"params": {"ln": {"scale": rng.uniform(0.5, 2, d)},
                            **{n: {"kernel": rng.normal(size=(d, d if n != "mlp" else 6))}
                               for n in ("q", "k", "v", "out", "mlp")}}}
    return layout, variables


@pytest.mark.parametrize("attention", norms.ATTENTIONS)
def test_attention_conventions_match_hand_computation(x64, attention):
    layout, v = _attention_toy()
    p = v["params"]
    g = p["ln"]["scale"][:, None]
    qkv = [g * p[n]["kernel"] for n in ("q", "k", "v")]  # LayerNorm scale folded into the input side
    eye = np.eye(4)
    if attention == "stacked":  # one non-square operator [q; k; v]: M = 0
        mats = [(np.concatenate(qkv, axis=1), 0.0, 1.0)]
    else:  # three square factors on the identity branch: M = I each
        mats = [(k, eye, 1.0) for k in qkv]
    mats += [(p["out"]["kernel"], eye, 1.0), (p["mlp"]["kernel"], 0.0, 1.5)]  # mlp: 4 -> 6, not square: M = 0
    prod, acc = 1.0, 0.0
    for k, m, rho in mats:
        s = sigma_max(k)
        prod *= rho * s
        acc += (np.linalg.norm(k - m, axis=0).mean() / s) ** (2 / 3)  # "paper": mean row norm of A = K^T
    total, parts, _ = jax.jit(lambda v: norms.spectral_complexity(v, layout, attention=attention))(v)
    assert rel(float(total), prod * acc ** 1.5) < 1e-12
    assert ("qkv" in parts) == (attention == "stacked")


def test_norm_zoo_matches_independent_computations(x64):
    # conv (BN folded) -> ReLU -> flatten -> dense, written out with unrolled matrices.
    rng = np.random.default_rng(13)
    layout = (
        LinearLayer("conv", "conv", ("params", "conv", "kernel"), (4, 4, 1)),
        LinearLayer("bn", "diag", ("params", "bn", "scale"), (4, 4, 2), var_path=("batch_stats", "bn", "var"),
                    eps=1e-5, fold_into=("conv",)),
        LinearLayer("fc", "dense", ("params", "fc", "kernel"), (32,)),
    )

    def make(scale):
        return {"params": {"conv": {"kernel": scale * rng.normal(size=(3, 3, 1, 2))},
                           "bn": {"scale": rng.uniform(0.5, 2, 2), "bias": rng.normal(size=2)},
                           "fc": {"kernel": scale * rng.normal(size=(32, 3)), "bias": rng.normal(size=3)}},
                "batch_stats": {"bn": {"var": rng.uniform(0.5, 2, 2), "mean": rng.normal(size=2)}}}

    v, v0 = make(1.0), make(0.5)

    def apply_fn(var, x):  # eval-mode forward, independent of jaxnorm.models
        p, st = var["params"], var["batch_stats"]["bn"]
        y = jax.lax.conv_general_dilated(x, p["conv"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = (y - st["mean"]) / jnp.sqrt(st["var"] + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
        return jax.nn.relu(y).reshape(x.shape[0], -1) @ p["fc"]["kernel"] + p["fc"]["bias"]

    def folded(var):
        s = var["params"]["bn"]["scale"] / np.sqrt(var["batch_stats"]["bn"]["var"] + 1e-5)
        return [var["params"]["conv"]["kernel"] * s, var["params"]["fc"]["kernel"]]

    ks, k0s = folded(v), folded(v0)
    a = [unrolled_conv(jnp.asarray(ks[0]), (4, 4, 1), 1, "SAME"), ks[1].T]
    a0 = [unrolled_conv(jnp.asarray(k0s[0]), (4, 4, 1), 1, "SAME"), k0s[1].T]
    spec = [sigma_max(m) for m in a]
    want = {
        "frob_prod": np.prod([np.linalg.norm(k) for k in ks]),
        "spec_prod": np.prod(spec),
        "group21": sum(np.linalg.norm(k.reshape(-1, k.shape[-1]), axis=1).sum() for k in ks),
        "dist_frob": np.sqrt(sum(((k - k0) ** 2).sum() for k, k0 in zip(ks, k0s))),
        "dist_spectral": np.prod(spec) * sum((np.linalg.norm(m - m0, axis=1).mean() / s) ** (2 / 3)
                                             for m, m0, s in zip(a, a0, spec)) ** 1.5,
        "path_l2": np.sqrt((a[1] ** 2 @ (a[0] ** 2 @ np.ones(16))).sum()),
    }
    st = norms.init_norm_state(layout, jax.random.PRNGKey(0), jnp.float64, init_variables=v0)
    r, r2 = jax.jit(lambda v, v0, st: (
        norms.evaluate(v, layout, init_variables=v0, apply_fn=apply_fn, input_shape=(4, 4, 1), tol=1e-13,
                       max_iters=20000),
        norms.evaluate(v, layout, st, tol=1e-13, max_iters=20000)))(v, v0, st)  # through the state's "init"
    for name in norms.ZOO:
        assert rel(float(r.zoo[name]), want[name]) < 1e-8, name
    assert rel(float(r2.zoo["dist_spectral"]), want["dist_spectral"]) < 1e-8
    assert np.isnan(float(r2.zoo["path_l2"]))  # no apply_fn given


def test_numpy_variables_work_for_residual_convs():
    # Variables as loaded from a file: numpy arrays, called eagerly (under jit they would become tracers).
    # The residual conv used to fail in `kernel.at`.
    layout = (LinearLayer("c", "conv", ("params", "k"), (4, 4, 2), residual=True),)
    vn = {"params": {"k": np.random.default_rng(14).normal(size=(3, 3, 2, 2)).astype(np.float32)}}
    a = norms.spectral_complexity(vn, layout)[0]
    b = jax.jit(lambda v: norms.spectral_complexity(v, layout)[0])(jax.tree.map(jnp.asarray, vn))
    assert rel(float(a), float(b)) < 1e-6 and np.isfinite(float(a))
    assert np.isfinite(float(norms.conv_operator_norm(np.ones((3, 3, 1, 1)), (4, 4, 1))))


def test_compare_norms_ranks_a_collapsing_norm_first():
    # Synthetic learning curves: eps = 0.9 lambda^-0.5 until each P saturates (lambda_elbow ~ P), so the curves
    # collapse exactly against lambda ("good"); against epochs (lambda = e^(r_P t), r_P decreasing in P) and a
    # P-dependent rescaling of lambda ("bad" = lambda * P) they do not.
    from jaxnorm import analysis

    rows = []
    for P in (1000, 2000, 4000, 8000):
        for seed in (0, 1):
            for t in range(1, 60):
                lam = np.exp(0.3 * (1000 / P) ** 0.5 * t)
                eps = max(0.9 * lam ** -0.5, 30 / P ** 0.5 + 0.001 * t)  # floor: saturation, then overfitting
                rows.append(dict(P=P, seed=seed, epoch=t, test_error=eps, spectral_complexity=lam,
                                 **{"zoo/good": 3 * lam, "zoo/bad": lam * P}))
    import pandas as pd

    out = analysis.compare_norms(pd.DataFrame(rows))
    assert set(out["column"][:2]) == {"spectral_complexity", "zoo/good"}
    # Exact collapse up to the elbow region kept by early_cut (measured 0.0010 decades); the others > 0.02.
    assert out["spread_mean"].iloc[0] < 2e-3 and out["spread_mean"].iloc[1] < 2e-3
    assert out.set_index("column").loc["zoo/bad", "spread_mean"] > 0.05
    assert out.set_index("column").loc["epoch", "spread_mean"] > 0.01
    with pytest.raises(ValueError, match="zoo/nope"):
        analysis.compare_norms(pd.DataFrame(rows), ["zoo/nope"])
    # Columns whose curves overlap over fewer than min_overlap decades rank after the others, however small their
    # spread on that sliver: here lambda's early phases overlap over 0.32 decades, epoch's over 0.78.
    r = out.set_index("column")
    assert r.loc["spectral_complexity", "overlap_decades"] == pytest.approx(0.32, abs=0.01)
    assert r["thin_overlap"].to_dict() == {"zoo/good": False, "spectral_complexity": False, "epoch": False,
                                           "zoo/bad": True}  # the default min_overlap, 0.2 decades
    strict = analysis.compare_norms(pd.DataFrame(rows), min_overlap=0.5).set_index("column")
    assert strict.loc["spectral_complexity", "thin_overlap"] and not strict.loc["epoch", "thin_overlap"]
    assert strict.loc["epoch", "rank"] == 1 and strict.loc["spectral_complexity", "rank"] > 1


def test_operator_names_are_the_keys_of_parts():
    layout, v = _attention_toy()
    f = jax.jit(lambda v: {(d, n, a): norms.spectral_complexity(v, layout, definition=d, norm_layers=n, attention=a)[1]
                           for d in ("paper", "deep_norm") for n in norms.NORM_LAYERS for a in norms.ATTENTIONS})
    for (d, n, a), parts in f(v).items():
        assert set(norms.operator_names(layout, definition=d, norm_layers=n, attention=a)) == set(parts), (d, n, a)
    assert norms.operator_names(layout) == ["qkv", "out", "mlp"]


def test_deep_norm_with_zoo_reads_the_operators_warm():
    # definition="deep_norm" logs the reference formula; the zoo still needs the operators' norms, which then
    # advance the power-iteration state (no cold start at every evaluation).
    layout, v = _toy()
    st = norms.init_norm_state(layout, jax.random.PRNGKey(0))
    f = jax.jit(lambda v, s: (norms.evaluate(v, layout, s, definition="deep_norm"), norms.evaluate(v, layout, s)))
    dn, paper = f(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), v), st)
    assert int(dn.state["iters"][0]) > 0 and set(dn.parts) == {"conv1", "conv2", "fc"}
    for k in ("spec_prod", "frob_prod", "group21"):
        assert rel(float(dn.zoo[k]), float(paper.zoo[k])) < 1e-6, k


def _vit_path_forward_numpy(params, x):
    """The ViT of jaxnorm.models written out in numpy, with the path-norm conventions applied by hand: every
    LayerNorm is x * scale (normalization = identity), all weights as given (the caller squares them), no biases,
    no class token / position embeddings. x: [H, W, C] -> logits [K]."""
    from math import erf

    gelu = np.vectorize(lambda z: 0.5 * z * (1 + erf(z / np.sqrt(2))))
    k = params["patch_embed"]["kernel"]  # [p, p, C, d]
    p = k.shape[0]
    h, w = x.shape[0] // p, x.shape[1] // p
    patches = x[: h * p, : w * p].reshape(h, p, w, p, -1).transpose(0, 2, 1, 3, 4).reshape(h * w, -1)
    t = np.concatenate([np.zeros((1, k.shape[3])), patches @ k.reshape(-1, k.shape[3])])  # class token = 0
    i = 0
    while f"encoder{i}" in params:
        e = params[f"encoder{i}"]
        y = t * e["ln1"]["scale"]
        a = e["attn"]
        q, kk, v = (np.einsum("td,dhe->the", y, a[n]["kernel"]) for n in ("query", "key", "value"))
        logits = np.einsum("qhe,khe->hqk", q, kk) / np.sqrt(q.shape[-1])
        att = np.exp(logits - logits.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        t = t + np.einsum("qhe,hed->qd", np.einsum("hqk,khe->qhe", att, v), a["out"]["kernel"])
        y = gelu((t * e["ln2"]["scale"]) @ e["mlp1"]["kernel"])
        t = t + y @ e["mlp2"]["kernel"]
        i += 1
    return (t[0] * params["norm"]["scale"]) @ params["head"]["kernel"]


def test_path_norm_of_vit_is_finite_and_matches_a_numpy_forward_pass(x64):
    # LayerNorm counts as its affine part (module docstring): the ViT's l2 path norm used to be NaN (LayerNorm
    # maps the all-ones input to 0). Reference: the same network written out in numpy, weights squared by hand;
    # trained weights (so that LayerNorm scales are not all 1). 1e-10: float64 rounding of two forward passes.
    model, variables = _small_model_variables("vit", steps=5)
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    apply_fn = lambda v, x: model.apply(v, x, False)[0]  # noqa: E731
    got = float(jax.jit(lambda v: norms.path_norm(v, model.layout, apply_fn, model.input_shape))(variables))
    squared = jax.tree.map(lambda a: np.asarray(a) ** 2, variables["params"])
    want = np.sqrt(_vit_path_forward_numpy(squared, np.ones(model.input_shape)).sum())
    assert np.isfinite(got) and rel(got, want) < 1e-10, (got, want)


CERT_TWO_DEVICES = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxnorm import norms
# 8 kernels whose Gram blocks are 2 rows x 24 columns x 16 channels = 768 wide, 4 per device, as the engine's
# per-device norm program batches its replicas (shard_map over devices, vmap over local replicas).
rng = np.random.default_rng(0)
kernels = rng.normal(size=(8, 3, 3, 16, 16)).astype(np.float32)
shape = (4, 24, 16)
truth = np.array([np.linalg.svd(np.asarray(jax.jacobian(lambda x: norms._conv(x, jnp.asarray(k), (1, 1), "SAME"))(
    jnp.zeros(shape, jnp.float32))).reshape(-1, int(np.prod(shape))), compute_uv=False)[0] for k in kernels])
mesh = Mesh(jax.devices(), ("r",))
f = jax.jit(jax.shard_map(jax.vmap(lambda k, g: norms.conv_bound_holds(k, shape, 1, "SAME", g)), mesh=mesh,
                          in_specs=(P("r"), P("r")), out_specs=P("r"), check_vma=False))
put = lambda a: jax.device_put(a, NamedSharding(mesh, P("r")))
above = np.asarray(f(put(kernels), put((truth * 1.001).astype(np.float32))))
below = np.asarray(f(put(kernels), put((truth * 0.999).astype(np.float32))))
# The dense path's eigvalsh (dense_method="svd"), batched the same way: 8 768 x 768 kernels.
mats = rng.normal(size=(8, 768, 768)).astype(np.float32)
h = jax.jit(jax.shard_map(jax.vmap(lambda k: norms._matrix_norms([k])[0]), mesh=mesh, in_specs=P("r"),
                          out_specs=P("r"), check_vma=False))
dense = np.asarray(h(put(mats)))
ok = np.allclose(dense, [np.linalg.svd(m, compute_uv=False)[0] for m in mats], rtol=1e-4)
# The Lanczos cycles' small eigh (16 x 16 tridiagonal per replica), batched the same way.
g = jax.jit(jax.shard_map(jax.vmap(lambda k: norms.conv_operator_norm(k, shape, 1, "SAME", tol=1e-6)), mesh=mesh,
                          in_specs=P("r"), out_specs=P("r"), check_vma=False))
lanczos = np.allclose(np.asarray(g(put(kernels))), truth, rtol=1e-4)
print(int(above.sum()), int(below.sum()), int(ok), int(lanczos))
"""


def test_lapack_norms_batched_on_two_cpu_devices_do_not_hang(tmp_path):
    # jaxlib's batched CPU Cholesky splits its batch over XLA's intra-op pool and, in a program of one of
    # several XLA CPU devices, waits forever for the parts (the engine's exact-bound sweeps on --cpu-devices 2
    # hung in their first evaluation). conv_bound_holds, the dense eigvalsh and the Lanczos cycles' eigh map over
    # the batch on the CPU.
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "cert2.py"
    script.write_text(CERT_TWO_DEVICES)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=150, env=env,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    # Every bound 0.1% above the SVD value holds, every one below fails; the dense norms equal numpy's SVD.
    assert done.stdout.split() == ["8", "0", "1", "1"]


def _clustered_matrix(rng, top2=(1.0, 0.999)):
    """A 60 x 40 matrix with singular values top2, then 38 spread over [0.01, 0.9]: a cluster at the top."""
    u, _ = np.linalg.qr(rng.normal(size=(60, 60)))
    w, _ = np.linalg.qr(rng.normal(size=(40, 40)))
    s = np.concatenate([top2, np.linspace(0.9, 0.01, 38)])
    return jnp.asarray((u[:, :40] * s) @ w.T)


def test_krylov_cycles_converge_where_power_iteration_crawls(x64):
    # sigma_2 / sigma_1 = 0.999: power iteration's error in the top direction falls like 0.998 per product
    # (0.998^340 = 0.5); a 16-step Lanczos cycle's like a Chebyshev polynomial (a factor ~2.2 per 17 products).
    rng = np.random.default_rng(21)
    a = _clustered_matrix(rng)
    v0 = jnp.asarray(rng.normal(size=40))

    def run(k):
        return norms._power_iteration(lambda x: a @ x, lambda y: a.T @ y, v0, min_iters=2, max_iters=340,
                                      tol=1e-12, change_tol=0.0, krylov=k)

    power, lanczos = run(0), run(16)
    assert int(power[2]) == 340 and int(lanczos[2]) <= 340  # Lanczos stops when a cycle changes nothing
    assert 1 - float(power[0]) > 1e-5  # still far: the top pair is not resolved
    assert -1e-14 <= 1 - float(lanczos[0]) < 1e-10  # a lower bound (to rounding), converged
    assert abs(float(jnp.vdot(lanczos[1], jnp.linalg.svd(a)[2][0]))) > 1 - 1e-6  # the top right singular vector


def test_krylov_breakdown_on_a_low_rank_map_is_exact(x64):
    # A rank-1 map: the Krylov space of A^T A is span{v, y} and the third Lanczos vector breaks down (its
    # residual is rounding). The zeroed basis must not produce NaN, and the top pair is exact.
    rng = np.random.default_rng(22)
    x, y = rng.normal(size=30), rng.normal(size=20)
    a = jnp.asarray(np.outer(x, y))
    sigma, v, iters, _, _ = norms._power_iteration(lambda z: a @ z, lambda z: a.T @ z, jnp.asarray(rng.normal(size=20)),
                                                   min_iters=2, max_iters=100, tol=1e-12, krylov=8)
    assert rel(float(sigma), np.linalg.norm(x) * np.linalg.norm(y)) < 1e-12
    assert abs(float(jnp.vdot(v, y / np.linalg.norm(y)))) > 1 - 1e-12
    assert np.all(np.isfinite(np.asarray(v)))


def test_failed_exact_test_restarts_from_a_vector_that_misses_the_top_direction(x64):
    # The warm-start failure: the start vector is exactly a singular vector of a lower singular value (the
    # previous top vector after the weights moved). Its Krylov space is that one direction, so power iteration
    # and Lanczos both return sigma_2 with no change per step. The exact test at (1 + tol) sigma_2 then fails;
    # the next round must restart with a random component and certify sigma_1.
    # A diagonal map and a basis vector keep every product exactly on that direction (a rotated one would
    # leak rounding-level components that power iteration amplifies).
    s = np.concatenate([[3.0, 2.0], np.linspace(1.0, 0.1, 18)])
    a = jnp.asarray(np.diag(s))
    w = np.eye(20)
    v0 = jnp.asarray(w[:, 1])  # the right singular vector of sigma_2 = 2

    def certify(gamma):  # ||A|| < gamma, exactly
        return gamma > 3.0

    for k in (0, 8):
        sigma, v, iters, _, upper = norms._power_iteration(
            lambda z: a @ z, lambda z: a.T @ z, v0, min_iters=2, max_iters=2000, tol=1e-6, certify=certify, krylov=k)
        assert 3.0 / (1 + 1e-6) <= float(sigma) <= 3.0 * (1 + 1e-12), (k, float(sigma))
        assert 3.0 < float(upper) <= (1 + 1e-6) * float(sigma)  # certified, within tol
        assert abs(float(jnp.vdot(v, w[:, 0]))) > 1 - 1e-6
        assert int(iters) < 2000


def test_krylov_option_is_validated_and_optional(x64):
    kernel = jnp.asarray(np.random.default_rng(23).normal(size=(3, 3, 2, 3)))
    truth = sigma_max(unrolled_conv(kernel, (6, 6, 2), 1, "SAME"))
    for k in (0, 2, 16):  # every cycle length, and plain power iteration, reach the same norm
        assert rel(float(norms.conv_operator_norm(kernel, (6, 6, 2), tol=1e-12, max_iters=20000, krylov=k)),
                   truth) < 1e-9
    for bad in (1, -3, 2.5, True):
        with pytest.raises(ValueError, match=r"krylov=.*expected 0 \(plain power iteration\) or an integer >= 2"):
            norms.conv_operator_norm(kernel, (6, 6, 2), krylov=bad)

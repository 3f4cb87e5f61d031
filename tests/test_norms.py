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
    assert set(parts) == {l.name for l in model.layout}
    assert jax.tree.structure(new_state) == jax.tree.structure(states)

"""Tests of one replica: the pure step against a plain optax loop, the divergence freeze, the key
derivation and the data order (nanodo-style: the step itself, no engine, no loop hooks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnorm import data as data_lib
from jaxnorm import models, replica

# The step jitted alone vs inside a scan: XLA may order float32 reductions differently, so results
# agree to rounding (~1e-7 relative per op) amplified over a few Adam steps (~sign(g) at first).
RTOL, ATOL = 2e-4, 2e-5


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(10, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, 300).astype(np.int32)
    x = (means[y] + 2.0 * rng.normal(size=(300, 28, 28, 1))).astype(np.float32)
    model = models.get_model("cnn", (28, 28, 1), 10, size="small")
    return model, x, y


def plain_optax_run(model, x, y, subset, key_data, steps, B, lr):
    """The reference: model.init from the replica's key, optax.adam(lr), one jitted step per batch."""
    k_init, _ = jax.random.split(jax.random.wrap_key_data(jnp.asarray(key_data), impl="threefry2x32"))
    params = model.init(k_init)["params"]
    tx = optax.adam(lr)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, xb, yb, w):
        def loss_fn(p):
            logits, _ = model.apply({"params": p}, xb, train=True)
            return jnp.sum(w * optax.softmax_cross_entropy_with_integer_labels(logits, yb)) / jnp.sum(w)

        loss, g = jax.value_and_grad(loss_fn)(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt, loss

    losses = []
    for s in range(steps):
        idx, w = replica.batch_indices(subset, key_data, s, B)
        params, opt, loss = step(params, opt, x[idx], y[idx], w)
        losses.append(float(loss))
    return params, np.array(losses)


def same(a, b) -> bool:
    """Two pytrees with bitwise-equal leaves."""
    return all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_train_chunks_equal_a_plain_optax_loop(setup):
    model, x, y = setup
    P, B, lr, steps = 37, 8, 1e-3, 12  # 5 steps per epoch: crosses two epoch boundaries, partial batches
    key_data = replica.replica_key_data(0, P, 1)
    subset = data_lib.subset_indices(0, 1, P, len(x))
    ref_params, ref_losses = plain_optax_run(model, x, y, subset, key_data, steps, B, lr)

    tx = replica.make_optimizer("adam")
    state = replica.init(model, tx, jnp.asarray(key_data), lr)
    chunk = jax.jit(replica.make_train_chunk(model, tx))
    order = replica.DataOrder(subset, key_data, B)
    losses = []
    for pos in range(0, steps, 4):  # three chunks of K = 4 steps
        idx, w = order.batches(pos, 4)
        state, loss = chunk(state, x, y, idx, w, np.ones(4, bool))
        losses += list(np.asarray(loss))
    for a, b in zip(jax.tree.leaves(state.variables["params"]), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert not bool(state.diverged)


def test_inactive_steps_leave_the_state_unchanged(setup):
    model, x, y = setup
    tx = replica.make_optimizer("adam")
    state = replica.init(model, tx, jnp.asarray(replica.replica_key_data(0, 40, 0)), 1e-3)
    step = jax.jit(replica.make_train_step(model, tx))
    batch = replica.Batch(x[:8], y[:8], np.ones(8, np.float32), np.asarray(False))
    new, m = step(state, batch)
    assert same(new, state)
    assert np.isnan(m.loss) and bool(m.finite)  # skipped: no loss computed


def test_inactive_steps_are_not_computed_under_lax_map(setup):
    # The engine's CPU path maps the replicas' unbatched steps (lax.map); there an inactive step's
    # lax.cond branch must not run the forward pass at all (count the model's calls on the host).
    model, x, y = setup
    tx = replica.make_optimizer("adam")
    calls = []

    class Counted:
        def __getattr__(self, name):
            return getattr(model, name)

        def apply(self, *a, **k):
            jax.debug.callback(lambda: calls.append(1))
            return model.apply(*a, **k)

    chunk = replica.make_train_chunk(Counted(), tx)
    R, K, B = 3, 4, 8
    keys = jnp.stack([jnp.asarray(replica.replica_key_data(0, 40, s)) for s in range(R)])
    states = jax.vmap(lambda k: replica.init(model, tx, k, 1e-3))(keys)
    idx = np.tile(np.arange(B, dtype=np.int32), (R, K, 1))
    w = np.ones((R, K, B), np.float32)
    active = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    run = jax.jit(lambda st, a: jax.lax.map(lambda t: chunk(t[0], x, y, t[1], t[2], t[3]), (st, idx, w, a)))
    new, losses = run(states, active)
    jax.block_until_ready(new)
    assert len(calls) == int(active.sum()) == 5
    np.testing.assert_array_equal(np.isnan(np.asarray(losses)), ~active)
    slot = lambda tree, r: jax.tree.map(lambda a: a[r], tree)  # noqa: E731
    assert same(slot(new.variables, 2), slot(states.variables, 2))
    assert not same(slot(new.variables, 1), slot(states.variables, 1))


def test_non_finite_update_freezes_the_replica(setup):
    model, x, y = setup
    tx = replica.make_optimizer("adam")
    state = replica.init(model, tx, jnp.asarray(replica.replica_key_data(0, 40, 0)), 1e38)
    step = jax.jit(replica.make_train_step(model, tx))
    batch = replica.Batch(x[:8], y[:8], np.ones(8, np.float32), np.asarray(True))
    # lr 1e38: the first update (~lr * sign(g)) gives params ~1e38, the next overflows to inf.
    prev, (s1, m1) = state, step(state, batch)
    for _ in range(3):
        if bool(s1.diverged):
            break
        prev, (s1, m1) = s1, step(s1, batch)
    assert bool(s1.diverged) and not bool(m1.finite)
    assert same(s1.variables, prev.variables) and same(s1.opt_state, prev.opt_state)  # the update refused
    s2, _ = step(s1, batch)  # and it stays frozen
    assert same(s2.variables, prev.variables) and bool(s2.diverged)


def test_one_key_derivation_per_replica(setup):
    model, _, _ = setup
    # The root key is fold_in(fold_in(key(sweep_seed), P), seed); init and power-iteration vectors
    # come from split(root); the data order from the root's bits. Distinct replicas, distinct keys.
    kd = replica.replica_key_data(3, 40, 2)
    root = jax.random.fold_in(jax.random.fold_in(jax.random.key(3, impl="threefry2x32"), 40), 2)
    np.testing.assert_array_equal(kd, np.asarray(jax.random.key_data(root)))
    state = replica.init(model, replica.make_optimizer("adam"), jnp.asarray(kd), 1e-3)
    expect = model.init(jax.random.split(root)[0])["params"]
    for a, b in zip(jax.tree.leaves(state.variables["params"]), jax.tree.leaves(expect)):
        np.testing.assert_array_equal(a, b)
    keys = {tuple(replica.replica_key_data(0, P, s)) for P in (40, 72, 4000) for s in range(4)}
    assert len(keys) == 12
    orders = {tuple(replica.epoch_order(replica.replica_key_data(0, 40, s), 40, e)) for s in range(3) for e in range(3)}
    assert len(orders) == 9


def test_each_epoch_visits_the_subset_once_without_replacement():
    sub = np.arange(500, 537, dtype=np.int32)  # P = 37, B = 8: 5 steps, the last one with 5 examples
    kd = replica.replica_key_data(0, 37, 0)
    for epoch in range(3):
        seen, weights = [], []
        for b in range(5):
            idx, w = replica.batch_indices(sub, kd, epoch * 5 + b, 8)
            seen += list(idx[w > 0])
            weights.append(w.sum())
        assert sorted(seen) == list(sub) and weights == [8, 8, 8, 8, 5]
    a, _ = replica.batch_indices(sub, kd, 0, 8)
    b, _ = replica.batch_indices(sub, kd, 5, 8)
    assert (a != b).any()  # a new order each epoch


def test_dispatch_batches_equal_the_step_by_step_definition():
    sub = np.arange(100, 137, dtype=np.int32)
    kd = replica.replica_key_data(0, 37, 0)
    order = replica.DataOrder(sub, kd, 8)
    for pos, n in ((0, 1), (3, 9), (4, 16), (2, 3)):  # within, across one / several epochs, backwards
        idx, w = order.batches(pos, n)
        for k in range(n):
            ri, rw = replica.batch_indices(sub, kd, pos + k, 8)
            np.testing.assert_array_equal(idx[k], ri)
            np.testing.assert_array_equal(w[k], rw)

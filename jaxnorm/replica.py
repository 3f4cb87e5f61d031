"""One replica: its state, its pure train step, its initialization and its randomness.

A *replica* is one network of the sweep: training-set size P and seed index s (paper Sec. 3.1).
Everything here is written for ONE replica; the engine maps it over a leading slot axis.

Randomness: one derivation per replica
--------------------------------------
Every random choice of replica (P, s) comes from its key (STYLE.md habit 3)::

    k = fold_in(fold_in(key(sweep_seed), P), s)          # jax.random, threefry2x32
    k_init, k_norm = split(k)                            # parameters; power-iteration start vectors
    order(epoch e) = permutation(P) by numpy PCG64(SeedSequence([*key_data(k), e]))

so any replica can be rerun alone (on any device count, in any slot, with any K) and gives the
same numbers. The data order is drawn on the host with numpy (the batches are assembled there),
seeded by the key's own 64 bits: one root, no second seed family. The one input from outside is
the replica's training subset, :func:`jaxnorm.data.subset_indices` (sweep_seed, s, P): a prefix of
one permutation per seed, so that the subsets of one seed are nested across P (see there).

The step
--------
:func:`make_train_step` returns ``step(state, batch) -> (state, metrics)`` (nanodo's
``train.py``): Adam / AdamW on the weighted mean cross-entropy sum_b w_b CE_b / sum_b w_b
(a partial last batch carries weight-0 padding), with a guard that freezes the replica (params
and optimizer state untouched, ``diverged`` set) when its loss or gradients stop being finite.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnorm import models as models_lib
from jaxnorm import norms as norms_lib

KEY_IMPL = "threefry2x32"


@flax.struct.dataclass
class ReplicaState:
    """The state of one replica (a pytree; stack it along a leading axis for R slots).

    Attributes:
      variables: {"params": ..., maybe "batch_stats": ...} (``jaxnorm.models.Model.init``).
      opt_state: the optax state of ``params``.
      norm_state: power-iteration vectors of ``jaxnorm.norms`` (warm starts across evaluations) and the
        initial weights (the zoo's distances from initialization).
      lr: float32 [], the learning rate.
      diverged: bool [], set once a non-finite loss or gradient froze the replica.
    """

    variables: Any
    opt_state: Any
    norm_state: Any
    lr: jax.Array
    diverged: jax.Array


class Batch(NamedTuple):
    """One step's batch of one replica: x [B, H, W, C], y int32 [B], w float32 [B] (0 = padding),
    active bool [] (False: the step is a no-op, e.g. a slot idling until the end of a dispatch)."""

    x: jax.Array
    y: jax.Array
    w: jax.Array
    active: jax.Array


class StepMetrics(NamedTuple):
    """loss: float32 [], the weighted mean cross-entropy of the batch before the update (NaN for a
    skipped step: inactive or diverged); finite: bool [], loss, gradients and new params all finite
    (True for a skipped step)."""

    loss: jax.Array
    finite: jax.Array


# ------------------------------------------------------------------------------------------------
# Randomness
# ------------------------------------------------------------------------------------------------


def replica_key(sweep_seed: int, P: int, seed: int) -> jax.Array:
    """The root key of replica (P, seed): fold_in(fold_in(key(sweep_seed), P), seed)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(sweep_seed, impl=KEY_IMPL), P), seed)


def replica_key_data(sweep_seed: int, P: int, seed: int) -> np.ndarray:
    """The root key's raw bits, uint32 [2] (host arrays travel and checkpoint more easily than keys)."""
    return np.asarray(jax.random.key_data(replica_key(sweep_seed, P, seed)))


def epoch_order(key_data: np.ndarray, P: int, epoch: int) -> np.ndarray:
    """Positions 0..P-1 of the replica's subset in the order visited at ``epoch`` (int64 [P]).

    Args:
      key_data: the replica's :func:`replica_key_data`.
    """
    seq = np.random.SeedSequence([int(v) for v in np.asarray(key_data, np.uint32)] + [int(epoch)])
    return np.random.Generator(np.random.PCG64(seq)).permutation(P)


def batch_indices(subset: np.ndarray, key_data: np.ndarray, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Training-set indices and weights of optimizer step ``step`` (0-based) of a replica: the definition.

    Epoch e = step // ceil(P / B) visits ``subset`` in :func:`epoch_order` order, B at a time; the
    last batch of an epoch is partial (P mod B examples, as PyTorch's ``drop_last=False``).

    Returns:
      (idx int32 [B], w float32 [B]); a partial batch is padded with weight-0 copies of its first entry.
    """
    P = len(subset)
    epoch, b = divmod(step, -(-P // batch_size))
    pos = epoch_order(key_data, P, epoch)[b * batch_size:(b + 1) * batch_size]
    idx = np.full(batch_size, subset[pos[0]], np.int32)
    idx[:len(pos)] = subset[pos]
    w = np.zeros(batch_size, np.float32)
    w[:len(pos)] = 1.0
    return idx, w


class DataOrder:
    """Host-side batches of one replica, many steps at a time (equal to :func:`batch_indices` step by step).

    Keeps the current epoch's permutation, so consecutive dispatches cost one permutation per epoch.
    """

    def __init__(self, subset: np.ndarray, key_data: np.ndarray, batch_size: int):
        self.subset, self.key_data, self.B = subset, key_data, batch_size
        self.P = len(subset)
        self.spe = -(-self.P // batch_size)
        self._epoch, self._order = -1, None

    def batches(self, pos: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Steps pos .. pos+n-1: idx int32 [n, B], w float32 [n, B]."""
        B = self.B
        idx = np.empty((n, B), np.int32)
        w = np.empty((n, B), np.float32)
        k = 0
        while k < n:
            epoch, b = divmod(pos + k, self.spe)
            m = min(n - k, self.spe - b)  # steps left in this epoch
            if epoch != self._epoch:
                self._epoch, self._order = epoch, epoch_order(self.key_data, self.P, epoch)
            seg = self._order[b * B:(b + m) * B]
            valid = np.zeros(m * B, bool)
            valid[:len(seg)] = True
            full = np.zeros(m * B, np.int64)
            full[:len(seg)] = seg
            ids = self.subset[full].reshape(m, B)
            valid = valid.reshape(m, B)
            idx[k:k + m] = np.where(valid, ids, ids[:, :1])  # pad a partial batch with its first entry
            w[k:k + m] = valid
            k += m
        return idx, w


# ------------------------------------------------------------------------------------------------
# Numerics (pure, one replica)
# ------------------------------------------------------------------------------------------------


def make_optimizer(optimizer: str, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam / AdamW *without* the learning-rate scaling (the lr is a per-replica array).

    ``params - lr * update`` with this transformation equals ``optax.adam(lr)`` /
    ``optax.adamw(lr, weight_decay=wd)`` (which end with ``scale_by_learning_rate``), and PyTorch's
    Adam / AdamW (Appendix E) up to where eps enters, which is the same in both.
    """
    parts = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)]
    if optimizer == "adamw":
        parts.append(optax.add_decayed_weights(weight_decay))
    return optax.chain(*parts)


def init(model: models_lib.Model, tx: optax.GradientTransformation, key_data: jax.Array, lr) -> ReplicaState:
    """A fresh replica from its root key's raw bits (uint32 [2]) and learning rate."""
    k_init, k_norm = jax.random.split(jax.random.wrap_key_data(key_data, impl=KEY_IMPL))
    variables = model.init(k_init)
    return ReplicaState(variables=variables, opt_state=tx.init(variables["params"]),
                        norm_state=norms_lib.init_norm_state(model.layout, k_norm, init_variables=variables),
                        lr=jnp.asarray(lr, jnp.float32), diverged=jnp.asarray(False))


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(model: models_lib.Model, tx: optax.GradientTransformation) -> Callable:
    """``step(state: ReplicaState, batch: Batch) -> (ReplicaState, StepMetrics)``, pure.

    The update is applied only when ``batch.active``, the replica has not diverged, and the loss,
    gradients and new parameters are finite; otherwise the state is returned unchanged (with
    ``diverged`` set when non-finite values appeared), so a NaN never reaches another replica.

    An inactive step (idle slot, diverged replica) is a ``lax.cond`` branch that computes nothing
    and reports loss NaN, finite True. Under ``lax.map`` over replicas (the engine on the CPU) the
    cond really skips the forward and backward pass: with log-spaced evaluations a slot idles up to
    K - 1 steps of a dispatch, and a ResNet sweep had 37.5 % idle replica-steps. Under ``vmap`` the
    batched predicate turns the cond into a select of both branches, which costs what the masked
    update did before.
    """

    def update(state: ReplicaState, batch: Batch):
        variables = state.variables

        def loss_fn(params):
            logits, new_state = model.apply({**variables, "params": params}, batch.x, train=True)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.y)
            return jnp.sum(batch.w * ce) / jnp.maximum(jnp.sum(batch.w), 1.0), new_state

        (loss, new_vars), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, state.opt_state, variables["params"])
        params = jax.tree.map(lambda p, u: p - state.lr * u, variables["params"], updates)
        finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(params)
        new = state.replace(variables={**variables, **new_vars, "params": params}, opt_state=opt_state)
        out = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
        return out.replace(diverged=~finite), StepMetrics(loss, finite)

    def skip(state: ReplicaState, batch: Batch):
        # Built from the state, not as constants: inside shard_map a cond's branches must agree in
        # their varying manual axes too, and constants would not vary over the replica axis.
        return state, StepMetrics((state.lr * jnp.nan).astype(jnp.float32), state.diverged | True)

    def step(state: ReplicaState, batch: Batch):
        return jax.lax.cond(batch.active & ~state.diverged, update, skip, state, batch)

    return step


def make_train_chunk(model: models_lib.Model, tx: optax.GradientTransformation, unroll: int = 1) -> Callable:
    """``chunk(state, x_train, y_train, idx int32 [K, B], w [K, B], active bool [K]) -> (state, loss [K])``:
    K steps by ``lax.scan``, each batch gathered on the device from the training set (x_train [N, ...])."""
    step = make_train_step(model, tx)

    def chunk(state, x_train, y_train, idx, w, active):
        def body(s, inp):
            i, wk, a = inp
            s, m = step(s, Batch(jnp.take(x_train, i, axis=0), jnp.take(y_train, i, axis=0), wk, a))
            return s, m.loss

        return jax.lax.scan(body, state, (idx, w, active), unroll=max(1, min(unroll, idx.shape[0])))

    return chunk

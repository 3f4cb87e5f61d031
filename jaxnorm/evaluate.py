"""Evaluation of replicas: test and train loss/error, test margins and the spectral complexity.

Per replica (pure; vmapped over the evaluated replicas):
  * :func:`make_metrics`: cross-entropy and 0-1 error summed over a masked chunk of examples, and
    the margins f_y - max_{j != y} f_j (paper Fig. 6 right);
  * :func:`make_norms`: THE norm call of the evaluation (``jaxnorm.norms.evaluate``: R_A of paper
    Eq. 2 with its certified interval, warm-started from the replica's power-iteration vectors, and
    the norm zoo). Its ``parts`` become ``norm/<operator>/<name>`` columns, its bounds and zoo one
    column each.

:class:`Evaluator` runs them on the slots of a sharded :class:`jaxnorm.replica.ReplicaState`
without any cross-device communication (the design's invariant; see ``jaxnorm.engine``): each
device picks its own due slots by *local* index (``shard_map``), evaluates them, and writes the
updated power-iteration vectors back in place; the host then reads each device's results from its
own shard. The test set (a fixed ``test_subset`` or all of it) and the training set are replicated
on every device; test and train examples go in chunks of ``eval_batch``.
"""

from __future__ import annotations

import collections
import functools
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxnorm import models as models_lib
from jaxnorm import norms as norms_lib

AXIS = "replica"


class EvalResult(NamedTuple):
    """Host results for n evaluated replicas, in the order they were asked for.

    test_loss, test_error, train_loss, train_error, spectral_complexity: float64 [n] (means over
    examples); layers: {operator: {"spec", "spec_upper", "l21"}: [n]}; norm_columns: {column: [n]}, the
    certified bounds (``spectral_complexity_upper``, ``norm_max_gap``, ``norm_unconverged``) and the zoo
    (``zoo/<name>``, :data:`jaxnorm.norms.ZOO`); margins: float32 [n, n_test] or None.
    """

    test_loss: np.ndarray
    test_error: np.ndarray
    train_loss: np.ndarray
    train_error: np.ndarray
    spectral_complexity: np.ndarray
    layers: dict
    norm_columns: dict
    margins: np.ndarray | None


def make_metrics(model) -> Callable:
    """``f(variables, x [n, ...], y [n], mask [n]) -> (loss_sum [], err_sum [], margins [n])`` for one replica."""

    def f(variables, x, y, mask):
        logits, _ = model.apply(variables, x, train=False)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        err = (jnp.argmax(logits, -1) != y).astype(jnp.float32)
        fy = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
        other = jnp.max(jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits), -1)
        return jnp.sum(mask * ce), jnp.sum(mask * err), fy - other

    return f


def make_norms(model, **norm_kw) -> Callable:
    """``f(variables, norm_state) -> jaxnorm.norms.NormResult`` for one replica: R_A with its certified
    interval, the per-operator parts, the norm zoo and the new power-iteration state."""
    apply_fn = lambda v, x: model.apply(v, x, train=False)[0]  # noqa: E731 -- the zoo's l2 path norm
    return lambda variables, state: norms_lib.evaluate(variables, model.layout, state, apply_fn=apply_fn,
                                                       input_shape=model.input_shape, **norm_kw)


def _per_device(f, mesh: Mesh, in_specs, out_specs):
    # check_vma=False: the functions have no collectives to check, and linear_transpose inside the
    # norms' power iteration trips the varying-manual-axes check.
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


class Programs(NamedTuple):
    traces: collections.Counter
    select: Callable
    put_norm_state: Callable
    norms: Callable
    test: Callable
    train: Callable


@functools.cache
def programs(model_spec: tuple, norm_kw: tuple, mesh: Mesh, replica_axis: str = "vmap") -> Programs:
    """The jitted evaluation programs on a 1-D ``replica`` mesh, cached by their arguments (plain data).

    Args:
      model_spec: arguments of ``jaxnorm.models.get_model`` (name, input_shape, num_classes, size, conv_impl).
      norm_kw: sorted (name, value) options of ``jaxnorm.norms.evaluate``.
      mesh: the mesh.
      replica_axis: how the test/train metrics run over a device's replicas, as the engine's training does:
        "vmap" (one batched model: accelerators) or "map" (``lax.map``, the unbatched model one replica after
        another: XLA:CPU, where a vmapped conv net becomes slow grouped convolutions; in a LeNet-5 sweep on
        2 CPU devices the vmapped metrics took as long as the training itself). The norms are always vmapped.
    """
    model = models_lib.get_model(*model_spec[:3], size=model_spec[3], conv_impl=model_spec[4])
    trace_count = collections.Counter()
    s, r = PartitionSpec(AXIS), PartitionSpec()
    metrics, norms = make_metrics(model), make_norms(model, **dict(norm_kw))
    sharded = NamedSharding(mesh, s)

    def select(states, where):
        return jax.tree.map(lambda a: a[where], states)

    def put_norm_state(states, new, where, valid):
        def put(a, b):
            keep = valid.reshape(valid.shape + (1,) * (b.ndim - 1))
            return a.at[where].set(jnp.where(keep, b, a[where]))

        return states.replace(norm_state=jax.tree.map(put, states.norm_state, new))

    def norms_all(variables, state):
        trace_count["norms"] += 1
        return jax.vmap(norms)(variables, state)

    if replica_axis == "map":
        def over_replicas(f, variables, *per_replica, shared=()):
            return lax.map(lambda a: f(a[0], *shared, *a[1:]), (variables, *per_replica))
    else:
        def over_replicas(f, variables, *per_replica, shared=()):
            return jax.vmap(lambda v, *rest: f(v, *shared, *rest))(variables, *per_replica)

    def test(variables, x, y, mask):
        trace_count["eval_test"] += 1
        return over_replicas(metrics, variables, shared=(x, y, mask))

    def train(variables, x_train, y_train, idx, mask):
        trace_count["eval_train"] += 1

        def one(v, i, m):
            return metrics(v, jnp.take(x_train, i, axis=0), jnp.take(y_train, i, axis=0), m)

        return over_replicas(one, variables, idx, mask)

    jit = functools.partial(jax.jit, out_shardings=sharded)
    return Programs(
        traces=trace_count,
        select=jit(_per_device(select, mesh, (s, s), s)),
        put_norm_state=jit(_per_device(put_norm_state, mesh, (s, s, s, s), s)),
        norms=jit(_per_device(norms_all, mesh, (s, s), s)),
        test=jit(_per_device(test, mesh, (s, r, r, r), s)),
        train=jit(_per_device(train, mesh, (s, r, r, s, s), s)),
    )


class Evaluator:
    """Evaluates chosen slots of a sharded replica state (see the module docstring).

    Args:
      model_spec: (name, input_shape, num_classes, size, conv_impl) of ``jaxnorm.models.get_model``.
      mesh: the 1-D ``replica`` mesh of the slots.
      x_test, y_test: the host test set, float32 [N, H, W, C], int [N].
      x_train, y_train: the training set already on the devices (replicated).
      eval_batch: examples per chunk.
      test_subset: 0 = all test examples; n > 0: a fixed subset of n (the first n of a permutation
        of the test split drawn with numpy seed 0).
      train_eval_max: 0 = train loss/error on the replica's whole subset; n: on its first n examples.
      norm_kw: options of ``jaxnorm.norms.evaluate``.
      replica_axis: "vmap" or "map": the metrics over a device's replicas (:func:`programs`).
    """

    def __init__(self, model_spec: tuple, mesh: Mesh, x_test, y_test, x_train, y_train, *, eval_batch: int,
                 test_subset: int, train_eval_max: int, norm_kw: dict, replica_axis: str = "vmap"):
        self.mesh, self.n_dev = mesh, mesh.devices.size
        self.x_train, self.y_train = x_train, y_train
        self.train_eval_max = train_eval_max
        self.p = programs(tuple(model_spec), tuple(sorted(norm_kw.items())), mesh, replica_axis)
        # Wall seconds spent in the norm evaluation and in the test/train metrics (host included), summed
        # over calls: the engine reports them (cost of norm logging against training; issue 11).
        self.seconds = {"eval_norms": 0.0, "eval_metrics": 0.0}
        self.sharded, self.repl = NamedSharding(mesh, PartitionSpec(AXIS)), NamedSharding(mesh, PartitionSpec())
        n = len(x_test)
        sel = (np.random.Generator(np.random.PCG64(0)).permutation(n)[:test_subset]
               if test_subset and test_subset < n else np.arange(n))
        self.n_test = len(sel)
        self.eb = eb = min(eval_batch, len(sel))
        chunks = -(-len(sel) // eb)
        pad = chunks * eb - len(sel)
        sel_p = np.concatenate([sel, np.full(pad, sel[0])])
        mask = np.concatenate([np.ones(len(sel), np.float32), np.zeros(pad, np.float32)])
        put = lambda a: [jax.device_put(c, self.repl) for c in a.reshape((chunks, eb) + a.shape[1:])]
        self.test_chunks = list(zip(put(np.asarray(x_test, np.float32)[sel_p]),
                                    put(np.asarray(y_test)[sel_p].astype(np.int32)), put(mask)))

    def layout_of(self, slots: Sequence[int], n_slots: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Per-device sub-batch of ``slots``: local indices int32 [D*m], valid bool [D*m], and for each
        requested slot its position in the sub-batch. m is a power of two (few shapes to compile)."""
        per = n_slots // self.n_dev
        groups = [[r for r in slots if r // per == d] for d in range(self.n_dev)]
        m = min(1 << (max(len(g) for g in groups) - 1).bit_length(), per)
        where = np.zeros((self.n_dev, m), np.int32)
        valid = np.zeros((self.n_dev, m), bool)
        pos = {}
        for d, g in enumerate(groups):
            for i, r in enumerate(g):
                where[d, i], valid[d, i], pos[r] = r % per, True, d * m + i
            if g:  # pad with copies of the device's first slot: the same values are written back
                where[d, len(g):], valid[d, len(g):] = g[0] % per, True
        return where.reshape(-1), valid.reshape(-1), [pos[r] for r in slots]

    def __call__(self, states, slots: Sequence[int], subsets: Sequence[np.ndarray], want_margins: bool):
        """Evaluates ``slots`` (global slot indices) of ``states`` (sharded, R slots).

        Args:
          subsets: each slot's training subset (global training-set indices).
          want_margins: also return the test margins.

        Returns:
          (states with the evaluated slots' power-iteration vectors updated, :class:`EvalResult`).
        """
        n_slots = jax.tree.leaves(states)[0].shape[0]
        where, valid, pos = self.layout_of(slots, n_slots)
        put = lambda a: jax.device_put(a, self.sharded)
        where_d = put(where)
        t0 = time.perf_counter()
        sub = self.p.select(states, where_d)
        nres = self.p.norms(sub.variables, sub.norm_state)
        states = self.p.put_norm_state(states, nres.state, where_d, put(valid))
        # Waiting here costs the overlap of the norms with the metrics' dispatch (small: both are
        # compute-bound on the same devices) and buys a separate time for each.
        jax.block_until_ready((nres.total, states))
        t1 = time.perf_counter()
        self.seconds["eval_norms"] += t1 - t0
        test = [self.p.test(sub.variables, x, y, m) for x, y, m in self.test_chunks]
        # Train loss/error on each slot's subset (its first train_eval_max examples when set).
        n = len(where)
        train_sets = [None] * n
        for p, s in zip(pos, subsets):
            train_sets[p] = s[: self.train_eval_max] if self.train_eval_max else s
        for i in range(n):  # padding entries: any real slot's set (their results are dropped)
            if train_sets[i] is None:
                train_sets[i] = train_sets[pos[0]]
        n_tr = np.array([len(s) for s in train_sets], np.float64)
        eb = self.eb
        train = []
        for c in range(-(-int(n_tr.max()) // eb)):
            idx = np.zeros((n, eb), np.int32)
            mask = np.zeros((n, eb), np.float32)
            for i, s in enumerate(train_sets):
                part = s[c * eb:(c + 1) * eb]
                idx[i, :len(part)], mask[i, :len(part)] = part, 1.0
            train.append(self.p.train(sub.variables, self.x_train, self.y_train, put(idx), put(mask)))
        # Host reads: each array's shards come from their own devices (no collective).
        host = lambda a: np.asarray(a, np.float64)
        t_loss = sum(host(l) for l, _, _ in test)
        t_err = sum(host(e) for _, e, _ in test)
        tr_loss = sum(host(l) for l, _, _ in train)
        tr_err = sum(host(e) for _, e, _ in train)
        margins = None
        if want_margins:
            margins = np.concatenate([np.asarray(m) for _, _, m in test], axis=1)[pos, : self.n_test]
        layers = {name: {k: host(v)[pos] for k, v in d.items()} for name, d in nres.parts.items()}
        scalars = {"spectral_complexity_upper": nres.total_upper, "norm_max_gap": nres.max_gap,
                   "norm_unconverged": nres.unconverged, **{f"zoo/{k}": v for k, v in nres.zoo.items()}}
        self.seconds["eval_metrics"] += time.perf_counter() - t1
        return states, EvalResult(t_loss[pos] / self.n_test, t_err[pos] / self.n_test, tr_loss[pos] / n_tr[pos],
                                  tr_err[pos] / n_tr[pos], host(nres.total)[pos], layers,
                                  {k: host(v)[pos] for k, v in scalars.items()}, margins)

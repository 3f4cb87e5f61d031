"""The sweep engine: many (P, seed) replicas trained at once, vmapped, sharded and checkpointed.

Paper Sec. 3.1: for every training-set size P and seed, train a network on a random P-subset
for a fixed number of epochs and log, along the way, the test error against the spectral
complexity R_A(t) (Eq. 2). Here a *replica* is one (P, seed) pair; everything random about it
(its subset, its initialization, its data order) is derived from (sweep_seed, P, seed), so any
replica can be rerun alone and gives the same numbers.

Design (the Python driver is thin; numerics are pure functions)
-------------------------------------------------------------------
* ``replica_step`` is the pure per-replica train step (Adam / AdamW, cross-entropy, a weight
  mask for the last partial batch, a per-replica ``isfinite`` guard). ``replica_chunk`` scans
  it over ``K = steps_per_dispatch`` steps (unrolled ``scan_unroll`` times); the engine maps that
  over a leading axis of R replica *slots*, either batched (``replica_axis="vmap"``, the default
  on accelerators) or looped inside the dispatch (``"map"``: ``lax.map`` within each device's
  shard, the faster one on CPU), and ``jax.jit``-s it once. The data lives on the device; each
  dispatch receives only the int32 indices of its batches and gathers them there.
* **Schedule: a pool of slots** (:class:`Scheduler`). Jobs (P, seed) are queued longest first
  (LPT); a slot whose job finishes is refilled with the next job at the next dispatch. A slot
  that reaches one of its evaluation epochs inside a dispatch idles for the rest of it
  (never when ``K = 1``), and when the queue is empty the slot array is compacted to a
  smaller size (a ladder R, ~3R/4, ~R/2, ... of multiples of the device count) so that the
  drain at the end does not idle most slots. The fraction of idle replica-steps is measured
  (``summary.json``) and :func:`simulate_idle_fraction` computes it for any grid without
  training (see ``bench/bench_engine.py --idle``).
* Data order: epoch e of replica (P, s) visits its subset in the order of a permutation drawn
  on the host from ``SeedSequence([sweep_seed, P, s, e])`` (independent of how steps are
  grouped into dispatches, so results do not depend on K, R or the device count beyond float
  rounding). The last batch of an epoch is partial (``P mod B`` examples, as PyTorch's
  ``drop_last=False``): it is padded with weight-0 entries. (BatchNorm batch statistics see the
  padding entries, which are copies of the replica's own examples.)
* Evaluation (host-driven, at each replica's evaluation epochs): the slots due are gathered
  into a sub-batch; one vmapped call computes the spectral complexity (jaxnorm.norms,
  warm-started from the power-iteration vectors kept in each slot's state), then test and
  train loss/error in chunks of ``eval_batch`` examples, and the test margins
  f_y - max_{j != y} f_j when the epoch is in ``margin_epochs``.
* A replica whose loss or gradients stop being finite is frozen (its update is masked out, so
  the other replicas never see its NaNs), flagged with one ``diverged=True`` row and its slot
  is given to the next job.
* Devices: the slot axis is sharded over all devices with a 1-D ``Mesh`` ("replica") and
  ``NamedSharding``; the dataset is replicated; R is a multiple of the device count (empty
  slots are masked dummies). Plain ``jax.jit``; no pmap.
* Checkpoints (orbax): the slot states, the scheduler and the byte length of the results file
  are saved together, atomically, every ``checkpoint_minutes`` / ``checkpoint_epochs`` and at
  the end. Results are appended to ``results.csv`` (one ``write`` + ``fsync`` per evaluation
  batch) and trimmed back to the checkpoint's length on resume, so a SIGKILL at any point
  followed by a rerun gives the rows of an uninterrupted run. Margin files are written
  atomically (tmp + rename). No PRNG key is stored: all randomness is re-derived.

Multi-host: replicas are independent, so a sweep splits over hosts without collectives. Run one
process per host on its local devices (``jax.local_devices()``, the default here), each with a
disjoint share of the jobs (``--seed-start h*n --seeds n``, or disjoint ``--p`` lists) and its own
``--out``; ``jaxnorm.results.load([dir_0, dir_1, ...])`` concatenates the tables. Replica (P, s)
gives the same numbers wherever it runs. (A single global mesh over ``jax.distributed`` is not
used: it would add cross-host synchronization to every dispatch for no benefit.)

Resume semantics (``run(..., resume=None)``): a run directory that holds a ``config.json`` is
resumed from its latest checkpoint when its science fields (everything but
``config.ENGINE_KEYS``) equal the requested config; a difference raises ``RunDirMismatch``
naming the fields. A finished run is a no-op. ``resume=True`` requires an existing run;
``overwrite=True`` replaces it. The run directory is locked for the whole call (``jaxnorm.rundir``:
a second writer is refused at once, a killed one leaves no stale lock); a directory that is not a
jaxnorm run is refused, and ``overwrite`` deletes a jaxnorm run only after the new config and data
have been checked.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxnorm import config as config_lib
from jaxnorm import data as data_lib
from jaxnorm import models as models_lib
from jaxnorm import norms as norms_lib
from jaxnorm import rundir

RESULTS_FILE = "results.csv"
CONFIG_FILE = "config.json"
VERSIONS_FILE = "versions.json"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
MARGIN_DIR = "margins"
BASE_COLUMNS = ("arch", "dataset", "size", "P", "seed", "replica", "epoch", "step", "test_error",
                "test_loss", "train_error", "train_loss", "spectral_complexity", "wall_time", "diverged", "lr")
# jaxnorm.norms.evaluate: R_A from the certified upper spectral norms, the largest certified relative gap
# spec_upper / spec - 1 over the operators, and the number of readings that stopped at max_iters unconverged.
NORM_BOUND_COLUMNS = ("spectral_complexity_upper", "norm_max_gap", "norm_unconverged")


class RunDirMismatch(ValueError):
    """The run directory holds a different sweep."""


# ------------------------------------------------------------------------------------------------
# Jobs and the schedule (pure host-side Python; no JAX)
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    """One replica (P, seed).

    Attributes:
      index: position in the sweep's job list.
      replica: stable id ``P * 1000 + seed`` (unique for seed < 1000), the ``replica`` column.
      P, seed: training-set size and seed index.
      lr: its learning rate.
      steps_per_epoch: ceil(P / batch_size).
      eval_steps: sorted optimizer-step counts at which it is evaluated (epochs * steps_per_epoch).
      total_steps: epochs * steps_per_epoch.
    """

    index: int
    replica: int
    P: int
    seed: int
    lr: float
    steps_per_epoch: int
    eval_steps: tuple[int, ...]
    total_steps: int


def make_jobs(P: Sequence[int], seeds: Sequence[int], epochs: int, batch_size: int,
              eval_epochs: Sequence[int], lr: float = 1e-3,
              lr_overrides: Sequence[tuple[int, int, float]] = ()) -> list[Job]:
    """The sweep's jobs, longest first (LPT order: it minimizes the idle tail of the pool)."""
    over = {(p, s): l for p, s, l in lr_overrides}
    specs = sorted(((p, s) for p in P for s in seeds), key=lambda ps: (-ps[0], ps[1]))
    jobs = []
    for i, (p, s) in enumerate(specs):
        spe = -(-p // batch_size)
        jobs.append(Job(i, p * 1000 + s, p, s, float(over.get((p, s), lr)), spe,
                        tuple(e * spe for e in eval_epochs), epochs * spe))
    return jobs


def slot_ladder(n_slots: int, n_devices: int, ratio: float = 0.75) -> list[int]:
    """Allowed slot counts, largest first: n_slots, ~ratio*n_slots, ..., n_devices (multiples of n_devices)."""
    sizes, r = [], n_slots
    while True:
        r = max(n_devices, -(-r // n_devices) * n_devices)
        if sizes and r >= sizes[-1]:
            # Rounding up to a multiple of n_devices undid the shrink (e.g. 2 devices: 4 -> 3 -> 4):
            # step down one multiple, or the ladder never reaches n_devices and this loops forever.
            r = sizes[-1] - n_devices  # >= n_devices: sizes[-1] is a multiple of it and > n_devices
        sizes.append(r)
        if r == n_devices:
            return sizes
        r = int(math.floor(r * ratio))


class Scheduler:
    """A pool of R replica slots over a queue of jobs (host-side state only).

    Per slot: the job it runs (or None) and how many optimizer steps that job has taken.
    ``plan()`` gives each slot its number of steps for the next dispatch of K steps (up to its
    next evaluation step or its end); ``advance()`` applies them.
    """

    def __init__(self, jobs: Sequence[Job], n_slots: int, steps_per_dispatch: int, n_devices: int = 1,
                 compact_min_steps: int = 1000):
        self.jobs = list(jobs)
        self.compact_min_steps = compact_min_steps
        self.K = int(steps_per_dispatch)
        self.n_devices = n_devices
        self.ladder = slot_ladder(n_slots, n_devices)
        self.slot_job: list[int | None] = [None] * n_slots
        self.slot_pos: list[int] = [0] * n_slots
        self.slot_evaluated: list[int] = [-1] * n_slots  # last step evaluated
        self.queue = collections.deque(range(len(self.jobs)))
        self.finished: dict[int, bool] = {}  # job index -> diverged
        self.busy_steps = 0  # replica-steps that trained
        self.idle_steps = 0  # replica-steps of a slot that did nothing during a dispatch

    @property
    def n_slots(self) -> int:
        return len(self.slot_job)

    def done(self) -> bool:
        return not self.queue and all(j is None for j in self.slot_job)

    def fill(self) -> list[tuple[int, int]]:
        """Assigns queued jobs to empty slots; returns the new (slot, job index) pairs."""
        new = []
        for r in range(self.n_slots):
            if self.slot_job[r] is None and self.queue:
                j = self.queue.popleft()
                self.slot_job[r], self.slot_pos[r], self.slot_evaluated[r] = j, 0, -1
                new.append((r, j))
        return new

    def due_for_eval(self) -> list[int]:
        """Slots whose job sits at one of its evaluation steps not yet evaluated."""
        out = []
        for r, j in enumerate(self.slot_job):
            if j is not None and self.slot_pos[r] != self.slot_evaluated[r] and \
                    self.slot_pos[r] in self._eval_set(j):
                out.append(r)
        return out

    def _eval_set(self, j: int) -> frozenset:
        cache = self.__dict__.setdefault("_eval_cache", {})
        if j not in cache:
            cache[j] = frozenset(self.jobs[j].eval_steps)
        return cache[j]

    def mark_evaluated(self, slots: Sequence[int]) -> None:
        for r in slots:
            self.slot_evaluated[r] = self.slot_pos[r]

    def release_finished(self) -> list[int]:
        """Frees the slots whose job has taken all its steps; returns those slots."""
        out = []
        for r, j in enumerate(self.slot_job):
            if j is not None and self.slot_pos[r] >= self.jobs[j].total_steps:
                self.finished[j] = False
                self.slot_job[r] = None
                out.append(r)
        return out

    def stop(self, r: int, diverged: bool = True) -> None:
        """Stops slot r's job (divergence)."""
        self.finished[self.slot_job[r]] = diverged
        self.slot_job[r] = None

    def compaction(self) -> list[int] | None:
        """When the queue is empty, the occupied slots fit a smaller ladder size and the longest of them
        has at least ``compact_min_steps`` steps left: the slots to keep (occupied first, padded with
        empty ones); else None."""
        if self.queue:
            return None
        occupied = [r for r, j in enumerate(self.slot_job) if j is not None]
        smaller = [s for s in self.ladder if len(occupied) <= s < self.n_slots]
        if not smaller or not occupied:
            return None
        # A new slot count costs a compilation: worth it only when much training is left.
        left = max(self.jobs[self.slot_job[r]].total_steps - self.slot_pos[r] for r in occupied)
        if left < self.compact_min_steps:
            return None
        size = smaller[-1]
        empty = [r for r, j in enumerate(self.slot_job) if j is None]
        return occupied + empty[: size - len(occupied)]

    def apply_compaction(self, keep: Sequence[int]) -> None:
        self.slot_job = [self.slot_job[r] for r in keep]
        self.slot_pos = [self.slot_pos[r] for r in keep]
        self.slot_evaluated = [self.slot_evaluated[r] for r in keep]

    def plan(self) -> np.ndarray:
        """Steps each slot takes in the next dispatch: int [R] in [0, K]."""
        n = np.zeros(self.n_slots, np.int64)
        for r, j in enumerate(self.slot_job):
            if j is None:
                continue
            job, pos = self.jobs[j], self.slot_pos[r]
            nxt = next((s for s in job.eval_steps if s > pos), job.total_steps)
            n[r] = min(self.K, nxt - pos, job.total_steps - pos)
        return n

    def advance(self, n: np.ndarray) -> None:
        for r, j in enumerate(self.slot_job):
            if j is not None:
                self.slot_pos[r] += int(n[r])
        self.busy_steps += int(n.sum())
        self.idle_steps += int(self.n_slots * self.K - n.sum())

    def idle_fraction(self) -> float:
        total = self.busy_steps + self.idle_steps
        return self.idle_steps / total if total else 0.0

    def state_dict(self) -> dict:
        return dict(slot_job=self.slot_job, slot_pos=self.slot_pos, slot_evaluated=self.slot_evaluated,
                    queue=list(self.queue), finished={str(k): v for k, v in self.finished.items()},
                    busy_steps=self.busy_steps, idle_steps=self.idle_steps, K=self.K)

    def load_state_dict(self, d: dict) -> None:
        self.slot_job, self.slot_pos = list(d["slot_job"]), list(d["slot_pos"])
        self.slot_evaluated = list(d["slot_evaluated"])
        self.queue = collections.deque(d["queue"])
        self.finished = {int(k): v for k, v in d["finished"].items()}
        self.busy_steps, self.idle_steps = d["busy_steps"], d["idle_steps"]


def simulate_idle_fraction(P: Sequence[int], seeds: int, epochs: int, batch_size: int,
                           eval_epochs: Sequence[int], n_slots: int, steps_per_dispatch: int = 1,
                           n_devices: int = 1) -> dict:
    """Runs the :class:`Scheduler` without training and returns its idle fraction.

    Dispatches in which every occupied slot takes the same number of steps are merged, which changes
    nothing but the simulation's speed.

    Returns:
      dict(idle_fraction, busy_steps, idle_steps, dispatches).
    """
    jobs = make_jobs(P, range(seeds), epochs, batch_size, eval_epochs)
    sched = Scheduler(jobs, n_slots, steps_per_dispatch, n_devices)
    dispatches = 0
    while True:
        sched.fill()
        sched.mark_evaluated(sched.due_for_eval())
        if sched.release_finished() and sched.queue:
            continue
        if sched.done():
            break
        keep = sched.compaction()
        if keep is not None:
            sched.apply_compaction(keep)
        n = sched.plan()
        # Fast-forward: with K = 1 every occupied slot takes one step per dispatch until the next event
        # of any slot (an evaluation step or an end); take that many dispatches at once.
        if sched.K == 1:
            gaps = []
            for r, j in enumerate(sched.slot_job):
                if j is not None:
                    job, pos = sched.jobs[j], sched.slot_pos[r]
                    gaps.append(next((s for s in job.eval_steps if s > pos), job.total_steps) - pos)
            m = max(1, min(gaps))
            for r, j in enumerate(sched.slot_job):
                if j is not None:
                    sched.slot_pos[r] += int(n[r]) * m
            sched.busy_steps += int(n.sum()) * m
            sched.idle_steps += (sched.n_slots - int(n.sum())) * m
            dispatches += m
        else:
            sched.advance(n)
            dispatches += 1
    return dict(idle_fraction=sched.idle_fraction(), busy_steps=sched.busy_steps, idle_steps=sched.idle_steps,
                dispatches=dispatches)


# ------------------------------------------------------------------------------------------------
# The per-replica numerics (pure; vmapped by the engine)
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


def _all_finite(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_replica_step(model: models_lib.Model, tx: optax.GradientTransformation) -> Callable:
    """``step(slot, x_train, y_train, idx [B], w [B], active) -> slot`` for one replica.

    ``slot`` is a dict with ``variables`` ({"params", maybe "batch_stats"}), ``opt_state``,
    ``norm_state``, ``lr`` (scalar) and ``diverged`` (bool). The loss is the weighted mean
    cross-entropy sum_b w_b CE_b / sum_b w_b. The update is applied only when ``active``, the
    replica has not diverged, and the loss and gradients are finite; otherwise the slot is
    returned unchanged (with ``diverged`` set when non-finite values appeared).
    """

    def step(slot, x_train, y_train, idx, w, active):
        x = jnp.take(x_train, idx, axis=0)
        y = jnp.take(y_train, idx, axis=0)
        variables = slot["variables"]

        def loss_fn(params):
            logits, new_state = model.apply({**variables, "params": params}, x, train=True)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1.0), new_state

        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, slot["opt_state"], variables["params"])
        params = jax.tree.map(lambda p, u: p - slot["lr"] * u, variables["params"], updates)
        finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(params)
        ok = active & ~slot["diverged"]
        take = ok & finite
        new = {**slot, "variables": {**variables, **new_state, "params": params}, "opt_state": opt_state}
        out = jax.tree.map(lambda a, b: jnp.where(take, a, b), new, slot)
        out["diverged"] = slot["diverged"] | (ok & ~finite)
        return out

    return step


def make_replica_chunk(model, tx, unroll: int = 1) -> Callable:
    """``chunk(slot, x_train, y_train, idx [K, B], w [K, B], active [K]) -> slot``: K steps by lax.scan."""
    step = make_replica_step(model, tx)

    def chunk(slot, x_train, y_train, idx, w, active):
        def body(s, inp):
            return step(s, x_train, y_train, *inp), None

        slot, _ = jax.lax.scan(body, slot, (idx, w, active), unroll=max(1, min(unroll, idx.shape[0])))
        return slot

    return chunk


def init_replica(model: models_lib.Model, tx, key_data: jax.Array, lr) -> dict:
    """A fresh slot state for one replica from its raw uint32 key data [2]."""
    key = jax.random.wrap_key_data(key_data, impl="threefry2x32")
    k_model, k_norm = jax.random.split(key)
    variables = model.init(k_model)
    return dict(variables=variables, opt_state=tx.init(variables["params"]),
                norm_state=norms_lib.init_norm_state(model.layout, k_norm, init_variables=variables),
                lr=jnp.asarray(lr, jnp.float32), diverged=jnp.asarray(False))


def replica_key_data(sweep_seed: int, P: int, seed: int) -> np.ndarray:
    """Raw uint32 [2] key of replica (P, seed): fold_in(fold_in(key(sweep_seed), P), seed)."""
    k = jax.random.fold_in(jax.random.fold_in(jax.random.key(sweep_seed, impl="threefry2x32"), P), seed)
    return np.asarray(jax.random.key_data(k))


def epoch_order(sweep_seed: int, P: int, seed: int, epoch: int) -> np.ndarray:
    """Positions 0..P-1 of the replica's subset in the order visited at ``epoch`` (int64 [P])."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([sweep_seed, P, seed, epoch, 7])))
    return rng.permutation(P)


def batch_indices(subset: np.ndarray, sweep_seed: int, P: int, seed: int, step: int, batch_size: int,
                  cache: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Training-set indices and weights of optimizer step ``step`` (0-based) of replica (P, seed).

    Returns:
      (idx int32 [B], w float32 [B]); a partial last batch is padded with weight-0 copies of its first entry.
    """
    spe = -(-P // batch_size)
    epoch, b = divmod(step, spe)
    if cache is not None and cache.get("epoch") == epoch:
        order = cache["order"]
    else:
        order = epoch_order(sweep_seed, P, seed, epoch)
        if cache is not None:
            cache.update(epoch=epoch, order=order)
    pos = order[b * batch_size:(b + 1) * batch_size]
    n = len(pos)
    idx = np.empty(batch_size, np.int32)
    idx[:n] = subset[pos]
    idx[n:] = idx[0]
    w = np.zeros(batch_size, np.float32)
    w[:n] = 1.0
    return idx, w


# ------------------------------------------------------------------------------------------------
# Evaluation numerics (pure, per replica; vmapped)
# ------------------------------------------------------------------------------------------------


def make_eval_chunk(model) -> Callable:
    """``f(variables, x [n,...], y [n], mask [n]) -> (loss_sum, err_sum, margins [n])`` for one replica.

    margins = f_y - max_{j != y} f_j (paper Fig. 6 right); loss = cross-entropy; error = argmax != y.
    """

    def f(variables, x, y, mask):
        logits, _ = model.apply(variables, x, train=False)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        err = (jnp.argmax(logits, -1) != y).astype(jnp.float32)
        fy = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
        other = jnp.max(jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits), -1)
        return jnp.sum(mask * ce), jnp.sum(mask * err), fy - other

    return f


# ------------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------------


def default_steps_per_dispatch(backend: str) -> int:
    # bench/bench_engine.py on the project's 2-core CPU, LeNet-5 with replica_axis="map" and "phase"
    # convolutions: 8 steps per dispatch in a rolled lax.scan (bench/engine.json, R = 16: 31,600
    # images/s; unrolled 25,500; one step per dispatch 29,500). Fewer steps per dispatch mean finer
    # scheduling. On accelerators a scan of 16 steps amortizes the dispatch overhead.
    return 8 if backend == "cpu" else 16


def default_scan_unroll(backend: str, steps_per_dispatch: int) -> int:
    return 1


def default_replica_axis(backend: str) -> str:
    # bench/bench_engine.py: on XLA:CPU a vmapped LeNet step (grouped convs / batched matmuls) is
    # slower than the replicas' unbatched steps one after another; accelerators want the batch.
    return "map" if backend == "cpu" else "vmap"


def default_replicas_per_device(backend: str) -> int:
    return 16 if backend == "cpu" else 64


def balanced_slots(jobs: Sequence[Job]) -> int:
    """ceil(total steps / longest job): more slots than this cannot shorten the sweep (the longest job
    sets the makespan) and only add idle slots at the end."""
    return -(-sum(j.total_steps for j in jobs) // max(j.total_steps for j in jobs))


def choose_slots(jobs: Sequence[Job], replicas_per_device: int, n_devices: int, backend: str) -> int:
    """Slot count R (a multiple of n_devices).

    ``replicas_per_device > 0``: exactly that many per device (fewer if there are fewer jobs).
    0 (auto): the backend default per device, capped by :func:`balanced_slots` so that the idle tail
    of the pool stays small (measured idle fractions: ``bench/bench_engine.py --idle``).
    """
    if replicas_per_device > 0:
        want = replicas_per_device * n_devices
    else:
        want = min(default_replicas_per_device(backend) * n_devices, balanced_slots(jobs))
    want = min(want, len(jobs))
    return -(-want // n_devices) * n_devices


def _versions() -> dict:
    import flax
    import orbax.checkpoint as ocp
    import importlib.metadata as md

    def ver(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return dict(jax=jax.__version__, jaxlib=ver("jaxlib"), flax=flax.__version__, optax=optax.__version__,
                orbax_checkpoint=ver("orbax-checkpoint"), numpy=np.__version__, python=sys.version.split()[0],
                jaxnorm=ver("jaxnorm"), backend=jax.default_backend(), device_count=jax.device_count(),
                devices=[str(d) for d in jax.devices()])


def _is_oom(err: Exception) -> bool:
    msg = str(err)
    return "RESOURCE_EXHAUSTED" in msg or "Out of memory" in msg or "out of memory" in msg


class _Results:
    """Append-only CSV with a fixed header; each batch of rows is one write + fsync."""

    def __init__(self, path: Path, columns: Sequence[str]):
        self.path, self.columns = path, list(columns)
        if not path.exists() or path.stat().st_size == 0:
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerow(self.columns)
            self._write(buf.getvalue())

    def _write(self, text: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        for row in rows:
            w.writerow([_fmt(row.get(c)) for c in self.columns])
        self._write(buf.getvalue())

    def size(self) -> int:
        return self.path.stat().st_size

    def truncate(self, size: int) -> None:
        with open(self.path, "r+b") as f:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "True" if v else "False"
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return v


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


_FUNCTIONS: dict = {}  # compiled functions shared by engines of the same model/optimizer/mesh


def _compile_functions(model, tx, unroll: int, norm_kw: dict, rep: NamedSharding, backend: str,
                       replica_axis: str = "vmap") -> dict:
    """The jitted functions of an engine. ``trace_count`` counts traces (Python runs only when tracing).

    ``replica_axis``: "vmap" batches the replicas' steps into one program (per-replica kernels become
    grouped convolutions / batched matmuls); "map" runs them one after the other inside the same
    dispatch (``lax.map`` over each device's shard via ``jax.shard_map``), each with the unbatched
    convolutions that XLA:CPU runs fastest.
    """
    trace_count = collections.Counter()
    chunk = make_replica_chunk(model, tx, unroll)
    layout = model.layout
    donate = (0,) if backend != "cpu" else ()  # XLA:CPU ignores donation (and warns)
    spec = PartitionSpec("replica")

    def train_vmap(slots, x_train, y_train, idx, w, active):
        return jax.vmap(chunk, in_axes=(0, None, None, 0, 0, 0))(slots, x_train, y_train, idx, w, active)

    def train_map(slots, x_train, y_train, idx, w, active):
        def local(slots, x_train, y_train, idx, w, active):
            return jax.lax.map(lambda a: chunk(a[0], x_train, y_train, *a[1:]), (slots, idx, w, active))

        return jax.shard_map(local, mesh=rep.mesh, in_specs=(spec, PartitionSpec(), PartitionSpec(), spec, spec, spec),
                             out_specs=spec)(slots, x_train, y_train, idx, w, active)

    def train(slots, x_train, y_train, idx, w, active):
        trace_count["train"] += 1
        f = train_map if replica_axis == "map" else train_vmap
        return f(slots, x_train, y_train, idx, w, active)

    def init_one(key_data, lr):
        trace_count["init"] += 1
        return init_replica(model, tx, key_data, lr)

    def scatter(slots, new, where):
        return jax.tree.map(lambda a, b: a.at[where].set(b), slots, new)

    def norms(variables, state):
        trace_count["norms"] += 1
        apply_fn = lambda v, x: model.apply(v, x, False)[0]  # noqa: E731 -- the zoo's l2 path norm
        f = jax.vmap(lambda v, s: norms_lib.evaluate(v, layout, s, apply_fn=apply_fn, input_shape=model.input_shape,
                                                     **norm_kw))
        # Per device (shard_map), not SPMD-partitioned: the power iteration is a lax.while_loop with a
        # data-dependent trip count; partitioned over the sharded replica axis, XLA puts an all-reduce
        # inside the loop that the devices reach a different number of times -- with >1 device the
        # sweep deadlocked in the first evaluation (XLA:CPU: rendezvous timeout, or a silent hang).
        # Each replica's result is the same either way (a vmapped while_loop masks finished entries).
        return jax.shard_map(f, mesh=rep.mesh, in_specs=(spec, spec), out_specs=spec,
                             check_vma=False)(variables, state)  # no collectives; vma trips linear_transpose

    ev = make_eval_chunk(model)

    def eval_test(variables, x_chunks, y_chunks, m_chunks, c):
        trace_count["eval_test"] += 1
        return jax.vmap(ev, in_axes=(0, None, None, None))(variables, x_chunks[c], y_chunks[c], m_chunks[c])

    def eval_train(variables, x_train, y_train, idx, mask):
        trace_count["eval_train"] += 1
        x = jnp.take(x_train, idx, axis=0)
        y = jnp.take(y_train, idx, axis=0)
        return jax.vmap(ev)(variables, x, y, mask)

    return dict(
        trace_count=trace_count,
        train=jax.jit(train, donate_argnums=donate, out_shardings=rep),
        init_one=jax.jit(init_one),
        scatter=jax.jit(scatter, donate_argnums=donate, out_shardings=rep),
        gather=jax.jit(lambda slots, where: jax.tree.map(lambda a: a[where], slots), out_shardings=rep),
        norms=jax.jit(norms, out_shardings=rep),
        eval_test=jax.jit(eval_test, out_shardings=rep),
        eval_train=jax.jit(eval_train, out_shardings=rep),
    )


class Engine:
    """Trains one sweep; see the module docstring. Use :func:`run` rather than this class directly."""

    def __init__(self, cfg: config_lib.SweepConfig, out_dir: str | Path, dataset=None, quiet: bool = False,
                 devices=None, stop_after_dispatches: int | None = None, keep_final: bool = False):
        self.cfg, self.out = cfg, Path(out_dir)
        self.keep_final = keep_final
        self.final: dict[tuple[int, int], Any] = {}  # (P, seed) -> host variables at the end (keep_final)
        self.quiet = quiet
        self.stop_after = stop_after_dispatches
        # Local devices only: one process per host (see the multi-host note in the module docstring).
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self.n_dev = len(self.devices)
        self.backend = self.devices[0].platform
        self.mesh = Mesh(np.array(self.devices), ("replica",))
        self.rep = NamedSharding(self.mesh, PartitionSpec("replica"))
        self.repl = NamedSharding(self.mesh, PartitionSpec())
        self.K = cfg.steps_per_dispatch or default_steps_per_dispatch(self.backend)
        self.unroll = cfg.scan_unroll or default_scan_unroll(self.backend, self.K)
        self.replica_axis = cfg.replica_axis if cfg.replica_axis != "auto" else default_replica_axis(self.backend)
        self.ds = dataset if dataset is not None else data_lib.load(cfg.dataset, cfg.data_dir or None)
        self.model = models_lib.get_model(cfg.arch, self.ds.input_shape, self.ds.num_classes, size=cfg.size,
                                          conv_impl=cfg.conv_impl)
        self.layout = self.model.layout
        self.tx = make_optimizer(cfg.optimizer, cfg.weight_decay, cfg.adam_b1, cfg.adam_b2, cfg.adam_eps)
        seeds = range(cfg.seed_start, cfg.seed_start + cfg.seeds)
        n_train = self.ds.n_train
        bad = [p for p in cfg.P if p > n_train]
        if bad:
            raise ValueError(f"P values {bad} exceed the {n_train} training examples of {cfg.dataset}")
        self.eval_epochs = cfg.eval_epochs()
        self.jobs = make_jobs(cfg.P, seeds, cfg.epochs, cfg.batch_size, self.eval_epochs, cfg.lr,
                              cfg.lr_overrides)
        self._subset_cache: dict[int, np.ndarray] = {}
        self._order_cache: dict[int, dict] = {}
        self._build_functions()
        self._put_data()
        rpd = cfg.replicas_per_device
        if rpd == 0 and self.backend != "cpu":
            rpd = self.estimate_replicas_per_device() or 0
        self.sched = Scheduler(self.jobs, choose_slots(self.jobs, rpd, self.n_dev, self.backend), self.K, self.n_dev)
        if rpd and cfg.replicas_per_device == 0:  # an estimate caps the auto choice, never raises it
            auto = choose_slots(self.jobs, 0, self.n_dev, self.backend)
            self.sched = Scheduler(self.jobs, min(auto, self.sched.n_slots), self.K, self.n_dev)

    def estimate_replicas_per_device(self, fraction: float = 0.6) -> int | None:
        """Replicas per device that fit in ``fraction`` of the device memory, or None when unknown (CPU).

        From XLA's memory analysis of the compiled train dispatch at 1 and 2 replicas per device
        (``jit(...).lower(...).compile().memory_analysis()``): bytes = base + per_replica * r.
        """
        try:
            limit = (self.devices[0].memory_stats() or {}).get("bytes_limit")
            if not limit:
                return None

            def bytes_for(r: int) -> int:
                R = r * self.n_dev
                sd = lambda a, sh=self.rep: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)
                slots = jax.tree.map(sd, self._abstract_slots(R))
                B, K = self.cfg.batch_size, self.K
                args = (slots, self.x_train, self.y_train,
                        jax.ShapeDtypeStruct((R, K, B), jnp.int32, sharding=self.rep),
                        jax.ShapeDtypeStruct((R, K, B), jnp.float32, sharding=self.rep),
                        jax.ShapeDtypeStruct((R, K), jnp.bool_, sharding=self.rep))
                m = self._train.lower(*args).compile().memory_analysis()
                return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
                           - m.alias_size_in_bytes)

            b1, b2 = bytes_for(1), bytes_for(2)
            per = max(b2 - b1, 1)
            return max(1, int((fraction * limit - (b1 - per)) // per))
        except Exception:  # noqa: BLE001 -- an estimate only; the backend default applies
            return None

    # ---------------------------------------------------------------- compiled functions
    def _build_functions(self):
        cfg = self.cfg
        norm_kw = dict(definition=cfg.norm_definition, norm_layers=cfg.norm_layers, attention=cfg.norm_attention,
                       zoo=cfg.norm_zoo, dense_method=cfg.dense_method, max_iters=cfg.norm_max_iters,
                       tol=cfg.norm_tol)
        key = (cfg.arch, cfg.size, self.model.conv_impl, tuple(self.ds.input_shape), self.ds.num_classes,
               cfg.optimizer, cfg.weight_decay, cfg.adam_b1, cfg.adam_b2, cfg.adam_eps, self.unroll,
               tuple(sorted(norm_kw.items())), tuple(d.id for d in self.devices), self.backend, self.replica_axis)
        if key not in _FUNCTIONS:
            _FUNCTIONS[key] = _compile_functions(self.model, self.tx, self.unroll, norm_kw, self.rep,
                                                 self.backend, self.replica_axis)
        fns = _FUNCTIONS[key]
        self.trace_count = fns["trace_count"]
        for name in ("train", "init_one", "scatter", "gather", "norms", "eval_test", "eval_train"):
            setattr(self, "_" + name, fns[name])

    def _put_data(self):
        cfg, ds = self.cfg, self.ds
        self.x_train = jax.device_put(jnp.asarray(ds.x_train, jnp.float32), self.repl)
        self.y_train = jax.device_put(jnp.asarray(ds.y_train, jnp.int32), self.repl)
        n_test = ds.n_test
        if cfg.test_subset and cfg.test_subset < n_test:
            sel = np.random.Generator(np.random.PCG64(0)).permutation(n_test)[: cfg.test_subset]
        else:
            sel = np.arange(n_test)
        self.n_test_eval = len(sel)
        eb = min(cfg.eval_batch, len(sel))
        n_chunks = -(-len(sel) // eb)
        pad = n_chunks * eb - len(sel)
        sel_p = np.concatenate([sel, np.full(pad, sel[0])])
        mask = np.concatenate([np.ones(len(sel), np.float32), np.zeros(pad, np.float32)])
        self.eb = eb
        self.x_test = jax.device_put(ds.x_test[sel_p].reshape((n_chunks, eb) + ds.x_test.shape[1:]), self.repl)
        self.y_test = jax.device_put(ds.y_test[sel_p].astype(np.int32).reshape(n_chunks, eb), self.repl)
        self.m_test = jax.device_put(mask.reshape(n_chunks, eb), self.repl)
        self.test_chunks = n_chunks

    # ---------------------------------------------------------------- slot state helpers
    def _subset(self, j: int) -> np.ndarray:
        if j not in self._subset_cache:
            job = self.jobs[j]
            self._subset_cache[j] = data_lib.subset_indices(self.cfg.sweep_seed, job.seed, job.P, self.ds.n_train)
        return self._subset_cache[j]

    def _fresh_slots(self, n: int):
        """n empty slots (zeros; never evaluated, masked in training until a job is initialized there)."""
        abstract = self._abstract_slots(n)
        return jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract),
                       out_shardings=self.rep)()

    def _init_jobs(self, slots, new: list[tuple[int, int]]):
        """Initializes the jobs of ``new`` = [(slot, job)] in their slots, n_dev at a time (one shape to compile)."""
        for g in range(0, len(new), self.n_dev):
            group = new[g:g + self.n_dev]
            pad = group + [group[-1]] * (self.n_dev - len(group))
            fresh = [self._init_one(replica_key_data(self.cfg.sweep_seed, self.jobs[j].P, self.jobs[j].seed),
                                    np.float32(self.jobs[j].lr)) for _, j in pad]
            fresh = jax.device_put(jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *fresh),
                                   self.rep)
            where = np.array([r for r, _ in pad], np.int32)
            slots = self._scatter(slots, fresh, jax.device_put(where, self.repl))
        return slots

    # ---------------------------------------------------------------- the main loop
    def run(self, resume_state=None) -> dict:
        cfg, sched = self.cfg, self.sched
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / MARGIN_DIR).mkdir(exist_ok=True)
        self.columns = list(BASE_COLUMNS) + list(NORM_BOUND_COLUMNS) + [
            f"zoo/{z}" for z in (norms_lib.ZOO if self.cfg.norm_zoo else ())] + [
            f"norm/{name}/{k}" for name in self._norm_layer_names() for k in ("spec", "spec_upper", "l21")]
        self.results = _Results(self.out / RESULTS_FILE, self.columns)
        self.wall0 = time.time()
        self.wall_offset = 0.0
        self.ckpt_count = 0
        slots = None
        if resume_state is not None:
            slots = self._restore(resume_state)
        else:
            self.results.truncate(0)  # a run that crashed before its first checkpoint starts over
            self.results = _Results(self.out / RESULTS_FILE, self.columns)
            slots = self._fresh_slots(sched.n_slots)
        total_steps = sum(j.total_steps for j in self.jobs)
        done_steps = sum(self.jobs[j].total_steps for j in sched.finished) + sum(
            p for j, p in zip(sched.slot_job, sched.slot_pos) if j is not None)
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=done_steps, unit="step", disable=self.quiet, smoothing=0.05,
                   desc=f"{cfg.arch}/{cfg.dataset}", dynamic_ncols=True)
        last_ckpt_time, last_ckpt_steps = time.time(), sched.busy_steps
        dispatches = 0
        t_rate, s_rate = time.time(), 0
        try:
            while True:
                new = sched.fill()
                slots = self._init_jobs(slots, new)
                due = sched.due_for_eval()
                if due:
                    slots = self._evaluate(slots, due)
                    sched.mark_evaluated(due)
                if self.keep_final:
                    self._keep_final(slots)
                if sched.release_finished() and sched.queue:
                    continue
                if sched.done():
                    break
                keep = sched.compaction()
                if keep is not None:
                    slots = self._gather(slots, jax.device_put(np.array(keep, np.int32), self.repl))
                    sched.apply_compaction(keep)
                if self._checkpoint_due(last_ckpt_time, last_ckpt_steps):
                    self._save(slots)
                    last_ckpt_time, last_ckpt_steps = time.time(), sched.busy_steps
                if self.stop_after is not None and dispatches >= self.stop_after:
                    bar.close()
                    return dict(stopped=True)
                n = sched.plan()
                idx, w, act = self._batches(n)
                try:
                    slots = self._train(slots, self.x_train, self.y_train, jax.device_put(idx, self.rep),
                                        jax.device_put(w, self.rep), jax.device_put(act, self.rep))
                    diverged = np.asarray(slots["diverged"])
                except Exception as err:  # noqa: BLE001
                    if _is_oom(err):
                        raise MemoryError(self._oom_message("training")) from err
                    raise
                sched.advance(n)
                dispatches += 1
                for r in np.nonzero(diverged)[0]:
                    j = sched.slot_job[r]
                    if j is not None:
                        self._diverged_row(r, j)
                        bar.update(self.jobs[j].total_steps - sched.slot_pos[r])  # never to be run
                        sched.stop(int(r))
                s_rate += int(n.sum())
                bar.update(int(n.sum()))
                dt = time.time() - t_rate
                if dt > 2.0:
                    spe = np.mean([self.jobs[j].steps_per_epoch for j in sched.slot_job if j is not None] or [1])
                    bar.set_postfix(done=f"{len(sched.finished)}/{len(self.jobs)}",
                                    ep_s=f"{s_rate / spe / dt:.2f}", img_s=f"{s_rate * cfg.batch_size / dt:.0f}",
                                    idle=f"{sched.idle_fraction():.1%}", refresh=False)
                    t_rate, s_rate = time.time(), 0
        finally:
            bar.close()
        self._save(slots, finished=True)
        summary = self._summary()
        (self.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        return summary

    def _keep_final(self, slots) -> None:
        for r, j in enumerate(self.sched.slot_job):
            if j is not None and self.sched.slot_pos[r] >= self.jobs[j].total_steps:
                job = self.jobs[j]
                self.final[(job.P, job.seed)] = jax.tree.map(lambda a: np.asarray(a[r]), slots["variables"])

    def _norm_layer_names(self) -> list[str]:
        c = self.cfg
        return norms_lib.operator_names(self.layout, definition=c.norm_definition, norm_layers=c.norm_layers,
                                        attention=c.norm_attention)

    def _summary(self) -> dict:
        s = self.sched
        return dict(jobs=len(self.jobs), finished=len(s.finished), diverged=sum(s.finished.values()),
                    idle_fraction=s.idle_fraction(), busy_replica_steps=s.busy_steps,
                    idle_replica_steps=s.idle_steps, slots=s.ladder[0], steps_per_dispatch=self.K,
                    scan_unroll=self.unroll, replica_axis=self.replica_axis, conv_impl=self.model.conv_impl,
                    devices=self.n_dev, wall_time=self._wall())

    def _wall(self) -> float:
        return self.wall_offset + time.time() - self.wall0

    def _oom_message(self, what: str) -> str:
        c = self.cfg
        return (f"out of device memory during {what} with {self.sched.n_slots // self.n_dev} replicas per "
                f"device (batch_size={c.batch_size}, eval_batch={c.eval_batch}, model {c.arch}/{c.size}). "
                f"Lower --replicas-per-device (replicas_per_device) first, then eval_batch or steps_per_dispatch.")

    def _checkpoint_due(self, t_last: float, steps_last: int) -> bool:
        c = self.cfg
        if c.checkpoint_minutes > 0 and time.time() - t_last >= 60 * c.checkpoint_minutes:
            return True
        if c.checkpoint_epochs > 0:
            spe = np.mean([j.steps_per_epoch for j in self.jobs])
            return self.sched.busy_steps - steps_last >= c.checkpoint_epochs * spe * self.sched.n_slots
        return False

    def _batches(self, n: np.ndarray):
        """Host-side batch indices of the next dispatch: idx int32 [R, K, B], w float32 [R, K, B], active [R, K]."""
        R, K, B, sched = self.sched.n_slots, self.K, self.cfg.batch_size, self.sched
        idx = np.zeros((R, K, B), np.int32)
        w = np.zeros((R, K, B), np.float32)
        act = np.zeros((R, K), bool)
        for r, j in enumerate(sched.slot_job):
            if j is None or n[r] == 0:
                continue
            idx[r, : n[r]], w[r, : n[r]] = self._slot_batches(j, sched.slot_pos[r], int(n[r]))
            act[r, : n[r]] = True
        return idx, w, act

    def _slot_batches(self, j: int, pos: int, n: int):
        """Steps pos .. pos+n-1 of job j, vectorized; equal to :func:`batch_indices` step by step."""
        job, B = self.jobs[j], self.cfg.batch_size
        spe, sub = job.steps_per_epoch, self._subset(j)
        cache = self._order_cache.setdefault(j, {})
        idx = np.empty((n, B), np.int32)
        w = np.empty((n, B), np.float32)
        k = 0
        while k < n:
            epoch, b = divmod(pos + k, spe)
            m = min(n - k, spe - b)  # steps left in this epoch
            if cache.get("epoch") != epoch:
                cache.update(epoch=epoch, order=epoch_order(self.cfg.sweep_seed, job.P, job.seed, epoch))
            seg = cache["order"][b * B:(b + m) * B]
            valid = np.zeros(m * B, bool)
            valid[: len(seg)] = True
            full = np.zeros(m * B, np.int64)
            full[: len(seg)] = seg
            ids = sub[full].reshape(m, B)
            valid = valid.reshape(m, B)
            idx[k:k + m] = np.where(valid, ids, ids[:, :1])  # pad a partial batch with its first entry
            w[k:k + m] = valid
            k += m
        return idx, w

    # ---------------------------------------------------------------- evaluation
    def _evaluate(self, slots, due: list[int]):
        cfg, sched = self.cfg, self.sched
        n = min(1 << (len(due) - 1).bit_length(), sched.n_slots)  # powers of two: few shapes to compile
        n = -(-n // self.n_dev) * self.n_dev
        where = np.array(due + [due[0]] * (n - len(due)), np.int32)
        where_d = jax.device_put(where, self.repl)
        try:
            sub = self._gather(slots, where_d)
            variables = sub["variables"]
            nres = self._norms(variables, sub["norm_state"])
            total, parts, new_ns = nres.total, nres.parts, nres.state
            slots = self._scatter(slots, {**sub, "norm_state": new_ns}, where_d)
            t_loss = t_err = 0.0
            margins = []
            want_margins = any(self.sched.slot_pos[r] // self.jobs[sched.slot_job[r]].steps_per_epoch
                               in cfg.margin_epochs for r in due)
            for c in range(self.test_chunks):
                l, e, m = self._eval_test(variables, self.x_test, self.y_test, self.m_test, c)
                t_loss, t_err = t_loss + l, t_err + e
                if want_margins:
                    margins.append(m)
            # Train loss/error on each replica's subset (first train_eval_max examples when set).
            jobs = [self.jobs[sched.slot_job[r]] for r in where]
            n_tr = [min(j.P, cfg.train_eval_max) if cfg.train_eval_max else j.P for j in jobs]
            eb = cfg.eval_batch
            tr_loss = tr_err = 0.0
            for c in range(-(-max(n_tr) // eb)):
                idx = np.zeros((n, eb), np.int32)
                mask = np.zeros((n, eb), np.float32)
                for i, (j, nt) in enumerate(zip(jobs, n_tr)):
                    sub_idx = self._subset(j.index)[c * eb: min((c + 1) * eb, nt)]
                    idx[i, :len(sub_idx)] = sub_idx
                    mask[i, :len(sub_idx)] = 1.0
                l, e, _ = self._eval_train(variables, self.x_train, self.y_train, jax.device_put(idx, self.rep),
                                           jax.device_put(mask, self.rep))
                tr_loss, tr_err = tr_loss + l, tr_err + e
            total = np.asarray(total)
            t_loss, t_err = np.asarray(t_loss), np.asarray(t_err)
            tr_loss, tr_err = np.asarray(tr_loss), np.asarray(tr_err)
            parts = jax.tree.map(np.asarray, parts)
            bounds = dict(spectral_complexity_upper=np.asarray(nres.total_upper), norm_max_gap=np.asarray(nres.max_gap),
                          norm_unconverged=np.asarray(nres.unconverged))
            zoo = {f"zoo/{k}": np.asarray(x) for k, x in nres.zoo.items()}
            margins = np.concatenate([np.asarray(m) for m in margins], axis=1)[:, : self.n_test_eval] \
                if want_margins else None
        except Exception as err:  # noqa: BLE001
            if _is_oom(err):
                raise MemoryError(self._oom_message("evaluation")) from err
            raise
        rows, wall = [], self._wall()
        for i, r in enumerate(due):
            job = self.jobs[sched.slot_job[r]]
            pos = sched.slot_pos[r]
            epoch = pos // job.steps_per_epoch
            row = dict(arch=cfg.arch, dataset=cfg.dataset, size=cfg.size, P=job.P, seed=job.seed,
                       replica=job.replica, epoch=epoch, step=pos, test_error=t_err[i] / self.n_test_eval,
                       test_loss=t_loss[i] / self.n_test_eval, train_error=tr_err[i] / n_tr[i],
                       train_loss=tr_loss[i] / n_tr[i], spectral_complexity=total[i], wall_time=wall,
                       diverged=False, lr=job.lr)
            for col, x in {**bounds, **zoo}.items():
                row[col] = x[i]
            for name, d in parts.items():
                for k in ("spec", "spec_upper", "l21"):
                    row[f"norm/{name}/{k}"] = d[k][i]
            rows.append(row)
            if margins is not None and epoch in cfg.margin_epochs:
                _save_npy_atomic(self.out / MARGIN_DIR / f"P{job.P}_s{job.seed}_e{epoch}.npy",
                                 margins[i].astype(np.float32))
        self.results.append(rows)
        return slots

    def _diverged_row(self, r: int, j: int) -> None:
        job, pos = self.jobs[j], self.sched.slot_pos[r]
        row = dict(arch=self.cfg.arch, dataset=self.cfg.dataset, size=self.cfg.size, P=job.P, seed=job.seed,
                   replica=job.replica, epoch=pos // job.steps_per_epoch, step=pos, wall_time=self._wall(),
                   diverged=True, lr=job.lr)
        self.results.append([row])

    # ---------------------------------------------------------------- checkpoints
    def _manager(self):
        import orbax.checkpoint as ocp

        return ocp.CheckpointManager(
            (self.out / CHECKPOINT_DIR).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False, create=True),
        )

    def _save(self, slots, finished: bool = False) -> None:
        import orbax.checkpoint as ocp

        self.ckpt_count += 1
        meta = dict(scheduler=self.sched.state_dict(), results_bytes=self.results.size(), n_slots=self.sched.n_slots,
                    wall_time=self._wall(), finished=finished, count=self.ckpt_count,
                    science=self.cfg.science())
        mngr = self._manager()
        state = jax.tree.map(np.asarray, slots)  # host copy: restorable on any device count
        mngr.save(self.ckpt_count, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                           meta=ocp.args.JsonSave(meta)), force=True)
        mngr.wait_until_finished()
        mngr.close()

    def _restore(self, resume_state) -> Any:
        meta, state = resume_state
        self.sched.load_state_dict(meta["scheduler"])
        n_slots = meta["n_slots"]
        self.sched.slot_job = list(meta["scheduler"]["slot_job"])
        self.results.truncate(meta["results_bytes"])
        self.wall_offset = meta["wall_time"]
        self.ckpt_count = meta["count"]
        # Re-pad to a multiple of this run's device count (the checkpoint may come from another one).
        R = -(-n_slots // self.n_dev) * self.n_dev
        self.sched.ladder = slot_ladder(R, self.n_dev)
        if R != n_slots:
            extra = R - n_slots
            state = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[:1], extra, 0)]), state)
            state["diverged"][n_slots:] = False
            self.sched.slot_job += [None] * extra
            self.sched.slot_pos += [0] * extra
            self.sched.slot_evaluated += [-1] * extra
        return jax.device_put(state, self.rep)

    def load_checkpoint(self):
        """Returns (meta, host state) of the latest checkpoint, or None."""
        import orbax.checkpoint as ocp

        if not (self.out / CHECKPOINT_DIR).exists():
            return None
        mngr = self._manager()
        step = mngr.latest_step()
        if step is None:
            mngr.close()
            return None
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        one = jax.sharding.SingleDeviceSharding(self.devices[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
                                self._abstract_slots(meta["n_slots"]))
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        mngr.close()
        return meta, jax.tree.map(np.asarray, state)

    def _abstract_slots(self, n: int):
        keys = jax.ShapeDtypeStruct((n, 2), jnp.uint32)
        lrs = jax.ShapeDtypeStruct((n,), jnp.float32)
        return jax.eval_shape(jax.vmap(lambda k, l: init_replica(self.model, self.tx, k, l)), keys, lrs)


# ------------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------------


def run(cfg: config_lib.SweepConfig, out_dir: str | Path, *, resume: bool | None = None, overwrite: bool = False,
        quiet: bool = False, dataset=None, devices=None, stop_after_dispatches: int | None = None,
        engine_out: list | None = None) -> dict:
    """Runs (or resumes) a sweep into ``out_dir``.

    Args:
      cfg: the sweep (``jaxnorm.config.resolve`` / ``from_dict``).
      out_dir: run directory: ``config.json``, ``versions.json``, ``results.csv``
        (:func:`jaxnorm.results.load`), ``checkpoints/``, ``margins/``, ``summary.json``.
      resume: None (default): resume an existing run directory whose config matches, else start;
        True: there must be a run to resume; False: the directory must not hold a run.
      overwrite: delete an existing run directory first.
      quiet: no progress bar.
      dataset: a ``jaxnorm.data.Dataset`` to use instead of ``data.load(cfg.dataset)`` (tests).
      devices: devices of the replica mesh (default: all).
      stop_after_dispatches: stop (without the final checkpoint) after that many train dispatches (tests).
      engine_out: if a list, the :class:`Engine` is appended to it, built with ``keep_final=True``
        (tests: ``engine.final[(P, seed)]`` holds each replica's final variables, ``engine.trace_count``
        the number of traces of each compiled function).

    Returns:
      The run summary (jobs, finished, diverged, idle_fraction, ...); ``{"noop": True, ...}`` when the
      run directory already holds the finished sweep.

    Raises:
      RunDirMismatch: ``out_dir`` holds a run of a different sweep (the message lists the differences).
      rundir.RunDirLocked: another live process is writing ``out_dir``.
      rundir.RunDirError: ``out_dir`` is a file, below a file, not writable, or not a jaxnorm run
        directory (which is never written into nor deleted, ``overwrite`` included).
    """
    out = Path(out_dir)
    config_lib.validate(cfg)
    with rundir.lock(out):  # one writer per run directory: a second copy of the command is refused at once
        return _run_locked(cfg, out, resume=resume, overwrite=overwrite, quiet=quiet, dataset=dataset,
                           devices=devices, stop_after_dispatches=stop_after_dispatches, engine_out=engine_out)


def _run_locked(cfg, out: Path, *, resume, overwrite, quiet, dataset, devices, stop_after_dispatches,
                engine_out) -> dict:
    # --overwrite deletes only a jaxnorm run directory, and only after the new config and data are checked.
    discard = rundir.plan_overwrite(out) if overwrite else None
    if not overwrite:
        rundir.check_reusable(out)
    cfg_path = out / CONFIG_FILE
    exists = cfg_path.exists() and not overwrite
    if resume is True and not exists:
        raise ValueError(f"--resume: {str(out)!r} holds no run to resume (no {CONFIG_FILE})")
    if resume is False and exists:
        raise RunDirMismatch(f"{str(out)!r} already holds a run; pick another --out or pass --overwrite")
    if exists:
        old = config_lib.from_json(cfg_path.read_text())
        diff = {k: (v, cfg.science()[k]) for k, v in old.science().items() if cfg.science().get(k) != v}
        if diff:
            lines = "; ".join(f"{k}: {a!r} in the run dir vs {b!r} now" for k, (a, b) in sorted(diff.items()))
            raise RunDirMismatch(f"{str(out)!r} holds a different sweep ({lines}). Use another --out, "
                                 f"or --overwrite to discard it.")
    # Built before anything is written: missing data or a bad P leaves the old run (with --overwrite) or no
    # directory at all (rundir.lock removes a directory it created that is still empty) behind.
    engine = Engine(cfg, out, dataset=dataset, quiet=quiet, devices=devices,
                    stop_after_dispatches=stop_after_dispatches, keep_final=engine_out is not None)
    if discard is not None:
        discard()
    out.mkdir(parents=True, exist_ok=True)
    if engine_out is not None:
        engine_out.append(engine)
    ckpt = engine.load_checkpoint() if exists else None
    if ckpt is not None and ckpt[0].get("finished"):
        if not quiet:
            print(f"{out}: sweep already finished; nothing to do", file=sys.stderr)
        summary = json.loads((out / SUMMARY_FILE).read_text()) if (out / SUMMARY_FILE).exists() else {}
        return {**summary, "noop": True}
    _write_atomic(cfg_path, config_lib.to_json(cfg))
    _write_atomic(out / VERSIONS_FILE, json.dumps(_versions(), indent=2))
    return engine.run(resume_state=ckpt)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

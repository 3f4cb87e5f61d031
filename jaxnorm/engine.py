"""The sweep engine: many (P, seed) replicas trained at once, sharded over devices, checkpointed.

Paper Sec. 3.1: for every training-set size P and seed, train a network on a random P-subset for a
fixed number of epochs and log, along the way, the test error against the spectral complexity R_A(t)
(Eq. 2). This module is the thin loop that joins the parts:

  ``jaxnorm.schedule``   jobs, the slot pool, LPT refill, compaction, the event loop (no JAX)
  ``jaxnorm.replica``    one replica: typed state, pure train step, init, its key derivation
  ``jaxnorm.evaluate``   test/train loss and error, margins, spectral complexity of chosen slots
  ``jaxnorm.checkpoint`` save/restore and the crash-safe commit protocol
  ``jaxnorm.results``    the results writer and reader

Devices: replicas never communicate
-----------------------------------
The R slots are the leading axis of a :class:`jaxnorm.replica.ReplicaState` sharded over a 1-D
``replica`` mesh of the local devices (``NamedSharding``; R a multiple of the device count, empty
slots masked). Every compiled program is per device (``jax.shard_map`` with explicit specs): the
train dispatch, the initialization of new jobs, the evaluation's selection of due slots (by local
index) and the write-back of their power-iteration vectors. No program contains a collective
(``tests/test_engine.py`` asserts it on the compiled HLO). Slots move between devices only at a
compaction, through the host; the host reads results from each device's own shard.

Why (issue 12): the previous engine gathered due slots with ``states[where]`` under plain
``jax.jit``, a replicated index into the sharded slot axis, which XLA partitions into an
all-gather. A collective needs every device's part of the program running at once. XLA:CPU launches
each device's part asynchronously and caps the computations in flight per device with a semaphore;
with 4 devices on 2 cores, device 3's part of the gather waited on that semaphore (gdb: its launch
thread in ``xla::Semaphore::Acquire``) while the other three waited in the all-gather's rendezvous,
until XLA aborted the process after 40 s ("only 3 of them arrived"). On GPUs the same pattern is a
hung NCCL collective. Without collectives, each device's stream of programs depends on nothing
but itself.

Many hosts: ``python -m jaxnorm.sweep --distributed`` starts ``jax.distributed``; process i of n
trains the jobs ``jobs[i::n]`` (:func:`jaxnorm.schedule.process_share`) on its local devices and
writes its own shard of the one run directory (``results.p{i}.csv``, ``checkpoints/p{i}``,
``summary.p{i}.json``); :func:`jaxnorm.results.load` merges the shards.

Resume (``run(..., resume=None)``): a run directory that holds a ``config.json`` is resumed from
its newest checkpoint that verifies (checksums of its state and of the results prefix it covers,
:func:`jaxnorm.checkpoint.find_verified`; a bad newer one is named on stderr, none verifying raises
:class:`jaxnorm.checkpoint.NoValidCheckpoint`) when its science fields (everything but
``config.ENGINE_KEYS``) equal the requested config; a difference raises :class:`RunDirMismatch`
naming the fields. A finished run whose final checkpoint verifies is a no-op. ``resume=True`` requires an existing run; ``overwrite=True`` deletes it first.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxnorm import checkpoint as ckpt_lib
from jaxnorm import config as config_lib
from jaxnorm import data as data_lib
from jaxnorm import evaluate as evaluate_lib
from jaxnorm import models as models_lib
from jaxnorm import norms as norms_lib
from jaxnorm import replica as replica_lib
from jaxnorm import results as results_lib
from jaxnorm import rundir
from jaxnorm import schedule as schedule_lib

SECONDS = ("train", "eval_norms", "eval_metrics", "checkpoint")  # summary.json's "seconds_by_part"
CONFIG_FILE = "config.json"
VERSIONS_FILE = "versions.json"
AXIS = evaluate_lib.AXIS


class RunDirMismatch(ValueError):
    """The run directory holds a different sweep."""


# ------------------------------------------------------------------------------------------------
# Backend defaults (measured: bench/bench_engine.py)
# ------------------------------------------------------------------------------------------------


def default_steps_per_dispatch(backend: str, arch: str = "cnn") -> int:
    # bench/bench_engine.py on the project's 2-core CPU, replica_axis="map": LeNet-5 ("phase" convs)
    # 8 steps per dispatch in a rolled lax.scan (R = 16: 31,600 images/s; unrolled 25,500; one step
    # per dispatch 29,500). ResNet-20 and ViT at R = 16 read K = 1 4-7% faster than K = 8 in one
    # run (410 vs 383, 885 vs 850 images/s; bench/engine.json), within this host's run-to-run
    # spread, so 8 stays. On accelerators a scan of 16 steps amortizes the dispatch overhead.
    del arch  # one value for every architecture today; kept so that a measurement can differ
    return 8 if backend == "cpu" else 16


def default_replica_axis(backend: str) -> str:
    # bench/bench_engine.py: on XLA:CPU a vmapped LeNet step (grouped convs / batched matmuls) is
    # slower than the replicas' unbatched steps one after another; accelerators want the batch.
    return "map" if backend == "cpu" else "vmap"


def default_conv_bound(backend: str, arch: str) -> str:
    """``norm_conv_bound="auto"``: the certified conv bound the engine logs, per (backend, architecture).

    "exact" (``jaxnorm.norms.conv_bound_holds``, every conv norm certified to ``norm_tol``) wherever its
    block Cholesky is cheap: LeNet-5 (2 convs on <= 28 x 28 maps; a Fashion-MNIST LeNet sweep on this
    2-core CPU closed every conv gap to 1e-3, where the circulant bound left conv2 up to 48% open), the
    ViT (one patch conv, whose circulant bound is already exact) and every accelerator. "circulant" for
    the ResNet on the CPU: 19 convs whose Gram blocks are ~1000 wide cost ~0.8 s per test and replica on
    the 32 x 32 stage (~14 s per evaluation and replica, against ~11 s of training per replica-epoch at
    P = 4096; BUILD.md, "Norm logging cost").
    """
    return "circulant" if (backend == "cpu" and arch == "resnet") else "exact"


def default_eval_batch(backend: str) -> int:
    # Evaluation chunk size (test/train metrics, one replica at a time on the CPU). On the 2-core CPU
    # (measured while a sweep shared the machine) the ViT's forward pass ran 1,560 / 1,480 / 880 images/s at
    # chunks of 100 / 250 / 1000 (its [chunk, heads, 50, 50] attention leaves the cache), LeNet-5 33k / 16k /
    # 14k, ResNet-20 910 / 840 / 850: 250 on the CPU. Accelerators want big batches.
    return 250 if backend == "cpu" else 1000


def default_replicas_per_device(backend: str) -> int:
    return 16 if backend == "cpu" else 64


def choose_slots(jobs: Sequence[schedule_lib.Job], replicas_per_device: int, n_devices: int, backend: str) -> int:
    """Slot count R (a multiple of n_devices).

    ``replicas_per_device > 0``: exactly that many per device (fewer if there are fewer jobs).
    0 (auto): the backend default per device, capped by :func:`jaxnorm.schedule.balanced_slots` so
    that the idle tail of the pool stays small (``bench/bench_engine.py --idle``).
    """
    if replicas_per_device > 0:
        want = replicas_per_device * n_devices
    else:
        want = min(default_replicas_per_device(backend) * n_devices, schedule_lib.balanced_slots(jobs))
    want = min(want, len(jobs))
    return -(-want // n_devices) * n_devices


# ------------------------------------------------------------------------------------------------
# The compiled train-side programs (per device; cached by their plain-data arguments)
# ------------------------------------------------------------------------------------------------


class TrainPrograms(NamedTuple):
    """traces: Counter of traces per program; train(states, x_train, y_train, idx [R, K, B], w [R, K, B],
    active [R, K]) -> states; init(states, key_data uint32 [R, 2], lr [R], fresh bool [R]) -> states
    (slots with ``fresh`` get a new replica); empty(n) -> n zero slots; abstract(n): their shapes."""

    traces: collections.Counter
    train: Callable
    init: Callable
    empty: Callable
    abstract: Callable


@functools.cache
def train_programs(model_spec: tuple, opt_spec: tuple, unroll: int, replica_axis: str, mesh: Mesh) -> TrainPrograms:
    """Jitted per-device programs for a model (``get_model`` arguments), an optimizer
    (``replica.make_optimizer`` arguments), a scan unroll, "vmap" or "map" over slots, and a mesh."""
    model = models_lib.get_model(*model_spec[:3], size=model_spec[3], conv_impl=model_spec[4])
    tx = replica_lib.make_optimizer(*opt_spec)
    chunk = replica_lib.make_train_chunk(model, tx, unroll)
    traces = collections.Counter()
    s, r = PartitionSpec(AXIS), PartitionSpec()
    sharded = NamedSharding(mesh, s)
    per_device = lambda f, in_specs: jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=s)

    def train(states, x_train, y_train, idx, w, active):
        traces["train"] += 1
        one = lambda st, i, wk, a: chunk(st, x_train, y_train, i, wk, a)[0]
        if replica_axis == "map":  # the replicas' unbatched steps one after another (fastest on XLA:CPU)
            return jax.lax.map(lambda a: one(*a), (states, idx, w, active))
        return jax.vmap(one)(states, idx, w, active)

    def init(states, key_data, lr, fresh):
        traces["init"] += 1
        new = jax.vmap(lambda k, l: replica_lib.init(model, tx, k, l))(key_data, lr)
        pick = lambda a, b: jnp.where(fresh.reshape(fresh.shape + (1,) * (a.ndim - 1)), a, b)
        return jax.tree.map(pick, new, states)

    def abstract(n: int):
        return jax.eval_shape(jax.vmap(lambda k, l: replica_lib.init(model, tx, k, l)),
                              jax.ShapeDtypeStruct((n, 2), jnp.uint32), jax.ShapeDtypeStruct((n,), jnp.float32))

    def empty(n: int):
        return jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract(n)),
                       out_shardings=sharded)()

    return TrainPrograms(traces,
                         jax.jit(per_device(train, (s, r, r, s, s, s)), out_shardings=sharded),
                         jax.jit(per_device(init, (s, s, s, s)), out_shardings=sharded),
                         empty, abstract)


# ------------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------------


def _is_oom(err: Exception) -> bool:
    msg = str(err)
    return "RESOURCE_EXHAUSTED" in msg or "Out of memory" in msg or "out of memory" in msg


def _versions() -> dict:
    import importlib.metadata as md

    def ver(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return dict(jax=jax.__version__, jaxlib=ver("jaxlib"), flax=ver("flax"), optax=ver("optax"),
                numpy=np.__version__, python=sys.version.split()[0],
                jaxnorm=ver("jaxnorm"), backend=jax.default_backend(), device_count=jax.device_count(),
                process_count=jax.process_count(), devices=[str(d) for d in jax.local_devices()])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: processes may share the dir
    tmp.write_text(text)
    os.replace(tmp, path)


class Engine:
    """Trains one process's share of a sweep into a run directory. Use :func:`run`."""

    def __init__(self, cfg: config_lib.SweepConfig, out_dir: str | Path, dataset=None, devices=None,
                 process_index: int = 0, process_count: int = 1, compact_min_steps: int = 1000):
        self.cfg, self.out = cfg, Path(out_dir)
        self.proc, self.nproc = process_index, process_count
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self.n_dev = len(self.devices)
        self.backend = self.devices[0].platform
        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self.sharded = NamedSharding(self.mesh, PartitionSpec(AXIS))
        self.K = cfg.steps_per_dispatch or default_steps_per_dispatch(self.backend, cfg.arch)
        self.unroll = cfg.scan_unroll or 1  # a rolled scan: fastest on CPU and accelerators (bench_engine)
        self.replica_axis = cfg.replica_axis if cfg.replica_axis != "auto" else default_replica_axis(self.backend)
        ds = dataset if dataset is not None else data_lib.load(cfg.dataset, cfg.data_dir or None)
        bad = [p for p in cfg.P if p > ds.n_train]
        if bad:
            raise ValueError(f"P values {bad} exceed the {ds.n_train} training examples of {cfg.dataset}")
        self.n_train = ds.n_train
        conv_impl = models_lib.resolve_conv_impl(cfg.conv_impl, self.backend, cfg.arch)
        self.model_spec = (cfg.arch, tuple(ds.input_shape), ds.num_classes, cfg.size, conv_impl)
        self.model = models_lib.get_model(*self.model_spec[:3], size=cfg.size, conv_impl=conv_impl)
        self.p = train_programs(self.model_spec, (cfg.optimizer, cfg.weight_decay, cfg.adam_b1, cfg.adam_b2,
                                                  cfg.adam_eps), self.unroll, self.replica_axis, self.mesh)
        repl = NamedSharding(self.mesh, PartitionSpec())
        self.x_train = jax.device_put(np.asarray(ds.x_train, np.float32), repl)
        self.y_train = jax.device_put(np.asarray(ds.y_train, np.int32), repl)
        self.eval_batch = cfg.eval_batch or default_eval_batch(self.backend)
        self.conv_bound = (cfg.norm_conv_bound if cfg.norm_conv_bound != "auto"
                           else default_conv_bound(self.backend, cfg.arch))
        norm_kw = dict(definition=cfg.norm_definition, norm_layers=cfg.norm_layers, attention=cfg.norm_attention,
                       zoo=cfg.norm_zoo, dense_method=cfg.dense_method, conv_bound=self.conv_bound,
                       max_iters=cfg.norm_max_iters, tol=cfg.norm_tol)
        self.evaluator = evaluate_lib.Evaluator(self.model_spec, self.mesh, ds.x_test, ds.y_test, self.x_train,
                                                self.y_train, eval_batch=self.eval_batch, test_subset=cfg.test_subset,
                                                train_eval_max=cfg.train_eval_max, norm_kw=norm_kw,
                                                replica_axis=self.replica_axis)
        seeds = range(cfg.seed_start, cfg.seed_start + cfg.seeds)
        # cfg.eval_steps: evaluation steps per job from its steps per epoch (epoch schedules give epoch
        # boundaries, "log_steps" log-spaced steps that depend on P).
        all_jobs = schedule_lib.make_jobs(cfg.P, seeds, cfg.epochs, cfg.batch_size, cfg.eval_steps, cfg.lr,
                                          cfg.lr_overrides)
        self.jobs = schedule_lib.process_share(all_jobs, process_index, process_count)
        self._orders: dict[int, replica_lib.DataOrder] = {}
        rpd = cfg.replicas_per_device
        n_slots = choose_slots(self.jobs, rpd, self.n_dev, self.backend) if self.jobs else self.n_dev
        if rpd == 0 and self.backend != "cpu" and self.jobs:
            est = self.estimate_replicas_per_device()
            if est:  # an estimate caps the automatic choice, never raises it
                n_slots = min(n_slots, choose_slots(self.jobs, est, self.n_dev, self.backend))
        self.pool = schedule_lib.SlotPool(self.jobs, n_slots, self.K, self.n_dev, compact_min_steps)
        self.layer_names = norms_lib.operator_names(self.model.layout, definition=cfg.norm_definition,
                                                    norm_layers=cfg.norm_layers, attention=cfg.norm_attention)
        self.results_path = self.out / results_lib.results_file(process_index, process_count)
        self.ckpt_dir = ckpt_lib.directory(self.out, process_index, process_count)
        self.summary_path = self.out / ("summary.json" if process_count == 1 else f"summary.p{process_index}.json")

    @property
    def traces(self) -> collections.Counter:
        """Traces per compiled program (shared by engines with the same programs)."""
        return self.p.traces + self.evaluator.p.traces

    def train_memory(self) -> tuple[int, int] | None:
        """(fixed bytes, bytes per replica slot) of the compiled train dispatch on one device, from
        XLA's memory analysis at 1 and 2 replicas per device
        (``jit(...).lower(...).compile().memory_analysis()``); None where XLA gives none."""
        try:
            def bytes_for(r: int) -> int:
                R, K, B = r * self.n_dev, self.K, self.cfg.batch_size
                sd = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=self.sharded)
                states = jax.tree.map(lambda a: sd(a.shape, a.dtype), self.p.abstract(R))
                m = self.p.train.lower(states, self.x_train, self.y_train, sd((R, K, B), jnp.int32),
                                       sd((R, K, B), jnp.float32), sd((R, K), jnp.bool_)).compile().memory_analysis()
                return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
                           - m.alias_size_in_bytes)

            b1, b2 = bytes_for(1), bytes_for(2)
        except Exception:  # noqa: BLE001 -- an estimate only
            return None
        per = max(b2 - b1, 1)
        return b1 - per, per

    def estimate_replicas_per_device(self, fraction: float = 0.6) -> int | None:
        """Replicas per device that fit in ``fraction`` of the device memory (:meth:`train_memory`),
        or None when unknown (CPU)."""
        limit = (self.devices[0].memory_stats() or {}).get("bytes_limit")
        mem = self.train_memory() if limit else None
        if not mem:
            return None
        base, per = mem
        return max(1, int((fraction * limit - base) // per))

    # ---------------------------------------------------------------- per-job host data
    def _order(self, j: int) -> replica_lib.DataOrder:
        if j not in self._orders:
            job = self.jobs[j]
            self._orders[j] = replica_lib.DataOrder(
                data_lib.subset_indices(self.cfg.sweep_seed, job.seed, job.P, self.n_train),
                replica_lib.replica_key_data(self.cfg.sweep_seed, job.P, job.seed), self.cfg.batch_size)
        return self._orders[j]

    def _batches(self, steps: np.ndarray):
        """Host batch indices of the next dispatch: idx int32 [R, K, B], w float32 [R, K, B], active bool [R, K]."""
        R, K, B, pool = self.pool.n_slots, self.K, self.cfg.batch_size, self.pool
        idx = np.zeros((R, K, B), np.int32)
        w = np.zeros((R, K, B), np.float32)
        act = np.zeros((R, K), bool)
        for r, j in enumerate(pool.slot_job):
            n = int(steps[r])
            if j is not None and n:
                idx[r, :n], w[r, :n] = self._order(j).batches(pool.slot_pos[r], n)
                act[r, :n] = True
        return idx, w, act

    # ---------------------------------------------------------------- slot events
    def _init(self, states, new: list[tuple[int, int]]):
        R = self.pool.n_slots
        key_data = np.zeros((R, 2), np.uint32)
        lr = np.zeros(R, np.float32)
        fresh = np.zeros(R, bool)
        for r, j in new:
            job = self.jobs[j]
            key_data[r] = self._order(j).key_data
            lr[r], fresh[r] = job.lr, True
        put = lambda a: jax.device_put(a, self.sharded)
        return self.p.init(states, put(key_data), put(lr), put(fresh))

    def _evaluate(self, states, due: list[tuple[int, int, int]], wall: float):
        cfg = self.cfg
        epochs = [self.jobs[j].epoch(step) for _, j, step in due]  # int on an epoch boundary, else float
        margin = [isinstance(e, int) and e in cfg.margin_epochs for e in epochs]
        want_margins = any(margin)
        states, res = self.evaluator(states, [r for r, _, _ in due], [self._order(j).subset for _, j, _ in due],
                                     want_margins)
        rows = []
        for i, ((r, j, step), epoch, save) in enumerate(zip(due, epochs, margin)):
            job = self.jobs[j]
            row = self._row(job, step, wall, test_error=res.test_error[i], test_loss=res.test_loss[i],
                            train_error=res.train_error[i], train_loss=res.train_loss[i],
                            spectral_complexity=res.spectral_complexity[i])
            row.update({k: v[i] for k, v in res.norm_columns.items()})
            for name, d in res.layers.items():
                row.update({f"norm/{name}/{k}": v[i] for k, v in d.items()})
            rows.append(row)
            if save:
                results_lib.save_margins(self.out, job.P, job.seed, epoch, res.margins[i])
        self.results.append(rows)
        return states

    def _row(self, job: schedule_lib.Job, step: int, wall: float, diverged: bool = False, **metrics) -> dict:
        c = self.cfg
        return dict(arch=c.arch, dataset=c.dataset, size=c.size, P=job.P, seed=job.seed, replica=job.replica,
                    epoch=job.epoch(step), step=step, wall_time=wall, diverged=diverged, lr=job.lr, **metrics)

    def _compact(self, states, keep: list[int]):
        """Keeps slots ``keep``, in that order: through the host (slots change devices; rare)."""
        host = jax.tree.map(lambda a: np.asarray(a)[np.asarray(keep)], states)
        return jax.device_put(host, self.sharded)

    # ---------------------------------------------------------------- checkpoints
    def _save(self, states, wall: float, finished: bool = False) -> None:
        self.ckpt_count += 1
        mark = rundir.mark_results(self.results_path)
        meta = dict(scheduler=self.pool.state_dict(), results_bytes=mark.size, results=mark._asdict(), n_slots=self.pool.n_slots,
                    wall_time=wall, finished=finished, count=self.ckpt_count, science=self.cfg.science(),
                    seconds_by_part=self._seconds(),
                    process_index=self.proc, process_count=self.nproc)
        ckpt_lib.save(self.ckpt_dir, self.ckpt_count, jax.tree.map(np.asarray, states), meta)

    def latest_checkpoint(self) -> tuple[int, dict] | None:
        """(step, meta) of the newest checkpoint that verifies (:func:`jaxnorm.checkpoint.find_verified`).

        Prints one ``warning:`` line on stderr per newer checkpoint skipped, naming it and the step used.

        Raises:
          jaxnorm.checkpoint.NoValidCheckpoint: checkpoints exist and none verifies.
        """
        found, skipped = ckpt_lib.find_verified(self.ckpt_dir, self.results_path)
        for line in skipped:
            print(f"warning: {line}; using step {found[0]}", file=sys.stderr)
        return found

    def _restore(self, step: int, meta: dict):
        R = -(-meta["n_slots"] // self.n_dev) * self.n_dev  # re-pad for this run's device count
        self.pool.load_state_dict(meta["scheduler"], R)
        self.results.truncate(meta["results"]["size"])  # verified: the file is at least that long
        self.ckpt_count = meta["count"]
        # Time already spent by the earlier segments (checkpoints written before this field: zeros).
        self.seconds = {k: float(meta.get("seconds_by_part", {}).get(k, 0.0)) for k in SECONDS}
        self.evaluator.seconds = {k: self.seconds[k] for k in self.evaluator.seconds}
        host = ckpt_lib.restore_state(self.ckpt_dir, step, self.p.abstract(meta["n_slots"]))
        return jax.device_put(ckpt_lib.pad_slots(host, R), self.sharded), meta["wall_time"]

    def _checkpoint_due(self, t_last: float, steps_last: int) -> bool:
        c = self.cfg
        if c.checkpoint_minutes > 0 and time.time() - t_last >= 60 * c.checkpoint_minutes:
            return True
        if c.checkpoint_epochs > 0 and self.jobs:
            spe = np.mean([j.steps_per_epoch for j in self.jobs])
            return self.pool.busy_steps - steps_last >= c.checkpoint_epochs * spe * self.pool.n_slots
        return False

    def _oom(self, what: str) -> str:
        c = self.cfg
        return (f"out of device memory during {what} with {self.pool.n_slots // self.n_dev} replicas per "
                f"device (batch_size={c.batch_size}, eval_batch={self.eval_batch}, model {c.arch}/{c.size}). "
                f"Lower --replicas-per-device (replicas_per_device) first, then eval_batch or steps_per_dispatch.")

    # ---------------------------------------------------------------- the loop
    def run(self, resume: tuple[int, dict] | None = None, quiet: bool = True,
            stop_after_dispatches: int | None = None) -> dict:
        """Trains until every job of this process is done (or ``stop_after_dispatches`` dispatches).

        Args:
          resume: (step, meta) of the checkpoint to resume from (:meth:`latest_checkpoint`), or None.
          quiet: no progress bar.
          stop_after_dispatches: stop after that many train dispatches, without a final checkpoint
            (a time budget; the next run resumes from the last checkpoint).
        """
        pool = self.pool
        (self.out / results_lib.MARGIN_DIR).mkdir(parents=True, exist_ok=True)
        self.results = results_lib.Writer(self.results_path, results_lib.columns(self.layer_names, zoo=self.cfg.norm_zoo))
        self.ckpt_count, wall0 = 0, 0.0
        self.seconds = dict.fromkeys(SECONDS, 0.0)
        self.evaluator.seconds = dict.fromkeys(self.evaluator.seconds, 0.0)
        if resume is not None:
            states, wall0 = self._restore(*resume)
        else:
            self.results.truncate(0)  # a run that crashed before its first checkpoint starts over
            states = self.p.empty(pool.n_slots)
        t0 = time.time()
        wall = lambda: wall0 + time.time() - t0
        from tqdm.auto import tqdm

        done_steps = sum(self.jobs[j].total_steps for j in pool.finished) + sum(
            p for j, p in zip(pool.slot_job, pool.slot_pos) if j is not None)
        bar = tqdm(total=sum(j.total_steps for j in self.jobs), initial=done_steps, unit="step", disable=quiet,
                   smoothing=0.05, desc=f"{self.cfg.arch}/{self.cfg.dataset}", dynamic_ncols=True)
        t_ckpt, steps_ckpt, dispatches, self.compactions = time.time(), pool.busy_steps, 0, 0
        try:
            while True:
                d = pool.next_dispatch()
                for rnd in d.rounds:
                    if rnd.new:
                        states = self._init(states, rnd.new)
                    if rnd.due:
                        try:
                            states = self._evaluate(states, rnd.due, wall())
                        except Exception as err:  # noqa: BLE001
                            if _is_oom(err):
                                raise MemoryError(self._oom("evaluation")) from err
                            raise
                if d.steps is None:
                    break
                if d.keep is not None:
                    states = self._compact(states, d.keep)
                    self.compactions += 1
                if self._checkpoint_due(t_ckpt, steps_ckpt):
                    t_save = time.perf_counter()
                    self._save(states, wall())
                    self.seconds["checkpoint"] += time.perf_counter() - t_save
                    t_ckpt, steps_ckpt = time.time(), pool.busy_steps
                if stop_after_dispatches is not None and dispatches >= stop_after_dispatches:
                    return dict(stopped=True)
                t_train = time.perf_counter()
                idx, w, act = self._batches(d.steps)
                put = lambda a: jax.device_put(a, self.sharded)
                try:
                    states = self.p.train(states, self.x_train, self.y_train, put(idx), put(w), put(act))
                    diverged = np.asarray(states.diverged)  # from each device's own shard
                except Exception as err:  # noqa: BLE001
                    if _is_oom(err):
                        raise MemoryError(self._oom("training")) from err
                    raise
                self.seconds["train"] += time.perf_counter() - t_train
                pool.advance(d.steps)
                dispatches += 1
                for r in np.nonzero(diverged)[0]:
                    if pool.slot_job[r] is not None:
                        step = pool.slot_pos[r]
                        job = self.jobs[pool.stop(int(r))]
                        self.results.append([self._row(job, step, wall(), diverged=True)])
                        bar.update(job.total_steps - step)  # never to be run
                bar.update(int(d.steps.sum()))
        finally:
            bar.close()
        self._save(states, wall(), finished=True)
        summary = self.summary(wall())
        _write_atomic(self.summary_path, json.dumps(summary, indent=2))
        return summary

    def _seconds(self) -> dict:
        """Wall seconds per activity, summed over every segment of the run (resumes included)."""
        return {**self.seconds, **self.evaluator.seconds}  # the evaluator times its own two parts

    def summary(self, wall_time: float) -> dict:
        """The run's ``summary.json``: scheduling figures, engine settings and the time it took.

        ``seconds_by_part``: wall seconds summed over the run's segments in training dispatches (host batch
        indices included), norm evaluations (``jaxnorm.norms.evaluate`` of the evaluated slots), test/train
        metrics and checkpoint writes; ``train_images_per_s``: busy replica-steps x batch size / train
        seconds (the engine throughput); ``norm_fraction``: eval_norms / train seconds (issue 11's cost)."""
        p = self.pool
        sec = {k: round(v, 2) for k, v in self._seconds().items()}
        rate = p.busy_steps * self.cfg.batch_size / sec["train"] if sec["train"] > 0 else None
        return dict(jobs=len(self.jobs), finished=len(p.finished), diverged=sum(p.finished.values()),
                    idle_fraction=p.idle_fraction(), busy_replica_steps=p.busy_steps, idle_replica_steps=p.idle_steps,
                    slots=p.ladder[0], compactions=getattr(self, "compactions", 0), steps_per_dispatch=self.K, scan_unroll=self.unroll,
                    replica_axis=self.replica_axis, conv_impl=self.model_spec[4], conv_bound=self.conv_bound,
                    eval_batch=self.eval_batch,
                    devices=self.n_dev,
                    process_index=self.proc, process_count=self.nproc, traces=dict(self.traces), wall_time=wall_time,
                    seconds_by_part=sec, train_images_per_s=None if rate is None else round(rate, 1),
                    norm_fraction=round(sec["eval_norms"] / sec["train"], 4) if sec["train"] > 0 else None)


# ------------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------------


def _check_run_dir(out: Path, cfg: config_lib.SweepConfig, resume: bool | None, nproc: int) -> bool:
    """Whether ``out`` holds a run to resume; raises on a mismatch. Returns False for a fresh start."""
    cfg_path = out / CONFIG_FILE
    exists = cfg_path.exists()
    if resume is True and not exists:
        raise ValueError(f"--resume: {str(out)!r} holds no run to resume (no {CONFIG_FILE})")
    if resume is False and exists:
        raise RunDirMismatch(f"{str(out)!r} already holds a run; pick another --out or pass --overwrite")
    if not exists:
        return False
    old = config_lib.from_json(cfg_path.read_text())
    diff = {k: (v, cfg.science()[k]) for k, v in old.science().items() if cfg.science().get(k) != v}
    if diff:
        lines = "; ".join(f"{k}: {a!r} in the run dir vs {b!r} now" for k, (a, b) in sorted(diff.items()))
        raise RunDirMismatch(f"{str(out)!r} holds a different sweep ({lines}). Use another --out, "
                             f"or --overwrite to discard it.")
    names = [p.name for p in results_lib.shard_paths(out)]
    single = results_lib.RESULTS_FILE in names
    multi = [int(n.split(".")[1][1:]) for n in names if n != results_lib.RESULTS_FILE]
    if (nproc == 1 and multi) or (nproc > 1 and (single or any(i >= nproc for i in multi))):
        raise RunDirMismatch(f"{str(out)!r} was written by another number of processes than {nproc} "
                             f"({names}); rerun with that number of processes, or use another --out")
    return True


def run(cfg: config_lib.SweepConfig, out_dir: str | Path, *, resume: bool | None = None, overwrite: bool = False,
        quiet: bool = False, dataset=None, devices=None, stop_after_dispatches: int | None = None,
        process_index: int | None = None, process_count: int | None = None, compact_min_steps: int = 1000) -> dict:
    """Runs (or resumes) a sweep into ``out_dir``.

    Args:
      cfg: the sweep (``jaxnorm.config.resolve`` / ``from_dict``).
      out_dir: run directory: ``config.json``, ``versions.json``, ``results.csv`` (:func:`jaxnorm.results.load`),
        ``checkpoints/``, ``margins/``, ``summary.json`` (per-process shards of a multi-process run).
      resume: None (default): resume an existing run directory whose config matches, else start;
        True: there must be a run to resume; False: the directory must not hold a run.
      overwrite: delete an existing run directory first (process 0 of a multi-process run only).
      quiet: no progress bar.
      dataset: a ``jaxnorm.data.Dataset`` to use instead of ``data.load(cfg.dataset)``.
      devices: devices of the replica mesh (default: this process's local devices).
      stop_after_dispatches: stop (without the final checkpoint) after that many train dispatches.
      process_index, process_count: this process's share of the jobs (default: ``jax.process_index()``
        and ``jax.process_count()``, i.e. 0 and 1 unless ``jax.distributed`` is initialized).
      compact_min_steps: compact the slot pool only when at least this many steps are left (a new
        slot count costs a compilation; ``jaxnorm.schedule``).

    Returns:
      The summary (jobs, finished, diverged, idle_fraction, traces, ...); ``{"noop": True, ...}`` when
      this process's share is already finished; ``{"stopped": True}`` after ``stop_after_dispatches``.

    Raises:
      RunDirMismatch: ``out_dir`` holds a run of a different sweep (the message lists the differences).
      jaxnorm.rundir.RunDirLocked: another live process is writing ``out_dir`` (this process's shard).
      jaxnorm.checkpoint.NoValidCheckpoint: checkpoints exist but none verifies against its checksums
        and this process's results file (nothing is changed; the message says what to do).
      jaxnorm.rundir.RunDirError: ``out_dir`` is a file, below a file, not writable, or not a jaxnorm
        run directory (never written into nor deleted, ``overwrite`` included).
      ValueError: a bad config, or P larger than the training set.
      MemoryError: out of device memory (the message says what to lower).
    """
    out = Path(out_dir)
    config_lib.validate(cfg)
    proc = jax.process_index() if process_index is None else process_index
    nproc = jax.process_count() if process_count is None else process_count
    # One writer per (run directory, process): a second copy of the command is refused at once; the
    # kernel drops the lock of a killed process (jaxnorm.rundir).
    with rundir.lock(out, shard=proc):
        discard = None
        if overwrite:
            # --overwrite deletes only a jaxnorm run directory, and only once the new config and data
            # have been checked (below, after the Engine is built); process 0 deletes.
            discard = rundir.plan_overwrite(out) if proc == 0 else None
            exists = False
        else:
            rundir.check_reusable(out)
            exists = _check_run_dir(out, cfg, resume, nproc)
        # Built before the run directory exists: missing data or a bad P leaves no empty directory behind.
        engine = Engine(cfg, out, dataset=dataset, devices=devices, process_index=proc, process_count=nproc,
                        compact_min_steps=compact_min_steps)
        if discard is not None:
            discard()
        if overwrite and jax.process_count() > 1:  # the others write only once process 0 has deleted
            multihost_utils.sync_global_devices("jaxnorm.engine.run: overwrite")
        out.mkdir(parents=True, exist_ok=True)
        return _run_checked(engine, cfg, out, exists, quiet, stop_after_dispatches)


def _run_checked(engine: Engine, cfg: config_lib.SweepConfig, out: Path, exists: bool, quiet: bool,
                 stop_after_dispatches: int | None) -> dict:
    # The newest checkpoint that verifies (its state and the results prefix it covers): a finished
    # run whose results.csv was cut or edited falls back to an older checkpoint and recomputes.
    latest = engine.latest_checkpoint() if exists else None
    if latest is not None and latest[1].get("finished"):
        if not quiet:
            print(f"{out}: sweep already finished; nothing to do", file=sys.stderr)
        s = engine.summary_path
        return {**(json.loads(s.read_text()) if s.exists() else {}), "noop": True}
    _write_atomic(out / CONFIG_FILE, config_lib.to_json(cfg))
    _write_atomic(out / VERSIONS_FILE, json.dumps(_versions(), indent=2))
    return engine.run(resume=latest, quiet=quiet, stop_after_dispatches=stop_after_dispatches)

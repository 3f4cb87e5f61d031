"""The schedule of a sweep: jobs, a pool of replica slots, LPT refill, compaction (no JAX).

A *job* is one replica (P, seed) of the sweep (paper Sec. 3.1: one network trained on a random
P-subset). The engine trains R jobs at once in R *slots* (the leading axis of the device arrays).
:class:`SlotPool` decides, dispatch after dispatch, what each slot does; :meth:`SlotPool.next_dispatch`
is the one event loop, used by the engine (:mod:`jaxnorm.engine`) and by the idle-fraction
simulator (:func:`simulate_idle_fraction`) alike, so that the simulated schedule is the trained one.

Policy
------
* Jobs are queued longest first (LPT, Graham 1969): it minimizes the idle tail of the pool.
* A dispatch runs up to K optimizer steps per slot. A slot stops early at its job's next
  evaluation step (evaluations happen between dispatches) and idles for the rest of that
  dispatch (never when K = 1); a finished job's slot is refilled from the queue at once.
* When the queue is empty and the occupied slots fit a smaller size of the ladder
  (:func:`slot_ladder`: R, ~3R/4, ~R/2, ..., multiples of the device count), the pool is
  compacted to it, provided at least ``compact_min_steps`` steps are left (a new slot count
  costs a compilation).

A :class:`Dispatch` lists what the caller does, in order: for each round, initialize the new
jobs, evaluate the due slots (at the step they reached), and collect the finished ones; then
compact; then train ``steps`` (int [R]) and call :meth:`SlotPool.advance`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Callable, NamedTuple, Sequence, Union

import numpy as np


@dataclasses.dataclass(frozen=True)
class Job:
    """One replica (P, seed) of the sweep.

    Attributes:
      index: position in the sweep's job list (LPT order).
      replica: stable id ``P * 1000 + seed`` (unique for seed < 1000), the ``replica`` column.
      P, seed: training-set size and seed index.
      lr: its learning rate.
      steps_per_epoch: ceil(P / batch_size).
      eval_steps: sorted optimizer-step counts at which it is evaluated (0 = initialization); epoch
        boundaries (epoch * steps_per_epoch) or any step (``SweepConfig.eval_steps``, "log_steps").
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

    def epoch(self, step: int) -> int | float:
        """Epochs trained after ``step`` optimizer steps: step / steps_per_epoch, an int on an epoch
        boundary (the ``epoch`` column; a float between boundaries)."""
        q, r = divmod(step, self.steps_per_epoch)
        return q if r == 0 else step / self.steps_per_epoch


# The evaluation points of a sweep, given to make_jobs: the same epochs for every job (epoch 0 =
# initialization), or a function steps_per_epoch -> sorted evaluation steps for schedules whose steps
# depend on P (jaxnorm.config.SweepConfig.eval_steps, e.g. "log_steps").
EvalPoints = Union[Sequence[int], Callable[[int], Sequence[int]]]


def make_jobs(P: Sequence[int], seeds: Sequence[int], epochs: int, batch_size: int,
              eval_epochs: EvalPoints, lr: float = 1e-3,
              lr_overrides: Sequence[tuple[int, int, float]] = ()) -> list[Job]:
    """The sweep's jobs, longest first (LPT order).

    Args:
      P, seeds: the replicas (P, seed).
      epochs, batch_size: each job takes epochs * ceil(P / batch_size) optimizer steps.
      eval_epochs: evaluation epochs shared by every job (converted to epoch * steps_per_epoch), or a
        callable steps_per_epoch -> evaluation steps (:data:`EvalPoints`).
      lr, lr_overrides: the learning rate, and {(P, seed): lr} exceptions.
    """
    over = {(p, s): l for p, s, l in lr_overrides}
    specs = sorted(((p, s) for p in P for s in seeds), key=lambda ps: (-ps[0], ps[1]))
    jobs = []
    for i, (p, s) in enumerate(specs):
        spe = -(-p // batch_size)
        if callable(eval_epochs):
            ev = tuple(sorted(set(int(x) for x in eval_epochs(spe))))
        else:
            ev = tuple(e * spe for e in eval_epochs)
        if ev and not 0 <= min(ev) <= max(ev) <= epochs * spe:  # a step past the end is never reached
            raise ValueError(f"evaluation steps {min(ev)}..{max(ev)} of P={p} outside 0..{epochs * spe}")
        jobs.append(Job(i, p * 1000 + s, p, s, float(over.get((p, s), lr)), spe, ev, epochs * spe))
    return jobs


def process_share(jobs: Sequence[Job], process_index: int, process_count: int) -> list[Job]:
    """The jobs of one process of a multi-process sweep: every ``process_count``-th job of the
    LPT order, starting at ``process_index`` (disjoint, covering, and balanced: each process gets
    long and short jobs alike). ``index`` is renumbered within the share."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index}; allowed: 0 .. {process_count - 1}")
    return [dataclasses.replace(j, index=i) for i, j in enumerate(jobs[process_index::process_count])]


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


def balanced_slots(jobs: Sequence[Job]) -> int:
    """ceil(total steps / longest job): more slots than this cannot shorten the sweep (the longest job
    sets the makespan) and only add idle slots at the end."""
    return -(-sum(j.total_steps for j in jobs) // max(j.total_steps for j in jobs))


class Round(NamedTuple):
    """One round of slot events between two dispatches, handled in this order.

    new: [(slot, job index)] to initialize; due: [(slot, job index, step)] to evaluate;
    finished: [(slot, job index)] whose job has taken all its steps (slot now free).
    """

    new: list[tuple[int, int]]
    due: list[tuple[int, int, int]]
    finished: list[tuple[int, int]]


class Dispatch(NamedTuple):
    """What the engine does next: the rounds, then (when ``keep`` is not None) keep only those slots,
    in that order, then train ``steps`` (int [R]; None: the sweep is over after the rounds)."""

    rounds: list[Round]
    keep: list[int] | None
    steps: np.ndarray | None


class SlotPool:
    """A pool of slots over a queue of jobs (host-side state only; see the module docstring).

    Per slot: the job it runs (or None), how many optimizer steps that job has taken, and the
    last step at which it was evaluated.
    """

    def __init__(self, jobs: Sequence[Job], n_slots: int, steps_per_dispatch: int, n_devices: int = 1,
                 compact_min_steps: int = 1000):
        self.jobs = list(jobs)
        self.K = int(steps_per_dispatch)
        self.n_devices = n_devices
        self.compact_min_steps = compact_min_steps
        self.ladder = slot_ladder(n_slots, n_devices)
        self.slot_job: list[int | None] = [None] * n_slots
        self.slot_pos: list[int] = [0] * n_slots
        self.slot_evaluated: list[int] = [-1] * n_slots
        self.queue = collections.deque(range(len(self.jobs)))
        self.finished: dict[int, bool] = {}  # job index -> diverged
        self.busy_steps = 0  # replica-steps that trained
        self.idle_steps = 0  # replica-steps of a slot that did nothing during a dispatch
        self._eval_sets = [frozenset(j.eval_steps) for j in self.jobs]

    @property
    def n_slots(self) -> int:
        return len(self.slot_job)

    def done(self) -> bool:
        return not self.queue and all(j is None for j in self.slot_job)

    # ---------------------------------------------------------------- the event loop
    def next_dispatch(self) -> Dispatch:
        """Advances the pool to its next train dispatch (see :class:`Dispatch`)."""
        rounds = []
        while True:
            new = self._fill()
            due = self._due()
            finished = self._release_finished()
            rounds.append(Round(new, due, finished))
            if not (finished and self.queue):
                break
        if self.done():
            return Dispatch(rounds, None, None)
        keep = self._compaction()
        if keep is not None:
            self.slot_job = [self.slot_job[r] for r in keep]
            self.slot_pos = [self.slot_pos[r] for r in keep]
            self.slot_evaluated = [self.slot_evaluated[r] for r in keep]
        return Dispatch(rounds, keep, self._plan())

    def advance(self, steps: np.ndarray, times: int = 1) -> None:
        """Applies ``times`` dispatches of ``steps`` (int [R]) steps per slot."""
        for r, j in enumerate(self.slot_job):
            if j is not None:
                self.slot_pos[r] += int(steps[r]) * times
        self.busy_steps += int(steps.sum()) * times
        self.idle_steps += int(self.n_slots * self.K - steps.sum()) * times

    def stop(self, r: int, diverged: bool = True) -> int:
        """Stops slot r's job (divergence); returns the job index."""
        j = self.slot_job[r]
        self.finished[j] = diverged
        self.slot_job[r] = None
        return j

    def steps_to_next_event(self) -> int:
        """Dispatches of K = 1 until any occupied slot reaches an evaluation step or its end."""
        gaps = [self._next_stop(r) - self.slot_pos[r] for r, j in enumerate(self.slot_job) if j is not None]
        return max(1, min(gaps)) if gaps else 1

    def idle_fraction(self) -> float:
        total = self.busy_steps + self.idle_steps
        return self.idle_steps / total if total else 0.0

    # ---------------------------------------------------------------- the policy
    def _fill(self) -> list[tuple[int, int]]:
        new = []
        for r in range(self.n_slots):
            if self.slot_job[r] is None and self.queue:
                j = self.queue.popleft()
                self.slot_job[r], self.slot_pos[r], self.slot_evaluated[r] = j, 0, -1
                new.append((r, j))
        return new

    def _due(self) -> list[tuple[int, int, int]]:
        out = []
        for r, j in enumerate(self.slot_job):
            pos = self.slot_pos[r]
            if j is not None and pos != self.slot_evaluated[r] and pos in self._eval_sets[j]:
                self.slot_evaluated[r] = pos
                out.append((r, j, pos))
        return out

    def _release_finished(self) -> list[tuple[int, int]]:
        out = []
        for r, j in enumerate(self.slot_job):
            if j is not None and self.slot_pos[r] >= self.jobs[j].total_steps:
                self.finished[j] = False
                self.slot_job[r] = None
                out.append((r, j))
        return out

    def _compaction(self) -> list[int] | None:
        if self.queue:
            return None
        occupied = [r for r, j in enumerate(self.slot_job) if j is not None]
        smaller = [s for s in self.ladder if len(occupied) <= s < self.n_slots]
        if not smaller or not occupied:
            return None
        left = max(self.jobs[self.slot_job[r]].total_steps - self.slot_pos[r] for r in occupied)
        if left < self.compact_min_steps:
            return None
        empty = [r for r, j in enumerate(self.slot_job) if j is None]
        return occupied + empty[: smaller[-1] - len(occupied)]

    def _next_stop(self, r: int) -> int:
        job, pos = self.jobs[self.slot_job[r]], self.slot_pos[r]
        return next((s for s in job.eval_steps if s > pos), job.total_steps)

    def _plan(self) -> np.ndarray:
        n = np.zeros(self.n_slots, np.int64)
        for r, j in enumerate(self.slot_job):
            if j is not None:
                n[r] = min(self.K, self._next_stop(r) - self.slot_pos[r])
        return n

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict:
        """Plain JSON-able state (the jobs are rebuilt from the config)."""
        return dict(slot_job=self.slot_job, slot_pos=self.slot_pos, slot_evaluated=self.slot_evaluated,
                    queue=list(self.queue), finished={str(k): v for k, v in self.finished.items()},
                    busy_steps=self.busy_steps, idle_steps=self.idle_steps, K=self.K)

    def load_state_dict(self, d: dict, n_slots: int | None = None) -> None:
        """Restores :meth:`state_dict`, padded with empty slots to ``n_slots`` (another device count)."""
        self.slot_job, self.slot_pos = list(d["slot_job"]), list(d["slot_pos"])
        self.slot_evaluated = list(d["slot_evaluated"])
        self.queue = collections.deque(d["queue"])
        self.finished = {int(k): v for k, v in d["finished"].items()}
        self.busy_steps, self.idle_steps = d["busy_steps"], d["idle_steps"]
        extra = (n_slots or self.n_slots) - self.n_slots
        self.slot_job += [None] * extra
        self.slot_pos += [0] * extra
        self.slot_evaluated += [-1] * extra
        self.ladder = slot_ladder(self.n_slots, self.n_devices)


def simulate_idle_fraction(P: Sequence[int], seeds: int, epochs: int, batch_size: int,
                           eval_epochs: EvalPoints, n_slots: int, steps_per_dispatch: int = 1,
                           n_devices: int = 1) -> dict:
    """Runs :meth:`SlotPool.next_dispatch` without training and returns its idle fraction.

    ``eval_epochs`` as in :func:`make_jobs` (epochs, or ``SweepConfig.eval_steps``).

    With K = 1, the dispatches up to the next event of any slot are applied at once (they are
    identical), which changes nothing but the simulation's speed.

    Returns:
      dict(idle_fraction, busy_steps, idle_steps, dispatches).
    """
    pool = SlotPool(make_jobs(P, range(seeds), epochs, batch_size, eval_epochs), n_slots, steps_per_dispatch,
                    n_devices)
    dispatches = 0
    while (d := pool.next_dispatch()).steps is not None:
        m = pool.steps_to_next_event() if pool.K == 1 else 1
        pool.advance(d.steps, times=m)
        dispatches += m
    return dict(idle_fraction=pool.idle_fraction(), busy_steps=pool.busy_steps, idle_steps=pool.idle_steps,
                dispatches=dispatches)

"""Tests of the schedule (pure Python): every job gets exactly its steps and evaluations, the slot
ladder terminates, the idle fraction is small, process shares partition the jobs."""

from __future__ import annotations

import numpy as np

from jaxnorm import config as config_lib
from jaxnorm import engine
from jaxnorm import schedule


def _drain(pool: schedule.SlotPool) -> dict:
    """Runs the event loop as the engine does, without training; returns what happened to each job."""
    evaluated = {j.index: [] for j in pool.jobs}
    inited, compactions = [], 0
    while True:
        d = pool.next_dispatch()
        for rnd in d.rounds:
            inited += [j for _, j in rnd.new]
            for r, j, step in rnd.due:
                evaluated[j].append(step)
        if d.steps is None:
            break
        compactions += d.keep is not None
        assert len(d.steps) == pool.n_slots and (d.steps <= pool.K).all() and (d.steps >= 0).all()
        pool.advance(d.steps)
    return dict(evaluated=evaluated, inited=inited, compactions=compactions)


def test_every_job_gets_exactly_its_steps_and_evaluations():
    ev = config_lib.eval_epochs(5, "log", 1, 4, True)
    jobs = schedule.make_jobs([10, 50, 200, 333], range(3), 5, 16, ev)
    pool = schedule.SlotPool(jobs, 4, 3, compact_min_steps=0)
    out = _drain(pool)
    assert pool.busy_steps == sum(j.total_steps for j in jobs)
    assert sorted(out["inited"]) == [j.index for j in jobs]  # each job initialized once
    for j in jobs:
        assert out["evaluated"][j.index] == list(j.eval_steps)
    assert out["compactions"] >= 1 and pool.n_slots < 4  # compacted during the drain
    assert pool.done() and all(not d for d in pool.finished.values())


def test_jobs_are_queued_longest_first():
    jobs = schedule.make_jobs([10, 333, 50], range(2), 3, 16, (3,))
    assert [(j.P, j.seed) for j in jobs] == [(333, 0), (333, 1), (50, 0), (50, 1), (10, 0), (10, 1)]
    assert [j.total_steps for j in jobs] == [63, 63, 12, 12, 3, 3]


def test_slot_ladder_terminates_with_strictly_decreasing_multiples():
    for n_dev in (1, 2, 3, 4, 8):
        for n_slots in range(1, 70):
            lad = schedule.slot_ladder(n_slots, n_dev)  # used to loop forever, e.g. (4, 2), (16, 8)
            assert lad[-1] == n_dev and all(s % n_dev == 0 for s in lad)
            assert all(a > b for a, b in zip(lad, lad[1:]))
    assert schedule.slot_ladder(8, 1) == [8, 6, 4, 3, 2, 1] and schedule.slot_ladder(4, 2) == [4, 2]


def test_equal_jobs_in_equal_slots_never_idle():
    r = schedule.simulate_idle_fraction([64], 8, 10, 16, range(11), n_slots=8, steps_per_dispatch=1)
    assert r["idle_fraction"] == 0.0 and r["busy_steps"] == 8 * 10 * 4


def test_fast_forward_of_the_simulator_changes_nothing():
    # K = 1: the simulator applies the dispatches up to the next event at once; the plain loop
    # (the engine's) must give the same counts.
    ev = config_lib.eval_epochs(6, "every", 2, 0, True)
    sim = schedule.simulate_idle_fraction([30, 75, 160], 2, 6, 16, ev, n_slots=4, steps_per_dispatch=1)
    pool = schedule.SlotPool(schedule.make_jobs([30, 75, 160], range(2), 6, 16, ev), 4, 1)
    _drain(pool)
    assert (pool.busy_steps, pool.idle_steps) == (sim["busy_steps"], sim["idle_steps"])


def test_idle_fraction_under_ten_percent_on_a_paper_grid():
    # CIFAR ResNet/ViT grid of Appendix E (the worst of bench_engine.py --idle at K = 16), eval every
    # epoch, automatic slot count; 100 epochs instead of 1000 to keep the simulation fast (the idle
    # fraction is a ratio of per-epoch quantities: 1000 epochs gives 5.3%, see the bench).
    P, epochs, B = config_lib.CIFAR_DEEP_P, 100, 128
    ev = config_lib.eval_epochs(epochs, "every", 1, 60, True)
    jobs = schedule.make_jobs(P, range(5), epochs, B, ev)
    R = engine.choose_slots(jobs, 0, 1, "gpu")
    r = schedule.simulate_idle_fraction(P, 5, epochs, B, ev, R, steps_per_dispatch=16)
    assert r["idle_fraction"] < 0.10


def test_process_shares_partition_the_jobs_and_balance_the_work():
    jobs = schedule.make_jobs(config_lib.MNIST_P, range(5), 10, 64, (10,))
    for n in (1, 2, 3, 7):
        shares = [schedule.process_share(jobs, i, n) for i in range(n)]
        ids = sorted((j.P, j.seed) for s in shares for j in s)
        assert ids == sorted((j.P, j.seed) for j in jobs)  # disjoint and covering
        assert all([j.index for j in s] == list(range(len(s))) for s in shares)
        work = [sum(j.total_steps for j in s) for s in shares]
        # Round-robin over the LPT order: shares differ by at most one longest job.
        assert max(work) - min(work) <= max(j.total_steps for j in jobs)
    assert np.all([schedule.process_share(jobs, 1, 3)[k].P == jobs[1 + 3 * k].P for k in range(5)])


def test_log_steps_jobs_are_evaluated_at_their_own_step_grid():
    # "log_steps": each job's evaluation steps depend on P through its steps per epoch; the event loop
    # stops every job exactly there (off epoch boundaries too), with K > 1 and refills.
    cfg = config_lib.from_dict({**config_lib.paper_defaults("cnn", "fashion_mnist"), "P": [10, 50, 200, 333],
                                "seeds": 2, "epochs": 5, "batch_size": 16, "eval_schedule": "log_steps",
                                "eval_points": 12, "margin_epochs": [2]})
    jobs = schedule.make_jobs(cfg.P, range(2), cfg.epochs, cfg.batch_size, cfg.eval_steps)
    for j in jobs:
        total = 5 * -(-j.P // 16)
        grid = {0, 2 * j.steps_per_epoch} | {int(x) for x in np.unique(np.round(np.geomspace(1, total, 12)))}
        assert j.eval_steps == tuple(sorted(grid)) and j.total_steps == total
    # P = 333, 200, 50, 10: 105, 65, 20, 5 steps; P = 10 is evaluated at every step 0..5 (12 points dedup to 5).
    assert [len(j.eval_steps) for j in jobs if j.seed == 0] == [13, 13, 12, 6]
    pool = schedule.SlotPool(jobs, 3, 4, compact_min_steps=0)
    out = _drain(pool)
    for j in jobs:
        assert out["evaluated"][j.index] == list(j.eval_steps)
    assert pool.busy_steps == sum(j.total_steps for j in jobs)
    # The simulator takes the same per-job schedule (and its default compact_min_steps).
    sim = schedule.simulate_idle_fraction(cfg.P, 2, cfg.epochs, cfg.batch_size, cfg.eval_steps, 3, 4)
    ref = schedule.SlotPool(jobs, 3, 4)
    _drain(ref)
    assert (sim["busy_steps"], sim["idle_steps"]) == (ref.busy_steps, ref.idle_steps)


def test_job_epoch_is_exact_between_boundaries():
    job = schedule.make_jobs([100], [0], 3, 16, (0, 3))[0]  # 7 steps per epoch
    assert job.eval_steps == (0, 21)
    assert [job.epoch(s) for s in (0, 7, 21)] == [0, 1, 3] and all(type(job.epoch(s)) is int for s in (0, 7, 21))
    assert job.epoch(3) == 3 / 7 and job.epoch(10) == 10 / 7


def test_evaluation_steps_past_the_end_are_refused():
    import pytest

    with pytest.raises(ValueError, match=r"evaluation steps 0\.\.22 of P=100 outside 0\.\.21"):
        schedule.make_jobs([100], [0], 3, 16, lambda spe: (0, 22))

"""Checkpoints of a sweep (orbax): the slots' replica states, the schedule and the results length.

Commit protocol (what makes a SIGKILL at any moment safe)
--------------------------------------------------------
1. Results rows are appended to the results file as they are computed (one ``write`` + ``fsync``
   per batch of rows, :class:`jaxnorm.results.Writer`); margin files are written tmp + rename.
2. A checkpoint saves, in one orbax step, the host copy of every slot's
   :class:`jaxnorm.replica.ReplicaState` and a JSON ``meta``: the slot pool's state
   (:meth:`jaxnorm.schedule.SlotPool.state_dict`), the results file's byte length at that moment,
   the wall time and the slot count. Saves are synchronous (``wait_until_finished``): orbax
   renames a finished step into place, so a step directory either is complete or is ignored.
3. A resume restores the latest step and truncates the results file to the recorded length:
   rows written after the checkpoint are dropped and recomputed, identically, since every random
   choice is re-derived from the replica keys (no PRNG state is stored).
A margin file rewritten by the resumed run has the same content. Keeping two steps means a crash
during a save leaves the previous one.

States are saved as host numpy arrays (no device shardings), so a run may resume on another
device count: :func:`pad_slots` re-pads the slot axis to a multiple of the new count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

CHECKPOINT_DIR = "checkpoints"


def directory(run_dir: str | Path, process_index: int = 0, process_count: int = 1) -> Path:
    """``checkpoints/`` of a run, or ``checkpoints/p{i}`` for process i of a multi-process run."""
    d = Path(run_dir) / CHECKPOINT_DIR
    return (d if process_count == 1 else d / f"p{process_index}").absolute()


def _manager(path: Path):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
        max_to_keep=2, enable_async_checkpointing=False, create=True))


def save(path: Path, step: int, state: Any, meta: dict) -> None:
    """Saves ``state`` (a pytree of host arrays) and ``meta`` (JSON) as checkpoint ``step``."""
    import orbax.checkpoint as ocp

    mngr = _manager(path)
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              force=True)
    mngr.wait_until_finished()
    mngr.close()


def latest_meta(path: Path) -> tuple[int, dict] | None:
    """(step, meta) of the latest checkpoint under ``path``, or None."""
    import orbax.checkpoint as ocp

    if not path.exists():
        return None
    mngr = _manager(path)
    try:
        step = mngr.latest_step()
        if step is None:
            return None
        return step, mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    finally:
        mngr.close()


def restore_state(path: Path, step: int, abstract: Any) -> Any:
    """The state of checkpoint ``step`` as host numpy arrays; ``abstract``: its shapes and dtypes."""
    import orbax.checkpoint as ocp

    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract)
    mngr = _manager(path)
    try:
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    finally:
        mngr.close()
    return jax.tree.map(np.asarray, state)


def pad_slots(state: Any, n_slots: int) -> Any:
    """Pads the leading slot axis of a host state to ``n_slots`` with copies of slot 0 (empty slots
    are masked: their ``diverged`` flag is cleared and the pool never schedules them)."""
    n = jax.tree.leaves(state)[0].shape[0]
    if n_slots == n:
        return state
    state = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[:1], n_slots - n, 0)]), state)
    diverged = np.array(state.diverged)
    diverged[n:] = False
    return state.replace(diverged=diverged)

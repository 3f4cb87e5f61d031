"""Checkpoints of a sweep: the slots' replica states, the schedule and the results length.

Commit protocol (what makes a SIGKILL at any moment safe)
--------------------------------------------------------
1. Results rows are appended to the results file as they are computed (one ``write`` + ``fsync``
   per batch of rows, :class:`jaxnorm.results.Writer`); margin files are written tmp + rename.
2. A checkpoint saves, in one step directory, the host copy of every slot's
   :class:`jaxnorm.replica.ReplicaState` (``state.npz``) and a JSON ``meta.json``: the slot pool's
   state (:meth:`jaxnorm.schedule.SlotPool.state_dict`), the results file's byte length at that
   moment, the wall time and the slot count. Both are written and fsynced in ``<step>.tmp`` and the
   directory is renamed to ``<step>``, so a step directory either is complete or does not exist.
   The metadata also records the SHA-256 of ``state.npz`` (``state_sha256``) and the
   :class:`jaxnorm.rundir.ResultsMark` of the results file (``results``: its size and the SHA-256 of
   those bytes).
3. A resume walks the step directories newest first and restores the newest one that *verifies*
   (:func:`find_verified`): its ``meta.json`` parses, its ``state.npz`` hashes to the recorded digest,
   and the results file is at least the recorded size with the recorded prefix hash. A step that
   does not verify is named on stderr and skipped (never deleted); when none verifies the run is
   refused (:class:`NoValidCheckpoint`). The results file is then truncated to the recorded length
   (never grown: :meth:`jaxnorm.results.Writer.truncate`): rows written after the checkpoint are
   dropped and recomputed, identically, since every random choice is re-derived from the replica
   keys (no PRNG state is stored).
A margin file rewritten by the resumed run has the same content. Keeping two steps means a crash
during a save leaves the previous one.

States are saved as host numpy arrays (no device shardings), so a run may resume on another
device count: :func:`pad_slots` re-pads the slot axis to a multiple of the new count.

Why not orbax: its multi-host model is one checkpoint shared by all processes (the primary host
writes JSON and numpy items, processes meet at barriers). Here every process of a
``jax.distributed`` run checkpoints its own slots on its own schedule; with orbax-checkpoint 0.12
restricted to one process per manager (``MultiprocessingOptions(active_processes={i})``), the
numpy arrays of process 1 were still never written (its restore failed: "parameter subdirectory
not found"). A step here is a small ``.npz`` of host arrays and a JSON file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxnorm import rundir

CHECKPOINT_DIR = "checkpoints"


def directory(run_dir: str | Path, process_index: int = 0, process_count: int = 1) -> Path:
    """``checkpoints/`` of a run, or ``checkpoints/p{i}`` for process i of a multi-process run."""
    d = Path(run_dir) / CHECKPOINT_DIR
    return (d if process_count == 1 else d / f"p{process_index}").absolute()


KEEP = 2  # steps kept: a crash during a save leaves the previous one
STATE_FILE, META_FILE = "state.npz", "meta.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NoValidCheckpoint(rundir.RunDirError):
    """Checkpoints exist but none verifies; the message names each and says what to do."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(path: Path, step: int, state: Any, meta: dict) -> None:
    """Saves ``state`` (a pytree of host arrays) and ``meta`` (JSON) as checkpoint ``step``.

    Written into ``<step>.tmp``, fsynced, then renamed to ``<step>``: a step directory is complete or
    absent. ``meta`` gains ``state_sha256``, the SHA-256 of ``state.npz`` as written. Older steps
    beyond the last :data:`KEEP` are deleted afterwards.
    """
    path.mkdir(parents=True, exist_ok=True)
    tmp, final = path / f"{step}.tmp", path / str(step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    leaves = jax.tree.leaves(state)
    with open(tmp / STATE_FILE, "wb") as f:
        np.savez(f, **{f"{i:05d}": np.asarray(a) for i, a in enumerate(leaves)})
        f.flush()
        os.fsync(f.fileno())
    meta = {**meta, "state_sha256": _sha256_file(tmp / STATE_FILE)}
    with open(tmp / META_FILE, "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(path)
    for old in _steps(path)[:-KEEP]:
        shutil.rmtree(path / str(old), ignore_errors=True)


def _steps(path: Path) -> list[int]:
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / META_FILE).exists())


def verify(path: Path, step: int, results_path: Path) -> tuple[dict | None, str | None]:
    """(meta, None) when checkpoint ``step`` verifies, else (None, a reason without the path).

    Verifies: ``meta.json`` parses to an object holding ``state_sha256`` and ``results`` (a
    :class:`jaxnorm.rundir.ResultsMark`), ``state.npz`` hashes to ``state_sha256``, and
    ``results_path`` begins with the marked bytes (:func:`jaxnorm.rundir.check_results`).
    Reads only; never modifies a file.
    """
    d = path / str(step)
    try:
        meta = json.loads((d / META_FILE).read_text())
    except FileNotFoundError:
        return None, f"{META_FILE} is missing"
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None, f"{META_FILE} does not parse ({type(err).__name__})"
    if not isinstance(meta, dict) or not isinstance(meta.get("state_sha256"), str) \
            or not isinstance(meta.get("results"), dict):
        return None, f"{META_FILE} lacks the checksums this jaxnorm version records (state_sha256, results)"
    try:
        if _sha256_file(d / STATE_FILE) != meta["state_sha256"]:
            return None, f"{STATE_FILE} does not match its checksum"
    except OSError:
        return None, f"{STATE_FILE} is missing or unreadable"
    try:
        why = rundir.check_results(results_path, meta["results"])
    except (TypeError, ValueError):
        return None, f"{META_FILE} holds a malformed results mark"
    if why is not None:
        return None, why
    return meta, None


def find_verified(path: Path, results_path: Path) -> tuple[tuple[int, dict] | None, list[str]]:
    """The newest checkpoint under ``path`` that :func:`verify`-ies, and one line per newer one skipped.

    Returns:
      ((step, meta) or None, skipped): ``skipped`` lines read "checkpoint <dir>: <reason>"; the
      result is None when there is no checkpoint at all.

    Raises:
      NoValidCheckpoint: step directories exist but none verifies (nothing is deleted; the message
        names each and says to rerun with ``--overwrite`` or move the run directory away).
    """
    if not path.exists():
        return None, []
    steps = sorted((int(p.name) for p in path.iterdir() if p.name.isdigit() and p.is_dir()), reverse=True)
    skipped = []
    for step in steps:
        meta, why = verify(path, step, results_path)
        if meta is not None:
            return (step, meta), skipped
        skipped.append(f"checkpoint {path / str(step)}: {why}")
    if not steps:
        return None, []
    raise NoValidCheckpoint(f"no checkpoint of {str(path.parent if path.name == CHECKPOINT_DIR else path)!r} verifies ("
                            + "; ".join(skipped) + "); nothing was changed. Rerun with --overwrite to start the "
                            "sweep over, or move the run directory away to keep it")


def latest_meta(path: Path) -> tuple[int, dict] | None:
    """(step, meta) of the latest complete checkpoint under ``path``, or None."""
    if not path.exists():
        return None
    steps = _steps(path)
    if not steps:
        return None
    return steps[-1], json.loads((path / str(steps[-1]) / META_FILE).read_text())


def restore_state(path: Path, step: int, abstract: Any) -> Any:
    """The state of checkpoint ``step`` as host numpy arrays; ``abstract``: its pytree of shapes and dtypes."""
    leaves, treedef = jax.tree.flatten(abstract)
    with np.load(path / str(step) / STATE_FILE) as z:
        arrays = [z[f"{i:05d}"] for i in range(len(leaves))]
    for a, want in zip(arrays, leaves):
        if a.shape != tuple(want.shape) or a.dtype != want.dtype:
            raise ValueError(f"checkpoint {path / str(step)} holds {a.dtype}{list(a.shape)} where the model needs "
                             f"{want.dtype}{list(want.shape)}: another model or jaxnorm version; use another --out")
    return jax.tree.unflatten(treedef, arrays)


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

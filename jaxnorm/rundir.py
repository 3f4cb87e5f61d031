"""Run directories: one writer at a time, never someone else's folder, overwrite late, results checksums.

A sweep's run directory (``--out``; layout in ``jaxnorm.results``) is written by long jobs that
are killed, resumed and sometimes started twice by mistake. This module holds the rules that keep
such a directory whole; it knows nothing about training.

* **Lock** (:func:`lock`): ``fcntl.flock`` on ``<run_dir>/.lock-<shard>``. The kernel drops a
  flock when its process dies (SIGKILL included), so a killed run never leaves a stale lock; the
  file itself records ``pid`` and ``host`` so that a refusal can say "run directory in use by
  process N on host H". Under ``jax.distributed`` every process writes its own shard of one run
  directory and takes ``lock(run_dir, shard=jax.process_index())``; a second copy of the job
  collides on shard 0 (every job has a process 0). flock is advisory and per host (on NFS it is
  emulated with fcntl byte-range locks by the Linux client, which works across hosts on NFSv4).
* **Whose directory** (:func:`classify`): ``"absent"``, ``"empty"`` (nothing but lock files),
  ``"run"`` (a ``config.json`` holding a jaxnorm sweep config, and a ``results.csv``, if any, with
  jaxnorm's header) or ``"foreign"`` (anything else: ``thesis.tex``, someone else's
  ``results.csv``). A foreign directory is never written into nor deleted (:func:`check_reusable`).
* **Overwrite late** (:func:`plan_overwrite`): checks that the directory may be deleted and returns
  a callable that deletes its contents, to be called only once the new config and data have been
  validated, so a failed validation leaves the old run intact.
* **Results checksum** (:class:`ResultsMark`, :func:`mark_results`, :func:`check_results`):
  the size and SHA-256 of the first ``size`` bytes of ``results.csv``, stored in each checkpoint's
  metadata. On resume the file must be at least that long and its first ``size`` bytes must hash
  to the stored digest; a short file is reported, never padded.

Errors are :class:`RunDirError` (a ``ValueError``: the CLIs print it as one ``error:`` line, exit 2).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

__all__ = [
    "RunDirError",
    "RunDirLocked",
    "ResultsMark",
    "lock",
    "make_dir",
    "classify",
    "check_reusable",
    "plan_overwrite",
    "mark_results",
    "check_results",
]

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.csv"
LOCK_PREFIX = ".lock-"
# The first columns of every results.csv jaxnorm has written (jaxnorm.engine.BASE_COLUMNS starts so).
RESULTS_ID_COLUMNS = ("arch", "dataset", "size", "P", "seed")
# Keys every jaxnorm sweep config.json holds (jaxnorm.config.SweepConfig fields).
CONFIG_ID_KEYS = ("arch", "dataset", "P", "seeds", "sweep_seed", "epochs")
_CHUNK = 1 << 20


class RunDirError(ValueError):
    """A run directory that may not be used as asked; the message says why and what to do."""


class RunDirLocked(RunDirError):
    """Another live process holds the run directory's lock."""


# --------------------------------------------------------------------------------------------------
# Lock
# --------------------------------------------------------------------------------------------------


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"process {int(info['pid'])} on host {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):  # written a moment from now, or by an old version
        return "another process"


def make_dir(path: str | os.PathLike, what: str = "run directory") -> bool:
    """Creates the output directory ``path`` (and its parents) if needed; True when this call created it.

    Raises:
      RunDirError: naming ``what`` and ``path``: it is a file, lies below a file, cannot be created,
        or exists but is not writable by this user.
    """
    path = Path(path)
    try:
        for parent in [path, *path.parents]:
            if parent.exists() and not parent.is_dir():
                where = "is a file" if parent == path else f"is below {str(parent)!r}, which is a file"
                raise RunDirError(f"{what} {str(path)!r} {where}; allowed: a new or existing directory")
        is_dir = path.is_dir()
    except PermissionError:  # a parent this user may not enter
        raise RunDirError(f"cannot access {what} {str(path)!r}: permission denied; allowed: a directory you "
                          f"can write") from None
    if is_dir:
        if not os.access(path, os.W_OK | os.X_OK):
            raise RunDirError(f"{what} {str(path)!r} is not writable by this user; allowed: a directory you "
                              f"can write")
        return False
    try:
        path.mkdir(parents=True)
    except FileExistsError:  # created concurrently
        return False
    except OSError as err:
        raise RunDirError(f"cannot create {what} {str(path)!r}: {err.strerror.lower()}") from None
    return True


@contextlib.contextmanager
def lock(run_dir: str | os.PathLike, shard: int = 0) -> Iterator[Path]:
    """Holds the exclusive lock of one shard of a run directory for the ``with`` block.

    Creates ``run_dir`` when missing (and removes it again on exit if it is still empty, so a run
    refused by a later check leaves nothing behind). Non-blocking: a held lock is refused at once.

    Args:
      run_dir: the run directory.
      shard: the writer's index (``jax.process_index()`` under ``jax.distributed``; 0 otherwise).
    Yields:
      the lock file's path.
    Raises:
      RunDirLocked: another live process holds this shard ("in use by process N on host H").
      RunDirError: ``run_dir`` is a file, lies below a file, or cannot be created or written.
    """
    run_dir = Path(run_dir)
    created = make_dir(run_dir)
    path = run_dir / f"{LOCK_PREFIX}{int(shard)}"
    fd = None
    try:
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise RunDirError(f"run directory {str(run_dir)!r} is not writable ({err.strerror}); "
                                  f"allowed: a directory this user can write") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                fd = None
                raise RunDirLocked(f"run directory {str(run_dir)!r} is in use by {_holder(path)}; wait for it "
                                   f"to finish (or stop it), or pick another --out") from None
            except OSError as err:  # e.g. ENOLCK: a network filesystem without lock support
                os.close(fd)
                fd = None
                raise RunDirError(f"cannot lock run directory {str(run_dir)!r} ({err.strerror}); allowed: a "
                                  f"directory on a filesystem with flock support") from None
            # The previous holder unlinks the file on release: if it did so between our open and our
            # flock, we hold a lock on a deleted inode; start again with the file now on disk.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            fd = None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        yield path
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                path.unlink()  # while still locked (see the inode check above)
            os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only succeeds when empty


# --------------------------------------------------------------------------------------------------
# Whose directory is it?
# --------------------------------------------------------------------------------------------------


def _entries(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.iterdir() if not p.name.startswith(LOCK_PREFIX))


def _is_jaxnorm_config(path: Path) -> bool:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    from jaxnorm import config as config_lib  # noqa: PLC0415  (data only; keeps this module light)

    return isinstance(d, dict) and all(k in d for k in CONFIG_ID_KEYS) and set(d) <= set(config_lib.FIELDS)


def _is_jaxnorm_results(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(len(",".join(RESULTS_ID_COLUMNS)) + 1)
    except OSError:
        return False
    # An empty file is what a run killed before its header write leaves.
    return head == b"" or head.startswith((",".join(RESULTS_ID_COLUMNS) + ",").encode())


def classify(run_dir: str | os.PathLike) -> str:
    """``"absent"``, ``"empty"`` (lock files only), ``"run"`` (a jaxnorm run directory) or ``"foreign"``.

    A jaxnorm run directory holds a ``config.json`` with a jaxnorm sweep config (keys among
    ``jaxnorm.config.FIELDS``, including ``CONFIG_ID_KEYS``) and, if it holds a ``results.csv``,
    one whose header starts with ``RESULTS_ID_COLUMNS``. A path that is not a directory is
    ``"foreign"``.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return "absent"
    if not run_dir.is_dir():
        return "foreign"
    if not _entries(run_dir):
        return "empty"
    cfg, res = run_dir / CONFIG_FILE, run_dir / RESULTS_FILE
    if cfg.is_file() and _is_jaxnorm_config(cfg) and (not res.exists() or _is_jaxnorm_results(res)):
        return "run"
    return "foreign"


def _describe(run_dir: Path) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in _entries(run_dir)]
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def check_reusable(run_dir: str | os.PathLike) -> str:
    """Refuses a directory that is neither new, empty nor a jaxnorm run; returns :func:`classify`'s answer.

    Raises:
      RunDirError: ``run_dir`` holds files that are not a jaxnorm run (it names some of them).
    """
    kind = classify(run_dir)
    if kind == "foreign":
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise RunDirError(f"run directory {str(run_dir)!r} is not a directory; allowed: a new, empty or "
                              f"jaxnorm run directory")
        why = (f"its {RESULTS_FILE} was not written by jaxnorm" if (run_dir / RESULTS_FILE).exists()
               and (run_dir / CONFIG_FILE).is_file() and _is_jaxnorm_config(run_dir / CONFIG_FILE)
               else f"it holds {_describe(run_dir)} and no jaxnorm {CONFIG_FILE}")
        raise RunDirError(f"{str(run_dir)!r} is not a jaxnorm run directory ({why}); jaxnorm neither writes "
                          f"into nor deletes it (--overwrite included). Pick a new or empty --out.")
    return kind


def plan_overwrite(run_dir: str | os.PathLike) -> Callable[[], None]:
    """Checks that ``run_dir`` may be overwritten and returns the function that empties it.

    Call the returned function only after the new config and data have been validated: until then
    the old run is untouched. It deletes every entry of ``run_dir`` except the lock files (held by
    the caller and, under ``jax.distributed``, by the other shards' processes).

    Raises:
      RunDirError: ``run_dir`` is not new, empty or a jaxnorm run directory (see :func:`check_reusable`).
    """
    run_dir = Path(run_dir)
    check_reusable(run_dir)

    def discard() -> None:
        if not run_dir.is_dir():
            return
        for p in _entries(run_dir):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    return discard


# --------------------------------------------------------------------------------------------------
# results.csv checksum
# --------------------------------------------------------------------------------------------------


class ResultsMark(NamedTuple):
    """How much of ``results.csv`` a checkpoint covers: its first ``size`` bytes hash to ``sha256``.

    Stored as ``mark._asdict()`` (plain JSON) in a checkpoint's metadata.
    """

    size: int
    sha256: str


def _digest(path: Path, size: int) -> str | None:
    """SHA-256 hex of the first ``size`` bytes of ``path``; None when the file is shorter."""
    h = hashlib.sha256()
    left = size
    with open(path, "rb") as f:
        while left:
            chunk = f.read(min(left, _CHUNK))
            if not chunk:
                return None
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def mark_results(path: str | os.PathLike, size: int | None = None) -> ResultsMark:
    """The :class:`ResultsMark` of the first ``size`` bytes of ``path`` (default: the whole file).

    Raises:
      RunDirError: the file is shorter than ``size``.
    """
    path = Path(path)
    if size is None:
        size = path.stat().st_size
    d = _digest(path, int(size))
    if d is None:
        raise RunDirError(f"{str(path)!r} holds {path.stat().st_size} bytes, fewer than the {size} to checksum")
    return ResultsMark(int(size), d)


def check_results(path: str | os.PathLike, mark: ResultsMark | dict) -> str | None:
    """Whether ``path`` still begins with the bytes a checkpoint recorded.

    Returns:
      None when the first ``mark.size`` bytes hash to ``mark.sha256`` (bytes after them, rows
      written after that checkpoint, are the caller's to drop or keep); else a one-line reason
      naming the file ("is 7 bytes shorter than ...", "differs from ..."). Never modifies the file.
    """
    path = Path(path)
    mark = ResultsMark(**mark) if isinstance(mark, dict) else mark
    try:
        have = path.stat().st_size
    except FileNotFoundError:
        return f"{str(path)!r} is missing; the checkpoint covers its first {mark.size} bytes"
    if have < mark.size:
        return (f"{str(path)!r} is {mark.size - have} bytes shorter than the {mark.size} bytes the checkpoint "
                f"covers (truncated or edited)")
    if _digest(path, mark.size) != mark.sha256:
        return f"{str(path)!r} differs from what the checkpoint recorded in its first {mark.size} bytes (edited or corrupted)"
    return None


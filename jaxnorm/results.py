"""A sweep's results: one tidy row per (replica, evaluation point), written and read here.

A run directory written by :func:`jaxnorm.engine.run` holds ``results.csv`` (append-only; a
row batch is one ``write`` + ``fsync``; a multi-process run writes one shard per process,
``results.p{i}.csv``, and :func:`load` merges them), ``config.json`` (the resolved
:class:`jaxnorm.config.SweepConfig`), ``versions.json``, ``summary.json`` (after the end) and
``margins/P{P}_s{seed}_e{epoch}.npy`` (raw test margins f_y - max_{j != y} f_j, float32
[n_test_eval]).

Columns: arch, dataset, size, P, seed, replica (stable id P*1000 + seed), epoch (epochs trained:
step / ceil(P / batch_size), 0 = initialization; an integer column unless some evaluation is off an
epoch boundary, e.g. ``eval_schedule="log_steps"``, then float), step (optimizer steps taken),
test_error, test_loss, train_error, train_loss, spectral_complexity (paper Eq. 2), wall_time (seconds since the run started,
summed over resumes), diverged (True on the single row that flags a replica stopped for
non-finite loss or gradients; its metrics are NaN), lr, and per layer
``norm/<layer>/spec`` (||A_i||_sigma) and ``norm/<layer>/l21`` (||A_i^T - M_i^T||_{2,1}).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

RESULTS_FILE = "results.csv"
MARGIN_DIR = "margins"
BASE_COLUMNS = ("arch", "dataset", "size", "P", "seed", "replica", "epoch", "step", "test_error",
                "test_loss", "train_error", "train_loss", "spectral_complexity", "wall_time", "diverged", "lr")

_INT = ("P", "seed", "replica", "step")


def load(run_dir: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """The results table of a run directory (or the concatenation of several).

    A torn last line (a crash in the middle of a write) is ignored.

    Args:
      run_dir: a run directory, or a list of them (e.g. one per host of a split sweep).

    Returns:
      DataFrame, one row per (replica, evaluation point), columns as in the module docstring,
      sorted by (P, seed, epoch).
    """
    if isinstance(run_dir, (list, tuple)):
        return pd.concat([load(d) for d in run_dir], ignore_index=True)
    paths = shard_paths(run_dir)
    if not paths:
        raise FileNotFoundError(f"no {RESULTS_FILE} in {str(run_dir)!r}: not a run directory of jaxnorm.sweep")
    frames = [f for f in (_read(p) for p in paths) if len(f)]
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    for c in _INT:
        if c in df:
            df[c] = df[c].astype(np.int64)
    if "epoch" in df:  # integral: epoch-boundary evaluations only (every run before "log_steps")
        ep = df["epoch"].astype(np.float64)
        df["epoch"] = ep.astype(np.int64) if (ep == np.floor(ep)).all() else ep
    if "diverged" in df:
        df["diverged"] = df["diverged"].astype(str).str.lower().eq("true")
    return df.sort_values(["P", "seed", "epoch", "diverged"], kind="stable").reset_index(drop=True)


def shard_paths(run_dir: str | Path) -> list[Path]:
    """The results files of a run directory: ``results.csv`` and/or the per-process ``results.p{i}.csv``."""
    d = Path(run_dir)
    one = [d / RESULTS_FILE] if (d / RESULTS_FILE).exists() else []
    return one + sorted(d.glob("results.p*.csv"), key=lambda p: int(p.name.split(".")[1][1:]))


def results_file(process_index: int = 0, process_count: int = 1) -> str:
    """The results file name of one process: ``results.csv``, or ``results.p{i}.csv`` of a multi-process run."""
    return RESULTS_FILE if process_count == 1 else f"results.p{process_index}.csv"


def _read(path: Path) -> pd.DataFrame:
    raw = path.read_bytes()
    cut = raw.rfind(b"\n")  # a torn last line: a crash in the middle of a write
    raw = raw[: cut + 1] if cut >= 0 else b""
    # round_trip: pandas' default float parser is off by one ulp on some values (2.3333333333333335,
    # the epoch 7/3 of a "log_steps" evaluation, read back as 2.333333333333333); _fmt writes repr.
    return pd.read_csv(io.BytesIO(raw), float_precision="round_trip") if raw.count(b"\n") > 1 else pd.DataFrame()


def load_config(run_dir: str | Path) -> dict:
    """The resolved sweep config saved in the run directory, as a dict."""
    return json.loads((Path(run_dir) / "config.json").read_text())


def load_margins(run_dir: str | Path, P: int, seed: int, epoch: int) -> np.ndarray:
    """Raw test margins f_y - max_{j != y} f_j of replica (P, seed) at ``epoch``: float32 [n_test_eval]."""
    path = Path(run_dir) / MARGIN_DIR / f"P{P}_s{seed}_e{epoch}.npy"
    if not path.exists():
        have = sorted(p.name for p in (Path(run_dir) / MARGIN_DIR).glob("*.npy"))
        raise FileNotFoundError(f"no margins for P={P}, seed={seed}, epoch={epoch} in {run_dir}; "
                                f"saved: {have[:20]}{' ...' if len(have) > 20 else ''} "
                                f"(set margin_epochs in the sweep config)")
    return np.load(path)


def norm_columns(df: pd.DataFrame) -> list[str]:
    """The per-layer norm columns ``norm/<layer>/{spec,l21}`` of a results table, in layer order."""
    return [c for c in df.columns if c.startswith("norm/")]


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


# jaxnorm.norms.evaluate: R_A from the certified upper spectral norms, the largest certified relative
# gap spec_upper / spec - 1 over the operators, and the number of readings that stopped at max_iters.
NORM_BOUND_COLUMNS = ("spectral_complexity_upper", "norm_max_gap", "norm_unconverged")


def columns(norm_layers: Sequence[str], zoo: bool = True) -> list[str]:
    """The columns of a results file: :data:`BASE_COLUMNS`, :data:`NORM_BOUND_COLUMNS`, ``zoo/<name>``
    for each norm of :data:`jaxnorm.norms.ZOO` (when ``zoo``), then ``norm/<op>/{spec,spec_upper,l21}``
    per operator."""
    from jaxnorm.norms import ZOO  # noqa: PLC0415 -- the reader must not need JAX

    return (list(BASE_COLUMNS) + list(NORM_BOUND_COLUMNS) + [f"zoo/{z}" for z in (ZOO if zoo else ())]
            + [f"norm/{name}/{k}" for name in norm_layers for k in ("spec", "spec_upper", "l21")])


class Writer:
    """Append-only CSV with a fixed header; each batch of rows is one ``write`` + ``fsync``.

    Crash safety (with :mod:`jaxnorm.checkpoint`): a checkpoint records :meth:`size`; a resume
    :meth:`truncate`-s the file back to it, so rows written after the last checkpoint (and a torn
    last line) are dropped and written again by the resumed run.
    """

    def __init__(self, path: str | Path, cols: Sequence[str]):
        self.path, self.columns = Path(path), list(cols)
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._write(self._lines([dict(zip(self.columns, self.columns))]))

    def _lines(self, rows: Sequence[dict]) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        for row in rows:
            w.writerow([_fmt(row.get(c)) for c in self.columns])
        return buf.getvalue()

    def _write(self, text: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def append(self, rows: Sequence[dict]) -> None:
        if rows:
            self._write(self._lines(rows))

    def size(self) -> int:
        return self.path.stat().st_size

    def truncate(self, size: int) -> None:
        """Cuts the file to ``size`` bytes (0: rewrite the header only).

        Raises:
          ValueError: ``size`` exceeds the file's length (growing would pad it with NUL bytes).
        """
        have = self.size()
        if size > have:
            raise ValueError(f"{str(self.path)!r} holds {have} bytes, fewer than the {size} to keep; refusing to "
                             f"pad it (truncated or edited results file)")
        with open(self.path, "r+b") as f:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())
        if size == 0:
            self._write(self._lines([dict(zip(self.columns, self.columns))]))


def _fmt(v: Any):
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "True" if v else "False"
    if isinstance(v, (float, np.floating)):
        return repr(float(v))  # exact round trip
    return v


def save_margins(run_dir: str | Path, P: int, seed: int, epoch: int, margins: np.ndarray) -> None:
    """Writes :func:`load_margins`'s file atomically (tmp + rename)."""
    path = Path(run_dir) / MARGIN_DIR / f"P{P}_s{seed}_e{epoch}.npy"
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, np.asarray(margins, np.float32))
    os.replace(tmp, path)

"""Reading a sweep's results: one tidy row per (replica, evaluation point).

A run directory written by :func:`jaxnorm.engine.run` holds ``results.csv`` (append-only; a
row batch is one ``write`` + ``fsync``), ``config.json`` (the resolved
:class:`jaxnorm.config.SweepConfig`), ``versions.json``, ``summary.json`` (after the end) and
``margins/P{P}_s{seed}_e{epoch}.npy`` (raw test margins f_y - max_{j != y} f_j, float32
[n_test_eval]).

Columns: arch, dataset, size, P, seed, replica (stable id P*1000 + seed), epoch (0 =
initialization), step (optimizer steps taken), test_error, test_loss, train_error,
train_loss, spectral_complexity (paper Eq. 2), wall_time (seconds since the run started,
summed over resumes), diverged (True on the single row that flags a replica stopped for
non-finite loss or gradients; its metrics are NaN), lr, and per layer
``norm/<layer>/spec`` (||A_i||_sigma) and ``norm/<layer>/l21`` (||A_i^T - M_i^T||_{2,1}).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

RESULTS_FILE = "results.csv"
MARGIN_DIR = "margins"

_INT = ("P", "seed", "replica", "epoch", "step")


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
    path = Path(run_dir) / RESULTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {RESULTS_FILE} in {str(run_dir)!r}: not a run directory of jaxnorm.sweep")
    raw = path.read_bytes()
    cut = raw.rfind(b"\n")
    raw = raw[: cut + 1] if cut >= 0 else b""
    if not raw:
        return pd.DataFrame()
    df = pd.read_csv(io.BytesIO(raw))
    for c in _INT:
        if c in df:
            df[c] = df[c].astype(np.int64)
    if "diverged" in df:
        df["diverged"] = df["diverged"].astype(str).str.lower().eq("true")
    return df.sort_values(["P", "seed", "epoch", "diverged"], kind="stable").reset_index(drop=True)


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

"""Scaling-law analysis of learning curves against the spectral complexity norm.

Implements Sec. 3.2, Sec. 4 and Appendix D of D'Amico, Bocchi, Negri (2025) on the tidy results
table of ``jaxnorm.results.load`` (one row per replica and evaluation point), or on curves already
averaged over seeds on a lambda grid (constant seed, epoch = grid index; :func:`load_mean_curves`).

Two modes of :func:`analyze`:

* **the authors' procedure** (Appendix D and their notebook, ``Francill99/deep_norm``
  ``analysis/Main_analysis_notebook.ipynb``), on request:
  ``analyze(df, p_min=P, gamma1_window=(lo, hi), optimum="argmin")``: lambda_opt, eps_opt at the
  grid arg-min of each P's seed-mean curve; gamma1 = mean over P >= p_min of the least-squares
  log-log slopes of eps/eps_opt vs lambda/lambda_opt inside lo <= lambda/lambda_opt <= hi;
  sigma1 = sqrt(sum_i sigma_i^2 / n) (their code; it reproduces their stored sigma1 exactly);
  gamma2 = log-log line of lambda_opt vs P over P >= p_min with the slope's standard error.
* **automatic** (the default), no hand choices, validated by ``bench/bench_analysis.py``
  (BUILD.md, "Analysis"): a minimum that is not bracketed (the seed-mean curve does not rise
  significantly after it) is marked and never used as a minimum; lambda_opt, eps_opt of the
  bracketed P from one joint fit of their minima on the collapse (:func:`collapse_optima`; a
  parabola vertex per curve as fallback), not quantized to the evaluation grid; gamma1 from one
  pooled fit of Eq. 3 on an early window shared on the collapse (:func:`fit_gamma1_collapse`,
  per-curve windows as fallback; P without a bracketed minimum join with their own window),
  error from a delete-one-P jackknife plus the window systematic (the shift of gamma1 when only
  the first half of every window is fitted, less its noise; :func:`_window_systematic`) in
  quadrature; gamma2 and gamma_opt from log-space fits of Eq. 4 and
  Eq. 6 over the bracketed P, slope errors from the scatter across P; when some P >= p_min are
  not bracketed, their minima are censored observations (lambda_opt >= a bound, eps_opt <= the
  lowest error) and gamma2, gamma_opt come from a censored (Tobit) maximum-likelihood fit
  (:func:`fit_censored_power_law`; >= 2 bracketed P, otherwise "not determined" with the
  reason and the bounds), the bracketed-only fit and the paper's end-of-training convention
  beside them; q terms only when a nested-model F test at level ``Q_ALPHA`` asks for them and
  q > 0, their model uncertainty carried into sigma by model averaging; a floor q1 that Eq. 3's
  own rule leaves out is weighed again on the joint evidence of Eq. 3's windows and the
  eps_opt(P) points (Eq. 6 shares q1; ``Q1_JOINT_KEEP``, ``Q1_JOINT_AVERAGE``); sigmas from few
  degrees of freedom are Student-t scaled so that +-sigma is a 68 % interval.

Every exponent is one typed object, :class:`Exponent` (value, sigma, method, n, ...), serialized
as ``{"value": ..., "sigma": ..., ...}``. Exponents are positive: eps ~ lambda^-gamma1,
lambda_opt ~ P^gamma2, eps ~ P^-gamma (the paper's gamma_tot = -gamma1 gamma2 of Eq. 6).
:func:`predict` turns a summary into eps_opt and lambda_opt at an unseen P.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import warnings
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
import pandas as pd
from scipy import optimize, stats

REQUIRED_COLUMNS = ("P", "seed", "epoch", "test_error", "spectral_complexity")
# Level of the nested-model F test that keeps a q term (Eqs. 3, 4, 6). Calibrated in
# tests/test_analysis.py::test_q_rule_false_positive_rate: on 200 pure power laws with 2 % noise
# a q is kept in <= 5 % of them (measured: 2 of 200).
Q_ALPHA = 0.01
# Smallest number of values of P for gamma2 / gamma_opt: a line through 2 points has no error.
MIN_P_FIT = 3


class AnalysisWarning(UserWarning):
    """A problem in the data that the analysis worked around (also recorded in the summary)."""


# ----------------------------------------------------------------------------------------------
# The one result type
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Exponent:
    """One fitted exponent (gamma1, gamma2, gamma_pred, gamma_opt, gamma_end, gamma_meas).

    Attributes:
      value: the exponent (positive convention, see the module docstring); None if not determined.
      sigma: its one-sigma error; None if not determined.
      method: how it was obtained (one sentence).
      n: number of points that entered the fit (values of P, or curve points for gamma1).
      determined: False when the data cannot give it; ``reason`` then says why.
      reason: why it is not determined (or a caveat).
      k, q, sigma_q: prefactor and additive constant of the power law y = k x^(+-value) + q.
      q_kept: whether q is in the model (nested-model F test at level Q_ALPHA).
      q_test: {F, p, alpha} of that test (None if not run).
      chi2_red: residual variance of the log fit per degree of freedom (ln units^2) or, for
        weighted fits, the reduced chi^2.
      cov: covariance of the fit parameters [ln k, slope(, q)] (slope = d ln y / d ln x).
      resid_sd: rms residual of ln y (the scatter of one point about the law).
      x_range: [min x, max x] of the fit.
      detail: everything else (per-P fits, alternative sigmas, ...).
    """

    value: float | None
    sigma: float | None
    method: str
    n: int = 0
    determined: bool = True
    reason: str | None = None
    k: float | None = None
    q: float = 0.0
    sigma_q: float = 0.0
    q_kept: bool = False
    q_test: dict | None = None
    chi2_red: float | None = None
    cov: list | None = None
    resid_sd: float | None = None
    x_range: list | None = None
    detail: dict | None = None

    @classmethod
    def undetermined(cls, method: str, reason: str, n: int = 0) -> "Exponent":
        return cls(value=None, sigma=None, method=method, n=n, determined=False, reason=reason)

    def to_dict(self) -> dict:
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "Exponent":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _exp_dict(e) -> dict:
    """An Exponent or its serialized dict, as a dict (for tables and plots)."""
    if e is None:
        return {}
    return e.to_dict() if isinstance(e, Exponent) else dict(e)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def _check_csv(path: str, required: Sequence[str] = ()) -> None:
    """Raises ValueError naming ``path`` and the line of the first row that does not parse.

    A row parses when it has the header's number of fields and its ``required`` fields are numbers
    (or nan/empty, which :func:`clean` treats as a diverged replica). A torn last line without its
    newline (a crash mid-write) is tolerated, as ``jaxnorm.results.load`` ignores it.
    """
    with open(path, newline="") as fh:
        text = fh.read()
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    elif lines:
        lines = lines[:-1]  # torn last line: no newline, ignored by the reader
    if not lines:
        return
    rows = list(csv.reader(lines))
    header = rows[0]
    idx = [header.index(c) for c in required if c in header]
    for lineno, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}, line {lineno}: {len(row)} fields, the header has "
                             f"{len(header)}; the table does not parse (truncated or corrupt row)")
        for j in idx:
            v = row[j].strip()
            if v.lower() in ("", "nan"):
                continue
            try:
                float(v)
            except ValueError:
                raise ValueError(f"{path}, line {lineno}: column {header[j]!r} holds {v!r}, "
                                 "not a number") from None


def load_run(run_dir: str) -> pd.DataFrame:
    """Loads the results table of a run directory.

    Checks that every row of ``results.csv`` parses (:func:`_check_csv`), then reads it with
    ``jaxnorm.results.load``.

    Args:
      run_dir: a sweep run directory.

    Returns:
      The tidy results DataFrame (one row per replica and evaluation point).

    Raises:
      ValueError: the directory does not exist, holds no results, or a row does not parse
        (the message names the file and the line).
    """
    from jaxnorm import results as _results  # noqa: PLC0415  (CLI-level reader)

    if not os.path.isdir(run_dir):
        raise ValueError(f"run directory {run_dir!r} does not exist")
    path = os.path.join(run_dir, _results.RESULTS_FILE)
    if not os.path.exists(path):
        raise ValueError(f"run directory {run_dir!r} holds no results table (expected results.csv)")
    _check_csv(path, ("P", "seed", "epoch", "test_error", "spectral_complexity"))
    try:
        df = _results.load(run_dir)
    except (ValueError, pd.errors.ParserError) as e:
        raise ValueError(f"{path}: {e}") from None
    if df is None or len(df) == 0:
        raise ValueError(f"run directory {run_dir!r} has an empty results table")
    return df


def load_mean_curves(path: str) -> pd.DataFrame:
    """Reads seed-mean curves on a lambda grid (the authors' aggregated format) as a results frame.

    The CSV has columns ``P, spectral_complexity`` and ``mean_test_error`` (or ``test_error``).
    Each row becomes (P, seed=0, epoch=grid index, spectral_complexity, test_error): the grid index
    is the 1-based rank of lambda in the union of all P's grid values, so the rows of one P keep their
    order. Missing grid points (outside a seed's range) are simply absent.

    Raises:
      ValueError: the file is missing, a row does not parse (file and line named), or a column
        is missing.
    """
    if not os.path.exists(path):
        raise ValueError(f"no such table: {path!r}")
    _check_csv(path, ("P", "spectral_complexity", "mean_test_error", "test_error"))
    raw = pd.read_csv(path)
    err = "mean_test_error" if "mean_test_error" in raw.columns else "test_error"
    missing = [c for c in ("P", "spectral_complexity", err) if c not in raw.columns]
    if missing:
        raise ValueError(f"{path}: lacks columns {missing}; needs P, spectral_complexity, "
                         "mean_test_error")
    raw = raw.dropna(subset=["spectral_complexity", err])
    grid = np.unique(np.round(np.log(raw["spectral_complexity"].to_numpy(float)), 9))
    # 1-based: epoch 0 means the initialization in jaxnorm's results (the lazy-start rule keys on it), and these
    # curves do not hold it (the authors log from epoch 1).
    epoch = 1 + np.searchsorted(grid, np.round(np.log(raw["spectral_complexity"].to_numpy(float)), 9))
    return pd.DataFrame({"P": raw["P"].astype(int).to_numpy(), "seed": 0, "epoch": epoch,
                         "spectral_complexity": raw["spectral_complexity"].to_numpy(float),
                         "test_error": raw[err].to_numpy(float)})


def load_margins(run_dir: str) -> pd.DataFrame:
    """Lists the saved test-margin arrays ``margins/P{P}_s{seed}_e{epoch}.npy`` of a run.

    Returns:
      DataFrame with columns P, seed, epoch, path (sorted); empty when there are none.
    """
    mdir = os.path.join(run_dir, "margins")
    rows = []
    if os.path.isdir(mdir):
        for name in sorted(os.listdir(mdir)):
            if not (name.startswith("P") and name.endswith(".npy")):
                continue
            try:
                p, s, e = name[:-4].split("_")
                rows.append(dict(P=int(p[1:]), seed=int(s[1:]), epoch=int(e[1:]),
                                 path=os.path.join(mdir, name)))
            except ValueError:
                continue
    out = pd.DataFrame(rows, columns=["P", "seed", "epoch", "path"])
    return out.sort_values(["P", "seed", "epoch"]).reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# Synthetic learning curves from known laws
# ----------------------------------------------------------------------------------------------

def phi_synthetic(x: np.ndarray, gamma1: float, beta: float) -> np.ndarray:
    """Scaling function Phi(x) of the synthetic curves (Eq. 5), normalized so Phi(1) = 1 = min.

    Phi(x) = (x^-gamma1 + (gamma1/beta) x^beta) / (1 + gamma1/beta): a pure power law
    x^-gamma1 for x << 1 (the early phase of Eq. 3) and an overfitting branch x^beta for x >> 1.
    """
    x = np.asarray(x, dtype=float)
    r = gamma1 / beta
    return (x ** (-gamma1) + r * x ** beta) / (1.0 + r)


def synthetic_curves(P_values: Sequence[int] = (1000, 2000, 4000, 8000, 16000, 32000),
                     seeds: Sequence[int] = (0, 1, 2, 3), *, gamma1: float = 0.5,
                     gamma2: float = 1.0, k2: float = 1.0, q2: float = 0.0, q1: float = 0.0,
                     lambda0: float = 10.0, eps0: float = 0.9, beta: float = 1.0,
                     end_ratio: float = 4.0, n_epochs: int = 120, noise: float = 0.02,
                     seed_jitter: float = 0.0, arch: str = "cnn", dataset: str = "mnist",
                     rng: int = 0) -> pd.DataFrame:
    """Learning curves from known scaling laws, in the results-table format.

    eps(lambda; P) = eps_opt(P) Phi(lambda / lambda_opt(P)) + q1 with Phi from
    :func:`phi_synthetic`, lambda_opt(P) = k2 P^gamma2 + q2 (Eq. 4) and
    eps_opt(P) = k1 lambda_opt^-gamma1 (1 + gamma1/beta), so that every P shares the early branch
    k1 lambda^-gamma1 (Eq. 3, k1 = eps0 lambda0^gamma1) and the late branch depends on P.
    lambda(t) grows monotonically, log-linearly in the epoch, from lambda0 to
    end_ratio * lambda_opt(P); hence eps at the end of training ~ P^-(gamma1 gamma2) (Eq. 6).

    Args:
      P_values: dataset sizes.
      seeds: seed labels; one replica per (P, seed).
      gamma1, gamma2, k2, q2, q1: the laws of Eqs. 3-4.
      lambda0: spectral complexity at epoch 0 (the same for every P).
      eps0: test error at lambda0 on the early branch.
      beta: exponent of the overfitting branch of Phi.
      end_ratio: lambda at the last epoch over lambda_opt(P) (< 1: the minimum is never reached).
      n_epochs: evaluations at epochs 1..n_epochs.
      noise: multiplicative log-normal noise on each test error.
      seed_jitter: log-normal seed-to-seed jitter of lambda_opt and eps_opt.
      arch, dataset: labels.
      rng: numpy seed.

    Returns:
      DataFrame with the columns of ``jaxnorm.results.load`` (arch, dataset, P, seed, replica,
      epoch, step, test_error, test_loss, train_error, train_loss, spectral_complexity,
      wall_time, diverged, norm/dense_0/spec, norm/dense_0/l21), n_P * n_seeds * n_epochs rows.
    """
    gen = np.random.default_rng(rng)
    k1 = eps0 * lambda0 ** gamma1
    epochs = np.arange(1, n_epochs + 1)
    frames = []
    replica = 0
    for P in P_values:
        lam_opt_P = k2 * float(P) ** gamma2 + q2
        for s in seeds:
            jit = np.exp(seed_jitter * gen.standard_normal(2)) if seed_jitter else np.ones(2)
            lam_opt = lam_opt_P * jit[0]
            eps_opt = k1 * lam_opt ** (-gamma1) * (1.0 + gamma1 / beta) * jit[1]
            lam_end = end_ratio * lam_opt
            lam = lambda0 * (lam_end / lambda0) ** (epochs / n_epochs)
            eps = eps_opt * phi_synthetic(lam / lam_opt, gamma1, beta) + q1
            eps = np.minimum(eps * np.exp(noise * gen.standard_normal(n_epochs)), 1.0)
            train_err = np.clip(eps0 * (lam / lambda0) ** -1.0 - 0.01, 0.0, 1.0)
            frames.append(pd.DataFrame({
                "arch": arch, "dataset": dataset, "P": int(P), "seed": int(s),
                "replica": replica, "epoch": epochs, "step": epochs * max(1, int(P) // 64),
                "test_error": eps, "test_loss": -np.log1p(-0.999 * eps),
                "train_error": train_err, "train_loss": -np.log1p(-0.999 * train_err),
                "spectral_complexity": lam, "wall_time": 0.05 * epochs, "diverged": False,
                "norm/dense_0/spec": np.sqrt(lam), "norm/dense_0/l21": 2.0 * np.sqrt(lam),
            }))
            replica += 1
    return pd.concat(frames, ignore_index=True)


def synthetic_margins(stage: float, n: int = 2000, rng: int = 0) -> np.ndarray:
    """Toy margins normalized by lambda at training fraction ``stage`` in [0, 1] (Fig. 6 demos).

    Gaussian with mean 0.5 - 0.3 stage and sd 0.4 (1 - 0.8 stage): as in Fig. 6 (right) the mean
    normalized margin decreases during training while the low tail (minimum) rises. Shape [n].
    """
    gen = np.random.default_rng(rng)
    s = float(np.clip(stage, 0.0, 1.0))
    return (0.5 - 0.3 * s + 0.4 * (1.0 - 0.8 * s) * gen.standard_normal(n)).astype(np.float32)


def write_synthetic_run(run_dir: str, df: pd.DataFrame | None = None,
                        margin_epochs: Sequence[int] = (), **kw) -> pd.DataFrame:
    """Writes a run directory in the ``jaxnorm.results`` format (results.csv, config.json and
    margins/P{P}_s{seed}_e{epoch}.npy at ``margin_epochs``) from synthetic curves.

    Args:
      run_dir: directory to create.
      df: a results DataFrame (default: ``synthetic_curves(**kw)``).
      margin_epochs: epochs at which to save toy margins for every (P, seed).

    Returns:
      The DataFrame written.
    """
    df = synthetic_curves(**kw) if df is None else df
    os.makedirs(os.path.join(run_dir, "margins"), exist_ok=True)
    df.to_csv(os.path.join(run_dir, "results.csv"), index=False)
    with open(os.path.join(run_dir, "config.json"), "w") as fh:
        json.dump({"synthetic": True, "P": sorted(int(p) for p in df["P"].unique()),
                   "seeds": sorted(int(s) for s in df["seed"].unique())}, fh)
    for (P, seed), g in df.groupby(["P", "seed"]):
        g = g.set_index("epoch")
        last = int(g.index.max())
        for e in margin_epochs:
            if e in g.index:
                lam = float(g.loc[e, "spectral_complexity"])  # raw margins = lambda x normalized
                np.save(os.path.join(run_dir, "margins", f"P{int(P)}_s{int(seed)}_e{int(e)}.npy"),
                        lam * synthetic_margins(e / last, rng=int(P) + int(seed) + int(e)))
    return df


def eq6(P: np.ndarray, k1: float, gamma1: float, q1: float, k2: float, gamma2: float,
        q2: float) -> np.ndarray:
    """eps(P) = k1 (k2 P^gamma2 + q2)^-gamma1 + q1 (paper Eq. 6, Eq. 4 plugged into Eq. 3)."""
    P = np.asarray(P, dtype=float)
    return k1 * (k2 * P ** gamma2 + q2) ** (-gamma1) + q1


def thresholds(k1: float, gamma1: float, q1: float, k2: float, gamma2: float,
               q2: float) -> dict:
    """The thresholds of Sec. 4 between the three regimes of Eq. 6.

    P_- = (q2/k2)^(1/gamma2): below it lambda_opt ~ q2 and eps sits at the low-P plateau;
    P_+ = (k1 k2^-gamma1 / q1)^(1/(gamma1 gamma2)): above it the power law k1 k2^-gamma1
    P^-gamma1 gamma2 falls below q1 and eps saturates. A threshold whose q is not positive
    does not exist (None).

    Returns:
      dict with P_minus, P_plus (float or None) and the low-P plateau k1 q2^-gamma1 + q1.
    """
    p_minus = (q2 / k2) ** (1.0 / gamma2) if (q2 is not None and q2 > 0 and k2 > 0) else None
    p_plus = ((k1 * k2 ** (-gamma1) / q1) ** (1.0 / (gamma1 * gamma2))
              if (q1 is not None and q1 > 0 and k1 > 0 and k2 > 0) else None)
    plateau = k1 * q2 ** (-gamma1) + (q1 or 0.0) if (q2 is not None and q2 > 0) else None
    return {"P_minus": _f(p_minus), "P_plus": _f(p_plus), "low_P_plateau": _f(plateau)}


# ----------------------------------------------------------------------------------------------
# Power-law fits
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """Least-squares fit of y = k x^a + q in log space (each decade weighs the same).

    Attributes:
      k, a, q: parameters (q = 0 when the q term was not kept).
      sigma_k, sigma_a, sigma_q: one-sigma errors from the Jacobian covariance scaled by the
        residual variance (``curve_fit`` with absolute_sigma=False).
      q_kept: whether the model includes q.
      q_test: {F, p, alpha, q, sigma_q} of the nested-model F test (None if not run).
      n_points: points in the fit; x_range: [min x, max x].
      chi2_red: residual variance of ln y per degree of freedom.
      cov: covariance of [ln k, a(, q)]; resid_sd: sqrt(chi2_red).
    """

    k: float
    a: float
    q: float
    sigma_k: float
    sigma_a: float
    sigma_q: float
    q_kept: bool
    q_test: dict | None
    n_points: int
    x_range: tuple
    chi2_red: float
    cov: list
    resid_sd: float

    def __call__(self, x):
        return self.k * np.asarray(x, dtype=float) ** self.a + self.q

    def to_dict(self) -> dict:
        return _jsonable(dataclasses.asdict(self))


def _fit_log(lx, ly, with_q, p0=None):
    """ln y = ln(exp(c + a lx) (+ q)) by least squares; returns (params, cov, sse, ok)."""
    n = lx.size
    if not with_q:
        X = np.column_stack([np.ones(n), lx])
        p, *_ = np.linalg.lstsq(X, ly, rcond=None)
        r = ly - X @ p
        sse = float(r @ r)
        dof = n - 2
        cov = np.linalg.inv(X.T @ X) * (sse / dof if dof > 0 else np.nan)
        return p, cov, sse, True

    def resid(p):
        m = np.exp(p[0] + p[1] * lx) + p[2]
        return np.log(np.maximum(m, 1e-300)) - ly

    res = optimize.least_squares(resid, np.asarray(p0, float), x_scale="jac", max_nfev=4000)
    m = np.exp(res.x[0] + res.x[1] * lx) + res.x[2]
    ok = bool(res.success and np.all(m > 0))
    sse = float(np.sum(res.fun ** 2))
    dof = n - 3
    try:
        cov = np.linalg.inv(res.jac.T @ res.jac) * (sse / dof if dof > 0 else np.nan)
    except np.linalg.LinAlgError:
        cov, ok = np.full((3, 3), np.nan), False
    return res.x, cov, sse, ok


def fit_power_law(x, y, *, with_q: bool | str = "auto", alpha: float = Q_ALPHA,
                  min_points_q: int = 7) -> PowerLawFit:
    """Fits y = k x^a + q by least squares on ln y.

    The q term is kept by a nested-model F test: F = (SSE_0 - SSE_q) / (SSE_q / (n - 3)) against
    F(1, n - 3) at level ``alpha``, and only if q > 0 (a floor); it needs ``min_points_q`` points. Errors are the Jacobian covariance scaled by the residual variance, i.e. they
    come from the scatter about the law, whatever its source.

    Args:
      x, y: positive data, shape [n] (non-positive or non-finite points are dropped).
      with_q: True, False, or "auto" (the F test).
      alpha: level of the F test (calibrated: see ``Q_ALPHA``).
      min_points_q: fewest points with which "auto" considers a q term (7: 4 residual degrees
        of freedom; with 6 values of P a spurious q, kept in a few % of pure power laws that
        carry some curvature, swung gamma_meas by ~3 sigma in the study).

    Returns:
      :class:`PowerLawFit`.

    Raises:
      ValueError: fewer than 2 distinct positive points, or a bad ``with_q``.
    """
    if with_q not in (True, False, "auto"):
        raise ValueError(f"with_q must be True, False or 'auto', got {with_q!r}")
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    x, y = x[ok], y[ok]
    if x.size < 2 or np.unique(x).size < 2:
        raise ValueError(f"a power-law fit needs at least 2 distinct positive points, got {x.size}")
    lx, ly = np.log(x), np.log(y)
    p0, cov0, sse0, _ = _fit_log(lx, ly, False)
    use_q, q_test = False, None
    if with_q is True and x.size < 4:
        raise ValueError(f"a power-law fit with q needs at least 4 points, got {x.size}")
    if with_q is True or (with_q == "auto" and x.size >= min_points_q):
        pq, covq, sseq, okq = _fit_log(lx, ly, True, [p0[0], p0[1], 0.0])
        dof = x.size - 3
        F = (sse0 - sseq) / (sseq / dof) if sseq > 0 else (np.inf if sse0 > 1e-24 else 0.0)
        pval = float(stats.f.sf(F, 1, dof)) if np.isfinite(F) else 0.0
        sq = float(np.sqrt(covq[2, 2])) if np.isfinite(covq[2, 2]) and covq[2, 2] >= 0 else None
        q_test = {"F": _f(F), "p": pval, "alpha": alpha, "q": float(pq[2]), "sigma_q": sq}
        # q is a floor (Eq. 3's q1: the error that more norm cannot remove; Eq. 4's q2 > 0 gives
        # P_-): a negative q is curvature of another kind, not a q term.
        use_q = with_q is True or bool(okq and pval < alpha and pq[2] > 0)
    if use_q:
        p, cov, sse = pq, covq, sseq
    else:
        p, cov, sse = p0, cov0, sse0
    dof = x.size - p.size
    chi2 = sse / dof if dof > 0 else float("nan")
    err = np.sqrt(np.clip(np.diag(cov), 0, None)) if np.all(np.isfinite(np.diag(cov))) \
        else np.full(p.size, np.nan)
    k = float(np.exp(p[0]))
    return PowerLawFit(k=k, a=float(p[1]), q=float(p[2]) if use_q else 0.0,
                       sigma_k=float(k * err[0]), sigma_a=float(err[1]),
                       sigma_q=float(err[2]) if use_q else 0.0, q_kept=bool(use_q), q_test=q_test,
                       n_points=int(x.size), x_range=(float(x.min()), float(x.max())),
                       chi2_red=float(chi2), cov=cov.tolist(), resid_sd=float(math.sqrt(chi2))
                       if np.isfinite(chi2) else float("nan"))


def _t68(dof: int) -> float:
    """Student-t quantile at the Gaussian 1-sigma level: +-t sigma is a 68 % interval."""
    return float(stats.t.ppf(stats.norm.cdf(1.0), max(int(dof), 1)))


def _q_weight(n: int, sse0: float, sseq: float) -> float | None:
    """Weight of the power law with q against the one without, from their residual sums of
    squares: exp(-IC/2) normalized, with IC the harsher of the small-sample AICc (Hurvich &
    Tsai 1989) and BIC (the extra parameter costs 10 at n = 6, 2.1 AICc / 4.1 BIC at n = 60);
    None when AICc is undefined."""
    if n - 4 <= 0 or not (sse0 > 0 and sseq > 0):
        return None
    pen = max(2 + 24 / (n - 4) - 12 / (n - 3), math.log(n))
    d = n * math.log(sseq / sse0) + pen
    return float(1.0 / (1.0 + math.exp(min(d / 2.0, 700.0))))


def _averaged_sigma(sel: tuple, alt: tuple, w_alt: float) -> float:
    """sigma of the selected model's estimate with the q-term model uncertainty carried in:
    total variance = weighted within-model variance + the weighted squared distance of each
    model's estimate from the reported one (sel, alt: (estimate, sigma))."""
    return math.sqrt((1 - w_alt) * sel[1] ** 2 + w_alt * (alt[1] ** 2 + (alt[0] - sel[0]) ** 2))


def fit_exponent(x, y, *, sign: int, method: str, with_q: bool | str = "auto",
                 alpha: float = Q_ALPHA, detail: dict | None = None,
                 average_q: bool = False) -> Exponent:
    """A power-law fit y = k x^(sign * gamma) + q as an :class:`Exponent` (value = gamma).

    Args:
      x, y: shape [n].
      sign: +1 for growing laws (lambda_opt ~ P^gamma2), -1 for decaying ones (eps ~ P^-gamma).
      method: description stored in the result.
      with_q, alpha: see :func:`fit_power_law`.
      detail: extra fields.
      average_q: carry the q-term model uncertainty into sigma (the value stays the one of the
        model the F test chose): sigma^2 = sum over {without q, with q > 0} of the weight
        (:func:`_q_weight`: the harsher of AICc and BIC) times (sigma_m^2 + (gamma_m - gamma)^2), each sigma_m Student-t scaled to a 68 %
        interval (``detail.model_average``). Needs >= 5 points.

    Returns:
      The Exponent; not determined (with the reason) when the fit is impossible.
    """
    try:
        f = fit_power_law(x, y, with_q=with_q, alpha=alpha)
    except ValueError as e:
        return Exponent.undetermined(method, str(e), n=int(np.size(x)))
    detail = dict(detail or {})
    if f.q_kept:  # the pure power law beside it: what a fit without q (the paper's) gives
        f0 = fit_power_law(x, y, with_q=False)
        detail["without_q"] = {"value": sign * f0.a, "sigma": f0.sigma_a, "k": f0.k}
    sigma = f.sigma_a
    if average_q and f.n_points >= 5 and with_q == "auto":
        f0 = fit_power_law(x, y, with_q=False)
        try:
            fq = fit_power_law(x, y, with_q=True)
        except ValueError:
            fq = None
        n = f.n_points
        wq = (_q_weight(n, f0.chi2_red * (n - 2), fq.chi2_red * (n - 3))
              if fq is not None and fq.q > 0 and np.isfinite(fq.sigma_a) else None)
        m0, mq = (f0.a, f0.sigma_a * _t68(n - 2)), ((fq.a, fq.sigma_a * _t68(n - 3))
                                                    if fq is not None else None)
        if wq is None:
            sigma = m0[1] if not f.q_kept else f.sigma_a * _t68(n - 3)
        else:
            sel, alt, w_alt = (mq, m0, 1 - wq) if f.q_kept else (m0, mq, wq)
            sigma = _averaged_sigma(sel, alt, w_alt)
        detail["t_factor"] = _t68(n - (3 if f.q_kept else 2))
        detail["sigma_unscaled"] = f.sigma_a
        detail["model_average"] = {"w_q": wq, "without_q": [sign * m0[0], m0[1]],
                                   "with_q": [sign * mq[0], mq[1]] if mq else None}
    return Exponent(value=sign * f.a, sigma=sigma, method=method, n=f.n_points, k=f.k,
                    q=f.q, sigma_q=f.sigma_q, q_kept=f.q_kept, q_test=f.q_test,
                    chi2_red=f.chi2_red, cov=f.cov, resid_sd=f.resid_sd,
                    x_range=list(f.x_range), detail=detail or None)


def product_exponent(a: Exponent, b: Exponent, method: str) -> Exponent:
    """gamma_pred = gamma1 gamma2 with sigma_pred = |gamma_pred| sqrt((s1/g1)^2 + (s2/g2)^2)
    (Appendix D; the two fits use disjoint data, so their errors are independent)."""
    if not (a.determined and b.determined):
        why = "; ".join(f"{n}: {e.reason}" for n, e in (("gamma1", a), ("gamma2", b))
                        if not e.determined)
        return Exponent.undetermined(method, why)
    v = a.value * b.value
    s = abs(v) * math.sqrt((a.sigma / a.value) ** 2 + (b.sigma / b.value) ** 2) \
        if a.value and b.value else float("nan")
    return Exponent(value=v, sigma=s, method=method, n=min(a.n, b.n))


# ----------------------------------------------------------------------------------------------
# Input validation, curves and optima
# ----------------------------------------------------------------------------------------------

def clean(df: pd.DataFrame, log: list | None = None) -> pd.DataFrame:
    """Validates a results table and removes diverged replicas.

    A replica (P, seed) that has a row flagged ``diverged`` or a non-finite test error or
    spectral complexity leaves the analysis entirely (all its rows, initialization included),
    with a warning naming it: a replica that blew up is not a learning curve. Rows with a zero
    test error (perfect, but not on a log axis) are dropped alone, also with a warning.

    Args:
      df: results DataFrame (columns P, seed, epoch, test_error, spectral_complexity; per-seed
        curves, or seed-mean curves on a lambda grid with a constant seed and epoch = grid index).
      log: list that receives a message per problem found (also issued as AnalysisWarning).

    Returns:
      The usable rows, sorted by (P, seed, epoch).

    Raises:
      ValueError: not a DataFrame, missing columns, empty, duplicated (P, seed, epoch) rows
        (named), or no usable replica.
    """
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"results table lacks columns {missing}; required: {list(REQUIRED_COLUMNS)}")
    if len(df) == 0:
        raise ValueError("results table is empty")
    out = df.copy()
    key = ["P", "seed", "epoch"]
    dup = out.duplicated(key, keep=False)
    if dup.any():
        rows = sorted({tuple(_epoch_value(v) for v in r) for r in out.loc[dup, key].itertuples(index=False)})
        more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
        raise ValueError(f"duplicated (P, seed, epoch) rows: {rows[:10]}{more}; each replica may "
                         "report an evaluation epoch once (concatenated runs of the same replica?)")
    eps = pd.to_numeric(out["test_error"], errors="coerce").astype(float)
    lam = pd.to_numeric(out["spectral_complexity"], errors="coerce").astype(float)
    out["test_error"], out["spectral_complexity"] = eps, lam
    broken = ~(np.isfinite(eps) & np.isfinite(lam))
    if "diverged" in out.columns:
        broken |= out["diverged"].fillna(False).astype(bool)
    if broken.any():
        reps = sorted({(int(p), int(s_)) for p, s_ in out.loc[broken, ["P", "seed"]].itertuples(index=False)})
        drop = pd.MultiIndex.from_frame(out[["P", "seed"]]).isin(reps)
        _note(log, f"diverged replicas (P, seed) = {reps} left the analysis: {int(drop.sum())} rows "
                   "dropped (a diverged flag or a non-finite test error / spectral complexity)")
        out = out.loc[~drop]
    nonpos = (out["test_error"] <= 0) | (out["spectral_complexity"] <= 0)
    if nonpos.any():
        reps = sorted({(int(p), int(s_)) for p, s_ in out.loc[nonpos, ["P", "seed"]].itertuples(index=False)})
        _note(log, f"dropped {int(nonpos.sum())} rows with a zero test error or spectral complexity "
                   f"(no logarithm) in (P, seed) = {reps}")
        out = out.loc[~nonpos]
    if len(out) == 0:
        raise ValueError("no usable rows: every replica diverged or has a NaN test error / norm")
    return out.sort_values(key).reset_index(drop=True)


def _epoch_value(v) -> int | float:
    """An epoch as a plain number: int on an epoch boundary, float between (``eval_schedule="log_steps"``)."""
    v = float(v)
    return int(v) if v.is_integer() else v


def _note(log, msg):
    warnings.warn(msg, AnalysisWarning, stacklevel=3)
    if log is not None:
        log.append(msg)


def mean_curves(df: pd.DataFrame) -> dict:
    """Seed-averaged learning curve of every P, aligned on the evaluation epoch (or grid index).

    lambda is averaged geometrically (it spans decades), eps arithmetically.

    Returns:
      {P: DataFrame(epoch, lam, eps, eps_sem, n)} sorted by epoch.
    """
    out = {}
    for P, g in df.groupby("P", sort=True):
        agg = g.assign(loglam=np.log(g["spectral_complexity"].astype(float))).groupby("epoch").agg(
            loglam=("loglam", "mean"), eps=("test_error", "mean"),
            eps_std=("test_error", "std"), n=("test_error", "size"))
        agg = agg.reset_index()
        out[int(P)] = pd.DataFrame({
            "epoch": agg["epoch"].to_numpy(), "lam": np.exp(agg["loglam"].to_numpy()),
            "eps": agg["eps"].to_numpy(), "eps_sem": (agg["eps_std"] / np.sqrt(agg["n"])).to_numpy(),
            "n": agg["n"].to_numpy()})
    return out


def _noise_log(v: np.ndarray) -> float:
    """Robust per-point noise of a smooth series: MAD of second differences / sqrt(6)."""
    if v.size < 5:
        return float("nan")
    d2 = v[2:] - 2 * v[1:-1] + v[:-2]
    return float(1.4826 * np.median(np.abs(d2 - np.median(d2))) / math.sqrt(6.0))


def _depth_window(v: np.ndarray, i: int, depth: float, min_side: int) -> tuple[int, int]:
    """[a, b]: the contiguous points around index i with v <= v[i] + depth, at least
    ``min_side`` points on each side (as far as the series allows)."""
    a = i
    while a > 0 and v[a - 1] <= v[i] + depth:
        a -= 1
    b = i
    while b < v.size - 1 and v[b + 1] <= v[i] + depth:
        b += 1
    return max(min(a, i - min_side), 0), min(max(b, i + min_side), v.size - 1)


def curve_optimum(lam: np.ndarray, eps: np.ndarray, method: str = "vertex", epoch=None) -> dict:
    """Minimum (lambda_opt, eps_opt) of one learning curve eps(lambda), with its uncertainty.

    ``method="argmin"``: the evaluation point of lowest error (the authors' choice; quantized to
    the evaluation grid, sigma(ln lambda_opt) = grid step / sqrt(12)).
    ``method="vertex"``: the vertex of a least-squares parabola in (ln lambda, ln eps) on the
    contiguous points around the arg-min whose ln eps lies within max(3 noise, 0.03) of the
    minimum (at least one neighbour on each side; the depth doubles, up to 4 times, until the
    curvature is significant at 2 sigma). The window is defined by a depth in ln eps,
    which the rescaling of Eq. 5 leaves unchanged, so an asymmetry bias of the vertex is the
    same factor at every P and cancels in gamma2. sigma(ln lambda_opt) is the delta-method error
    of the vertex (point noise = max(residual, curve noise)); with only 3 points in the window
    the grid term step/sqrt(12) is added in quadrature (the interpolation cannot be checked).

    The minimum is **bracketed** when it is not the last point, the curve's last (up to 3)
    points after it lie on average more than max(3 noise, 0.01) above it, and (vertex) the
    parabola is convex at 2 sigma with its vertex inside the window. An unbracketed minimum is
    a lower bound of lambda_opt (training stopped while eps was falling or flat): callers must
    not use it as a minimum. With ``epoch``, the points that bracket it must also come *later in
    training*: Eq. 4 reads eps(lambda) as a curve traced by a growing norm, and where lambda(t)
    turns back (R_A of a BatchNorm ResNet shrinks after interpolation) the points beyond the
    minimum in lambda can be earlier ones, so a fold of the curve would pass for overfitting
    (``folds`` True; not bracketed). A curve that overfits in time while lambda shrinks is left
    unbracketed too (conservative: a folded eps(lambda) has no minimum in lambda for Eq. 4).

    Args:
      lam, eps: one curve, shape [T] (sorted by lambda here).
      method: "vertex" or "argmin".
      epoch: [T] evaluation epochs of the points (optional; enables the time-order check).

    Returns:
      dict lambda_opt, eps_opt, sigma_ln_lambda_opt, sigma_ln_eps_opt, bracketed, method (the
      one actually used: "vertex", or "argmin" as the vertex's fallback), index (arg-min in the
      sorted curve), lambda_argmin, eps_argmin, grid_step (ln lambda), noise (ln eps per point),
      n_window.
    """
    if method not in ("vertex", "argmin"):
        raise ValueError(f"optimum must be 'vertex' or 'argmin', got {method!r}")
    lam = np.asarray(lam, float)
    eps = np.asarray(eps, float)
    o = np.argsort(lam, kind="stable")
    u, v = np.log(lam[o]), np.log(eps[o])
    T = u.size
    i = int(np.argmin(v))
    noise = _noise_log(v)
    noise = noise if np.isfinite(noise) else 0.0
    lo_, hi_ = max(i - 1, 0), min(i + 1, T - 1)
    h = float(np.mean(np.diff(u[lo_:hi_ + 1]))) if hi_ > lo_ else float("nan")
    tail = v[i + 1:][-3:]
    rises = bool(i < T - 1 and tail.size and tail.mean() - v[i] > max(3.0 * noise, 0.01))
    folds = False
    if epoch is not None and rises:
        t = np.asarray(epoch, float)[o]
        folds = bool(np.any(t[i + 1:][-3:] <= t[i]))
        rises = not folds
    # A conservative lower bound of lambda_opt when the minimum is not bracketed: the first
    # point whose error is within the bracketing tolerance of the lowest one (on a flat end the
    # lowest point may lie past the true minimum; a point that is still significantly higher
    # lies before it).
    tol = max(3.0 * noise, 0.01)
    ib = int(np.flatnonzero(v <= v[i] + tol)[0])
    out = {"lambda_opt": float(np.exp(u[i])), "eps_opt": float(np.exp(v[i])),
           "lambda_bound": float(np.exp(u[ib])),
           "sigma_ln_lambda_opt": h / math.sqrt(12.0) if np.isfinite(h) else None,
           "sigma_ln_eps_opt": noise, "bracketed": bool(rises and i > 0), "method": "argmin",
           "index": i, "lambda_argmin": float(np.exp(u[i])), "eps_argmin": float(np.exp(v[i])),
           "grid_step": h, "noise": noise, "n_window": 1, "folds": folds}
    if method == "argmin" or not (0 < i < T - 1) or folds:
        return out
    depth = max(3.0 * noise, 0.03)
    for _ in range(5):  # widen (x2) until the curvature is significant: flat-bottomed minima
        a, b = _depth_window(v, i, depth, 1)
        du, vv = u[a:b + 1] - u[i], v[a:b + 1]
        X = np.column_stack([np.ones(du.size), du, du * du])
        coef, *_ = np.linalg.lstsq(X, vv, rcond=None)
        r = vv - X @ coef
        s2 = max(float(r @ r) / (du.size - 3) if du.size > 3 else 0.0, noise ** 2, 1e-8)
        cov = np.linalg.inv(X.T @ X) * s2
        c0, c1, c2 = coef
        convex = c2 > 0 and c2 > 2.0 * math.sqrt(max(cov[2, 2], 0.0))
        if convex or (a == 0 and b == T - 1):
            break
        depth *= 2.0
    us = -c1 / (2 * c2) if c2 > 0 else np.nan
    if not (convex and du[0] <= us <= du[-1]):
        out["bracketed"] = False
        return out
    g_u = np.array([0.0, -1.0 / (2 * c2), c1 / (2 * c2 * c2)])
    g_v = np.array([1.0, -c1 / (2 * c2), c1 * c1 / (4 * c2 * c2)])
    var_u = float(g_u @ cov @ g_u)
    if du.size <= 3 and np.isfinite(h):
        var_u += h * h / 12.0
    out.update(lambda_opt=float(np.exp(u[i] + us)), eps_opt=float(np.exp(c0 - c1 * c1 / (4 * c2))),
               sigma_ln_lambda_opt=math.sqrt(max(var_u, 0.0)),
               sigma_ln_eps_opt=math.sqrt(max(float(g_v @ cov @ g_v), 0.0)), method="vertex",
               n_window=int(du.size))
    return out


def optima(df: pd.DataFrame, method: str = "vertex", log: list | None = None) -> pd.DataFrame:
    """Optimum of every (P, seed) curve (:func:`curve_optimum`) and its end-of-training error.

    Returns:
      DataFrame per (P, seed): lambda_opt, eps_opt, bracketed, lambda_argmin, eps_argmin,
      epoch_opt (of the arg-min), eps_end, lambda_end, epoch_end, n_points.
    """
    rows = []
    for (P, seed), g in df.groupby(["P", "seed"], sort=True):
        g = g.sort_values("spectral_complexity", kind="stable")
        o = curve_optimum(g["spectral_complexity"].to_numpy(), g["test_error"].to_numpy(), method,
                          epoch=g["epoch"].to_numpy(float))
        last = g.sort_values("epoch").iloc[-1]
        rows.append(dict(P=int(P), seed=int(seed), lambda_opt=o["lambda_opt"],
                         eps_opt=o["eps_opt"], bracketed=o["bracketed"],
                         lambda_argmin=o["lambda_argmin"], eps_argmin=o["eps_argmin"],
                         epoch_opt=_epoch_value(g["epoch"].iloc[o["index"]]),
                         eps_end=float(last["test_error"]), lambda_end=float(last["spectral_complexity"]),
                         epoch_end=_epoch_value(last["epoch"]), n_points=len(g)))
    out = pd.DataFrame(rows)
    nb = out.loc[~out["bracketed"], ["P", "seed"]] if len(out) else out
    if log is not None and len(nb):
        _note(log, f"per-seed curves whose minimum is not bracketed (P, seed) = "
                   f"{[tuple(map(int, r)) for r in nb.itertuples(index=False)]}")
    return out


def optima_by_P(opt: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation and error of the mean over seeds of per-seed optima, per P.

    Returns:
      DataFrame with P, n_seeds, n_bracketed and <q>_mean/_std/_sem for q in lambda_opt,
      eps_opt, lambda_argmin, eps_end.
    """
    rows = []
    for P, g in opt.groupby("P", sort=True):
        r = {"P": int(P), "n_seeds": len(g), "n_bracketed": int(g["bracketed"].sum())}
        for q in ("lambda_opt", "eps_opt", "lambda_argmin", "eps_end"):
            v = g[q].to_numpy(float)
            sd = float(np.std(v, ddof=1)) if v.size > 1 else np.nan
            r[f"{q}_mean"] = float(np.mean(v))
            r[f"{q}_std"] = sd
            r[f"{q}_sem"] = sd / math.sqrt(v.size) if v.size > 1 else np.nan
        rows.append(r)
    return pd.DataFrame(rows)


def optimum_per_P(curves: dict, method: str = "vertex", seed_opt: pd.DataFrame | None = None
                  ) -> pd.DataFrame:
    """The optimum of each P's seed-mean curve: the points of Eqs. 4-6 (one row per P).

    Args:
      curves: from :func:`mean_curves`.
      method: "vertex" or "argmin" (:func:`curve_optimum`).
      seed_opt: per-seed optima (:func:`optima`), for the seed statistics columns.

    Returns:
      DataFrame with P, lambda_opt, sigma_ln_lambda_opt, eps_opt, sigma_ln_eps_opt, bracketed,
      opt_method, lambda_argmin, eps_argmin, grid_step, noise, eps_end, lambda_end (last
      evaluation of the mean curve) and, with ``seed_opt``: n_seeds, lambda_seed_argmins (mean
      over seeds of each seed's arg-min lambda: the authors' gamma2 input), eps_end_std.
    """
    rows = []
    sd = seed_opt.set_index(["P", "seed"]) if seed_opt is not None and len(seed_opt) else None
    for P, c in curves.items():
        o = curve_optimum(c["lam"].to_numpy(), c["eps"].to_numpy(), method,
                          epoch=c["epoch"].to_numpy(float) if "epoch" in c.columns else None)
        last = c.sort_values("epoch").iloc[-1]
        r = {"P": int(P), "lambda_opt": o["lambda_opt"],
             "sigma_ln_lambda_opt": o["sigma_ln_lambda_opt"], "eps_opt": o["eps_opt"],
             "sigma_ln_eps_opt": o["sigma_ln_eps_opt"], "bracketed": o["bracketed"],
             "opt_method": o["method"], "lambda_argmin": o["lambda_argmin"],
             "eps_argmin": o["eps_argmin"], "lambda_bound": o["lambda_bound"],
             "grid_step": o["grid_step"], "noise": o["noise"], "folds": o["folds"],
             "eps_end": float(last["eps"]), "lambda_end": float(last["lam"])}
        if "epoch" in c.columns:
            sat = saturation(c["epoch"].to_numpy(), c["eps"].to_numpy(),
                             c["eps_sem"].to_numpy() if "eps_sem" in c.columns else None)
            r.update(saturated=sat["saturated"], tail_slope=sat["tail_slope"],
                     sigma_tail_slope=sat["sigma_tail_slope"])
        if sd is not None:
            g = sd.loc[int(P)]
            r["n_seeds"] = int(len(g))
            r["lambda_seed_argmins"] = float(g["lambda_argmin"].mean())
            r["eps_end_std"] = float(g["eps_end"].std(ddof=1)) if len(g) > 1 else float("nan")
        rows.append(r)
    return pd.DataFrame(rows)


# Share of a curve's last evaluations (at least SATURATION_MIN_POINTS) on which saturation is tested.
SATURATION_TAIL = 0.25
SATURATION_MIN_POINTS = 4


def saturation(epoch, eps, eps_sem=None, *, tail: float = SATURATION_TAIL, z: float = 2.0) -> dict:
    """Has the test error stopped falling? The paper's Sec. 3.1 trains "until the test error overfits or
    saturates"; a curve whose minimum is not bracketed is only usable as saturated if its end is flat.

    Test: on the last ``tail`` of the evaluations (at least SATURATION_MIN_POINTS, epoch > 0), the weighted
    least-squares slope b of eps against ln(epoch) (weights 1 / eps_sem^2 when given, floored at the
    median sem; sigma_b from the residual scatter or the sems, whichever is larger) is not significantly
    negative: b > -z sigma_b. ``saturated`` False means the error was still falling when training ended.

    Args:
      epoch: [T] evaluation epochs (fractional allowed); eps: [T] seed-mean test error; eps_sem: [T] its
        standard error over seeds (optional).

    Returns:
      dict saturated (bool, None with too few points), tail_slope (d eps / d ln epoch), sigma_tail_slope,
      tail_points, tail_from_epoch.
    """
    epoch, eps = np.asarray(epoch, float), np.asarray(eps, float)
    sem = None if eps_sem is None else np.asarray(eps_sem, float)
    keep = epoch > 0
    order = np.argsort(epoch[keep], kind="stable")
    t, e = np.log(epoch[keep][order]), eps[keep][order]
    sm = None if sem is None else sem[keep][order]
    n = max(SATURATION_MIN_POINTS, int(math.ceil(tail * t.size)))
    if t.size < SATURATION_MIN_POINTS or n > t.size:
        return {"saturated": None, "tail_slope": None, "sigma_tail_slope": None, "tail_points": int(t.size),
                "tail_from_epoch": None}
    t, e = t[-n:], e[-n:]
    if sm is not None and np.all(np.isfinite(sm[-n:])) and np.median(sm[-n:]) > 0:
        w = 1.0 / np.maximum(sm[-n:], np.median(sm[-n:])) ** 2
    else:
        w = np.ones(n)
    tm = np.sum(w * t) / np.sum(w)
    sxx = np.sum(w * (t - tm) ** 2)
    if sxx <= 0:
        return {"saturated": None, "tail_slope": None, "sigma_tail_slope": None, "tail_points": n,
                "tail_from_epoch": float(np.exp(t[0]))}
    b = np.sum(w * (t - tm) * (e - np.sum(w * e) / np.sum(w))) / sxx
    a = np.sum(w * e) / np.sum(w) - b * tm
    resid = e - a - b * t
    s2_resid = np.sum(w * resid ** 2) / max(n - 2, 1)  # reduced chi^2 x (1 / w scale)
    sigma_b = math.sqrt(max(s2_resid, 1.0 if sm is not None else 0.0) / sxx) if sm is not None else \
        math.sqrt(s2_resid / sxx)
    return {"saturated": bool(b > -z * sigma_b), "tail_slope": float(b), "sigma_tail_slope": float(sigma_b),
            "tail_points": int(n), "tail_from_epoch": float(np.exp(t[0]))}


def _joint(curves: dict, opt_P: pd.DataFrame, P_used: Sequence[int]) -> pd.DataFrame:
    """:func:`collapse_optima` on the P that collapse (P >= p_min); the others unchanged."""
    inside = opt_P["P"].isin(list(P_used))
    joint = collapse_optima(curves, opt_P[inside].reset_index(drop=True))
    return pd.concat([opt_P[~inside], joint]).sort_values("P").reset_index(drop=True)


def collapse_optima(curves: dict, opt_P: pd.DataFrame, *, degree: int = 4) -> pd.DataFrame:
    """lambda_opt and eps_opt of every bracketed P from one joint fit of the minima's shapes.

    Eq. 5 says every curve is the same function of ln(lambda/lambda_opt) near its minimum, up
    to the height ln eps_opt. So the points around each bracketed minimum (the vertex window of
    :func:`curve_optimum`, at least two neighbours on each side) are fitted together as
    ln eps = v_P + sum_{k=2..degree} c_k (ln lambda - u_P)^k: per P a position u_P = ln
    lambda_opt and a height v_P, and one shape (c_2..c_degree) shared by all P. A single curve's
    parabola sees its minimum through a few grid points at a phase that drifts with P (with 10
    evaluations per replica that drift biases gamma2 by ~1.5 sigma); the shared shape is sampled
    at every phase at once, and its asymmetry (c_3, c_4) no longer shifts the vertex.
    Errors: the Jacobian covariance scaled by the residual variance (floored at the curves'
    noise).

    Args:
      curves: from :func:`mean_curves`.
      opt_P: from :func:`optimum_per_P` (per-curve vertices: starting values and brackets).
      degree: highest power of the shared shape.

    Returns:
      A copy of ``opt_P`` whose bracketed rows carry the joint lambda_opt, eps_opt and their
      sigmas (opt_method "collapse"); unchanged when fewer than 3 P are bracketed.
    """
    out = opt_P.copy()
    rows = [r for r in out.itertuples() if r.bracketed and r.opt_method == "vertex"]
    if len(rows) < 3:
        return out
    data = []
    for r in rows:
        c = curves[r.P].sort_values("lam", kind="stable")
        u, v = np.log(c["lam"].to_numpy()), np.log(c["eps"].to_numpy())
        i = int(np.argmin(v))
        a, b = _depth_window(v, i, max(3.0 * (r.noise or 0.0), 0.05), 2)
        data.append((u[a:b + 1], v[a:b + 1], math.log(r.lambda_opt), math.log(r.eps_opt)))
    nP, nc = len(data), degree - 1
    uu = np.concatenate([d[0] for d in data])
    vv = np.concatenate([d[1] for d in data])
    idx = np.concatenate([np.full(d[0].size, j) for j, d in enumerate(data)])
    if uu.size <= 2 * nP + nc:
        return out

    def resid(p):
        w = uu - p[idx]
        f = p[nP + idx]
        for k in range(nc):
            f = f + p[2 * nP + k] * w ** (k + 2)
        return f - vv

    p0 = np.concatenate([[d[2] for d in data], [d[3] for d in data], [0.3], np.zeros(nc - 1)])
    res = optimize.least_squares(resid, p0, x_scale="jac", max_nfev=4000)
    if not res.success or res.x[2 * nP] <= 0:
        return out
    dof = uu.size - res.x.size
    noise = float(np.nanmedian([r.noise for r in rows]))
    s2 = max(float(res.fun @ res.fun) / dof, noise ** 2)
    try:
        cov = np.linalg.inv(res.jac.T @ res.jac) * s2
    except np.linalg.LinAlgError:
        return out
    moved = np.abs(res.x[:nP] - p0[:nP])
    steps = np.array([np.median(np.diff(d[0])) for d in data])
    if np.any(moved > 2.0 * steps):  # the shared shape does not describe these minima
        return out
    for j, r in enumerate(rows):
        k = out.index[out["P"] == r.P][0]
        out.loc[k, ["lambda_opt", "eps_opt", "sigma_ln_lambda_opt", "sigma_ln_eps_opt"]] = [
            math.exp(res.x[j]), math.exp(res.x[nP + j]), math.sqrt(max(cov[j, j], 0.0)),
            math.sqrt(max(cov[nP + j, nP + j], 0.0))]
        out.loc[k, "opt_method"] = "collapse"
    return out


# ----------------------------------------------------------------------------------------------
# Early power law (Eq. 3): window detection and gamma1
# ----------------------------------------------------------------------------------------------

# Fraction of a curve's steepest local log-log slope that ends its initial plateau
# (detect_elbow): an untrained network sits at chance level, and the early power-law decay of
# Eq. 3 starts only where the error has left it.
PLATEAU_DROP = 1.0 / 3.0


def detect_elbow(lam, eps, *, sigma_floor: float = 0.003, z: float = 2.0,
                 min_points: int = 5, max_points: int = 400, max_start: int = 2,
                 plateau: float = PLATEAU_DROP) -> dict:
    """Finds the pure power-law early window of a learning curve and its elbow.

    Grid search over the windows [i, j] before the curve's minimum that start early (below): a
    window is a power law when a straight line in
    (log lambda, log eps) fits it to within the noise (reduced chi^2 below 1 + z sqrt(2/(n-2)),
    the chi^2 tail at z sigmas) with a negative slope. The widest such window in log lambda is
    the early phase of Eq. 3; its right end is lambda_elbow, where the curve departs from the
    power law by more than noise. The early phase is where training starts (Sec. 3.2): without
    the start constraint, a long, nearly flat late stretch of a saturating curve (within noise
    a line too) would win and bias gamma1 towards 0. It starts where the curve has left its
    initial plateau: a network at initialization sits at chance level and its error first stays
    flat (Eq. 3's phase is a power-law *decay*). The leading points whose local log-log slope
    (a line through min_points points) is shallower than ``plateau`` times the curve's steepest
    local slope before its minimum are that plateau; the window starts after it and at the
    latest ``max_start`` points after the bend out of it ends (where the local slope first
    reaches (1 - ``plateau``) of the steepest). A curve that decays from its first point has
    neither (the window starts within its first ``max_start + 1`` points). On the authors'
    ResNet/MNIST curves the window of P <= 6000 was otherwise that plateau (log-log slopes
    0.02-0.17).

    Args:
      lam, eps: one curve, shape [T], lambda increasing.
      sigma_floor: smallest per-point log noise assumed (for noiseless curves).
      z: tolerance of the chi^2 test in its own standard deviations.
      min_points: smallest window.
      max_points: longer curves are averaged down to this many points first.
      max_start: latest index, counted from the end of the bend out of the initial plateau
        (from 0 on a curve without one), at which the early window may start.
      plateau: fraction of the steepest local slope that ends the initial plateau (0: no
        plateau rule, the window starts within the first ``max_start + 1`` points).

    Returns:
      dict i0, i1 (indices into the possibly averaged curve), lambda_start, lambda_elbow,
      slope, noise (log eps per point), n_points, i_plateau (first index past the initial
      plateau); None entries if no window exists.

    Raises:
      ValueError: fewer than min_points points in all, or before the minimum.
    """
    lam = np.asarray(lam, float)
    eps = np.asarray(eps, float)
    order = np.argsort(lam, kind="stable")
    u, v = np.log(lam[order]), np.log(eps[order])
    if u.size > max_points:  # bin-average consecutive points so the O(T^2) search stays small
        nb = int(math.ceil(u.size / max_points))
        m = (u.size // nb) * nb
        u = u[:m].reshape(-1, nb).mean(1)
        v = v[:m].reshape(-1, nb).mean(1)
    if u.size < min_points:
        raise ValueError(f"only {u.size} points; the early power law needs at least min_points={min_points}")
    end_max = int(np.argmin(v))
    if end_max + 1 < min_points:
        raise ValueError(f"only {end_max + 1} points before the minimum of the curve; the early "
                         f"power law needs at least min_points={min_points}")
    noise = _noise_log(v[: end_max + 1])
    sigma = max(noise if np.isfinite(noise) else 0.0, sigma_floor)
    # Window sums from cumulative sums: O(1) per window. u is scaled to [0, 1] and the moments
    # are centred on each window's mean, so the regressions stay well conditioned.
    scale = max(u[end_max] - u[0], 1e-12)
    w, vv = (u[: end_max + 1] - u[0]) / scale, v[: end_max + 1]
    cs = [np.concatenate([[0.0], np.cumsum(t)]) for t in
          (np.ones_like(w), w, w ** 2, w ** 3, w ** 4, vv, vv * w, vv * w ** 2, vv * vv)]
    n = w.size
    i, j = np.triu_indices(n, k=min_points - 1)
    S0, S1, S2, S3, S4, T0, T1, T2, Svv = (c[j + 1] - c[i] for c in cs)
    m = S1 / S0
    C2 = S2 - 2 * m * S1 + m * m * S0
    C3 = S3 - 3 * m * S2 + 3 * m * m * S1 - m ** 3 * S0
    C4 = S4 - 4 * m * S3 + 6 * m * m * S2 - 4 * m ** 3 * S1 + m ** 4 * S0
    D1 = T1 - m * T0
    D2 = T2 - 2 * m * T1 + m * m * T0
    nw = S0
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = D1 / C2 / scale
        sse = np.maximum(Svv - T0 ** 2 / nw - D1 ** 2 / C2, 0.0)
        chi2r = sse / (nw - 2) / sigma ** 2
        # Curvature test: SSE drop from adding a quadratic term (orthogonalized), in sigma^2;
        # a smooth departure from the power law shows up here long before it moves chi^2.
        qq = C4 - C2 ** 2 / nw - C3 ** 2 / C2
        dsse = np.where(qq > 0, (D2 - T0 * C2 / nw - D1 * C3 / C2) ** 2 / qq, 0.0) / sigma ** 2
    # The initial plateau: the leading points whose local slope (min_points-point lines) is
    # shallower than ``plateau`` times the steepest local slope before the minimum.
    loc = (j - i == min_points - 1) & (C2 > 0)
    steep = float(np.min(slope[loc])) if loc.any() else 0.0
    k0 = k1 = 0
    if steep < 0 and plateau > 0:
        off = i[loc][slope[loc] <= plateau * steep]
        k0 = int(off.min()) if off.size else 0
        # ... and the bend out of it ends where the local slope reaches (1 - plateau) of the
        # steepest: the window may start anywhere in that bend (the widest one wins).
        on = i[loc][(slope[loc] <= (1 - plateau) * steep) & (i[loc] >= k0)]
        k1 = int(on.min()) if on.size else k0
    ok = ((chi2r <= 1.0 + z * np.sqrt(2.0 / (nw - 2))) & (dsse <= z * z) & (slope < 0)
          & (C2 > 0) & (i >= k0) & (i <= k1 + max_start))
    if not ok.any():
        return {"i0": None, "i1": None, "lambda_start": None, "lambda_elbow": None,
                "slope": None, "noise": noise, "n_points": 0, "i_plateau": k0}
    span = np.where(ok, w[j] - w[i], -np.inf)
    best = np.flatnonzero(span >= span.max() - 1e-12)
    b = best[np.argmax(nw[best])]
    return {"i0": int(i[b]), "i1": int(j[b]), "lambda_start": float(np.exp(u[i[b]])),
            "lambda_elbow": float(np.exp(u[j[b]])), "slope": float(slope[b]),
            "noise": float(noise), "n_points": int(nw[b]), "i_plateau": k0}


# The lazy start of training: where a curve holds its initialization (epoch 0), its points with lambda below
# LAZY_FACTOR times the initial lambda are not part of Eq. 3's early phase. Sampled by optimizer step (issue 15),
# a LeNet-5 on Fashion-MNIST first drops its test error from 0.89 to 0.65 while R_A moves from 12.2 to 13
# (P = 10000): a near-vertical stretch in log-log whose slope (5-10) the window search otherwise took as gamma1.
# Eq. 3 describes the error falling as the norm grows; this stretch is the error falling at a fixed norm.
# Where lambda first falls, its points before its minimum are left out too and the factor applies to that
# minimum (the paper's Sec. 3 requires lambda(t) increasing): a ResNet-20 with folded BatchNorm starts with
# running statistics (0, 1), and its R_A falls ~10x while they warm up (Fashion-MNIST, P = 2000, seed means:
# 2.8e10 at step 0, 2.3e9 at epoch 2.5, 2.1e10 at epoch 60), by which time the test error fell from 0.89 to 0.32.
LAZY_FACTOR = 2.0

# Share (in ln lambda) of each detected early window that enters the gamma1 fit. The detection
# accepts departures from the power law up to the noise, and those sit at the window's end,
# where the curve bends into its elbow: on bench_analysis's curves the full window biases
# gamma1 low by 1-2 sigma, its first two thirds by < 0.5 sigma.
GAMMA1_WINDOW_FRACTION = 2.0 / 3.0
# Stability (in jackknife-over-P sigmas) that a pooled q1 needs to be kept (fit_gamma1).
Q1_JACKKNIFE_Z = 3.0
# F-test level below which a q1 > 0 that the rule above does not keep still counts as a
# plausible model: gamma1's sigma (and gamma_opt's, whose Eq. 6 shares q1) then carries the
# q1 model uncertainty. At Q_ALPHA alone the study's q1 != 0 scenario covered 52 % (the
# realisations whose F test gave p = 0.010-0.013 had the no-q1 fit's small sigma).
Q1_AMBIGUOUS_ALPHA = 0.05


def _window_fits(curves: dict, P_used: Iterable[int], log: list | None, elbow_kw: dict,
                 fraction: float | None = None) -> list:
    """Per P: the detected early power-law window of the seed-mean curve (raw lambda, eps)."""
    fraction = GAMMA1_WINDOW_FRACTION if fraction is None else fraction
    per = []
    for P in P_used:
        c = curves[P].sort_values("lam", kind="stable")
        init = c["epoch"] == 0 if "epoch" in c.columns else np.zeros(len(c), bool)
        if np.any(init):  # the lazy start (LAZY_FACTOR): lambda still within a factor of where it starts to grow
            by_time = c.sort_values("epoch", kind="stable")
            i_min = int(np.argmin(by_time["lam"].to_numpy()))
            t_min, lam_min = float(by_time["epoch"].iloc[i_min]), float(by_time["lam"].iloc[i_min])
            falling = (c["epoch"] < t_min).to_numpy()
            if falling.any():  # lambda first falls: Eq. 3 needs it growing, so its phase starts at the minimum
                _note(log, f"P={P}: lambda falls from {float(c.loc[init, 'lam'].iloc[0]):.4g} to {lam_min:.4g} "
                           f"(epoch {t_min:.4g}) before it grows: the {int(falling.sum())} points before its minimum "
                           "are left out of the early window")
            lazy = falling | (c["lam"] < LAZY_FACTOR * lam_min).to_numpy()
            if (lazy & ~falling).sum() > 1:
                _note(log, f"P={P}: {int((lazy & ~falling).sum())} points with lambda < {LAZY_FACTOR:g} x its "
                           "smallest value left out of the early window (lazy start)")
            c = c[~lazy]
        lam, eps = c["lam"].to_numpy(), c["eps"].to_numpy()
        try:
            el = detect_elbow(lam, eps, **elbow_kw)
        except ValueError as e:
            _note(log, f"P={P}: no early power law ({e})")
            continue
        if el["i0"] is None:
            _note(log, f"P={P}: no window before the minimum is a power law within noise")
            continue
        top = el["lambda_start"] * (el["lambda_elbow"] / el["lambda_start"]) ** fraction
        sel = (lam >= el["lambda_start"] * (1 - 1e-9)) & (lam <= top * (1 + 1e-9))
        if sel.sum() < 3:
            sel = (lam >= el["lambda_start"] * (1 - 1e-9)) & (lam <= el["lambda_elbow"] * (1 + 1e-9))
        f = fit_power_law(lam[sel], eps[sel], with_q=False)
        per.append({"P": int(P), "gamma1": -f.a, "sigma": f.sigma_a, "k": f.k,
                    "lambda_start": el["lambda_start"], "lambda_elbow": el["lambda_elbow"],
                    "lambda_fit_end": float(lam[sel].max()),
                    "n_points": f.n_points, "noise": el["noise"], "lam": lam[sel], "eps": eps[sel]})
    return per


def _jackknife_sd(v: np.ndarray) -> float | None:
    """Delete-one jackknife standard error: sqrt((n-1)/n sum (v_i - mean)^2); None if n < 3."""
    n = v.size
    return math.sqrt((n - 1) / n * float(np.sum((v - v.mean()) ** 2))) if n >= 3 else None


def _pooled_eq3(per: list, alpha: float, jackknife_q, force_q1: bool = False
                ) -> tuple[PowerLawFit, float | None,
                                                                  float | None]:
    """Eq. 3 on the pooled windows ``per`` (dicts with "lam", "eps" arrays), q1 rule included.

    q1 (Eq. 3's floor) is kept when the F test asks for it, it is positive AND it is stable when
    any one P is left out (q1 > Q1_JACKKNIFE_Z jackknife sigmas): the bend of each curve into
    its elbow also looks like a q1 to the F test on pooled points, but it sits at a different
    lambda for every P, so its "q1" moves when a P is dropped; a real floor does not.

    Args:
      jackknife_q: the q setting of the jackknife fits that give gamma1's error: None = the
        model chosen here, "auto" = decided afresh in each fit.
      force_q1: fit with q1 whatever the rule says (the joint evidence of Eq. 3 and Eq. 6 kept
        the floor: see :func:`_core`); the jackknife fits then keep q1 too.

    Returns:
      (fit, jackknife sigma of gamma1 or None, jackknife sigma of q1 or None).
    """
    lam = np.concatenate([p["lam"] for p in per])
    eps = np.concatenate([p["eps"] for p in per])

    def jackknife(with_q):
        out = []
        for j in range(len(per)):
            lj = np.concatenate([p["lam"] for i, p in enumerate(per) if i != j])
            ej = np.concatenate([p["eps"] for i, p in enumerate(per) if i != j])
            try:
                fj = fit_power_law(lj, ej, with_q=with_q, alpha=alpha)
            except ValueError:
                continue
            out.append((-fj.a, fj.q))
        return np.asarray(out).reshape(-1, 2)

    f = fit_power_law(lam, eps, with_q=False)
    q_jk = None
    if force_q1 and lam.size >= 5:
        fq = fit_power_law(lam, eps, with_q="auto", alpha=alpha)
        f = fit_power_law(lam, eps, with_q=True)
        f = dataclasses.replace(f, q_test={**(fq.q_test or {}), "forced": "joint evidence of "
                                           "Eq. 3 and Eq. 6 (eps_opt(P)) for the floor"})
        jackknife_q = True
    elif len(per) >= 3 and lam.size >= 5:
        fq = fit_power_law(lam, eps, with_q="auto", alpha=alpha)
        if fq.q_kept:
            q_jk = _jackknife_sd(jackknife(True)[:, 1])
            if q_jk is not None and fq.q > Q1_JACKKNIFE_Z * q_jk:
                f = fq
        f = dataclasses.replace(f, q_test={**(fq.q_test or {}), "sigma_q1_jackknife": q_jk,
                                           "z_jackknife": Q1_JACKKNIFE_Z})
    s_jk = (_jackknife_sd(jackknife(f.q_kept if jackknife_q is None else jackknife_q)[:, 0])
            if len(per) >= 3 else None)
    if s_jk is not None:  # n_P - 1 degrees of freedom: +-sigma a 68 % interval (Student t)
        s_jk *= _t68(len(per) - 1)
        # The q1 model uncertainty (the reported q1 keeps the calibrated rule above): when the
        # F test gives p < Q1_AMBIGUOUS_ALPHA for a q1 > 0 that the rules do not keep, sigma is
        # averaged over the fits without and with q1, information-criterion weights, between-model term included. Not otherwise: the bend
        # of every window into its elbow gives the q1 fit some weight on pure power laws too
        # (averaging always over-covered: 88-92 % in the study's base scenario).
        ambiguous = bool((f.q_test or {}).get("p") is not None
                         and f.q_test["p"] < max(alpha, Q1_AMBIGUOUS_ALPHA)
                         and (f.q_test.get("q") or 0) > 0 and not f.q_kept)
        try:
            f0 = fit_power_law(lam, eps, with_q=False)
            f1 = fit_power_law(lam, eps, with_q=True)
        except ValueError:
            f1 = None
        n = int(lam.size)
        wq = (_q_weight(n, f0.chi2_red * (n - 2), f1.chi2_red * (n - 3))
              if f1 is not None and f1.q > 0 and np.isfinite(f1.sigma_a) else None)
        if wq is not None and not f.q_kept:
            # Eq. 3's floor candidate, for Eq. 6 (which shares q1): _core weighs it with the
            # evidence of Eq. 3's pooled points and of the eps_opt(P) points together.
            f = dataclasses.replace(f, q_test={**(f.q_test or {}), "q1_candidate": {
                "q1": float(f1.q), "sigma_q1": float(f1.sigma_q), "n": n,
                "sse_without": float(f0.chi2_red * (n - 2)),
                "sse_with": float(f1.chi2_red * (n - 3)), "w_q": wq}})
        if wq is not None and ambiguous:
            alt_q = not f.q_kept
            s_alt = _jackknife_sd(jackknife(alt_q)[:, 0])
            if s_alt is not None:
                alt = (-(f1 if alt_q else f0).a, s_alt * _t68(len(per) - 1))
                s_sel = s_jk
                s_jk = _averaged_sigma((-f.a, s_sel), alt, wq if alt_q else 1 - wq)
                f = dataclasses.replace(f, q_test={**(f.q_test or {}), "model_average": {
                    "w_q": wq, "sigma_selected": s_sel, "alternative": list(alt),
                    "q1_alternative": [float(f1.q), float(f1.sigma_q)] if alt_q else None}})
    sys = _window_systematic(per, f) if s_jk is not None else None
    if sys is not None:
        sys["sigma_jackknife"] = s_jk
        f = dataclasses.replace(f, q_test={**(f.q_test or {}), "window_systematic": sys})
        s_jk = math.hypot(s_jk, sys["sigma_sys"])
    return f, s_jk, q_jk


def _jk_only(f: PowerLawFit, s: float | None) -> float | None:
    """gamma1's jackknife sigma before the window systematic was added (for the record)."""
    return ((f.q_test or {}).get("window_systematic") or {}).get("sigma_jackknife", s)


def _window_systematic(per: list, f: PowerLawFit) -> dict | None:
    """The window-dependence of gamma1: the same pooled Eq. 3 fit (same q1 choice as ``f``) on
    the first half in ln lambda of every P's window, against the whole window.

    A pure power law has one slope on any part of its window; a floor q1 that the fit leaves
    out (the calibrated rule keeps a real floor in only about half of the study's q1 != 0
    realisations) bends the log-log line and the slope moves with the window, by the same
    amount in every P, so the jackknife over P cannot see it. The shift Delta between the two
    fits, less what noise alone gives (nested fits: Var(Delta) = sigma_half^2 - sigma_whole^2),
    is the systematic: sigma_sys^2 = max(0, Delta^2 - Var(Delta)), added to gamma1's sigma in
    quadrature.

    Returns:
      {"delta", "sigma_noise", "sigma_sys"} (the caller adds "sigma_jackknife", gamma1's sigma
      before this term), or None when the half windows hold too few points.
    """
    halves = []
    for p in per:
        lam, eps = p["lam"], p["eps"]
        cut = math.sqrt(float(lam.min()) * float(lam.max()))
        m = lam <= cut * (1 + 1e-9)
        if m.sum() >= 2:
            halves.append((lam[m], eps[m]))
    if len(halves) < 2:
        return None
    lam = np.concatenate([h[0] for h in halves])
    eps = np.concatenate([h[1] for h in halves])
    if lam.size < (6 if f.q_kept else 4):
        return None
    try:
        fh = fit_power_law(lam, eps, with_q=bool(f.q_kept))
    except ValueError:
        return None
    if not (np.isfinite(fh.sigma_a) and np.isfinite(f.sigma_a)):
        return None
    delta = float(-fh.a - (-f.a))
    var_noise = max(0.0, fh.sigma_a ** 2 - f.sigma_a ** 2)
    return {"delta": delta, "sigma_noise": math.sqrt(var_noise),
            "sigma_sys": math.sqrt(max(0.0, delta ** 2 - var_noise))}


def fit_gamma1(curves: dict, P_used: Iterable[int], *, log: list | None = None,
               alpha: float = Q_ALPHA, force_q1: bool = False,
               **elbow_kw) -> tuple[Exponent, Exponent]:
    """gamma1 without hand choices: one pooled fit of Eq. 3 on every P's early window.

    Window rule: for every P >= p_min, the widest stretch from the start of the seed-mean curve
    that a straight line in (ln lambda, ln eps) fits within noise (:func:`detect_elbow`), of
    which the first GAMMA1_WINDOW_FRACTION (2/3, in ln lambda) is fitted.
    Eq. 3 says the early phase is the same curve for every P, so the windows are pooled in raw
    (lambda, eps) and eps = k1 lambda^-gamma1 (+ q1 when the F test keeps it) is fitted once.
    The points of one curve share its seeds' fluctuations, so the error is a delete-one-P
    jackknife (sigma^2 = (n-1)/n sum (g_-i - g_.)^2) rather than the fit covariance (also
    reported; the q decision is retaken in every jackknife fit), the window systematic
    (:func:`_window_systematic`: a bias that all windows share) added in quadrature; with fewer
    than 3 P it is the covariance error.

    Returns:
      (gamma1, gamma1_appendix_d): the pooled Exponent (detail: k1, q1, per_P windows,
      sigma_cov, sigma_jackknife, window_systematic) and the Appendix D estimate on the same
      windows (mean over P of the per-P slopes, sigma = error of the mean).
    """
    method = ("pooled least-squares fit of Eq. 3 (eps = k1 lambda^-gamma1 + q1, q1 by F test) "
              "on the detected early power-law windows of every P >= p_min; sigma: jackknife over P "
              "and the window systematic in quadrature")
    per = _window_fits(curves, P_used, log, elbow_kw)
    app = "Appendix D: mean over P of per-P log-log slopes on the detected windows; sigma = error of the mean"
    if not per:
        why = "no P has a detectable early power-law window"
        return Exponent.undetermined(method, why), Exponent.undetermined(app, why)
    f, s_jk, q_jk = _pooled_eq3(per, alpha, jackknife_q=None, force_q1=force_q1)
    sigma = s_jk if s_jk is not None else f.sigma_a
    windows = [{k: v for k, v in p.items() if k not in ("lam", "eps")} for p in per]
    g1 = Exponent(value=-f.a, sigma=sigma, method=method, n=f.n_points, k=f.k, q=f.q,
                  sigma_q=f.sigma_q, q_kept=f.q_kept, q_test=f.q_test, chi2_red=f.chi2_red,
                  cov=f.cov, resid_sd=f.resid_sd, x_range=list(f.x_range),
                  detail={"k1": f.k, "q1": f.q, "sigma_q1": f.sigma_q, "n_P": len(per),
                          "sigma_cov": f.sigma_a, "sigma_jackknife": _jk_only(f, s_jk),
                          "per_P": windows,
                          "window_systematic": (f.q_test or {}).get("window_systematic")})
    g = np.array([p["gamma1"] for p in per])
    if g.size > 1:
        # Is the early phase one power law for every P (Eq. 3)? chi^2 of the per-P slopes about
        # their weighted mean, n_P - 1 degrees of freedom.
        w = 1.0 / np.array([p["sigma"] for p in per]) ** 2
        chi2 = float(np.sum(w * (g - np.sum(w * g) / np.sum(w)) ** 2))
        g1 = dataclasses.replace(g1, detail={**g1.detail, "slopes_chi2": chi2,
                                             "slopes_dof": int(g.size - 1),
                                             "slopes_p": float(stats.chi2.sf(chi2, g.size - 1))})
        gad = Exponent(value=float(g.mean()), sigma=float(g.std(ddof=1) / math.sqrt(g.size)),
                       method=app, n=int(g.size))
    else:
        gad = Exponent(value=float(g[0]), sigma=float(per[0]["sigma"]), method=app, n=1,
                       reason="one P: sigma is that fit's error")
    return g1, gad


def fit_gamma1_collapse(curves: dict, opt_P: pd.DataFrame, P_used: Iterable[int], *,
                        alpha: float = Q_ALPHA, z: float = 2.0, log: list | None = None,
                        force_q1: bool = False) -> tuple[Exponent, Exponent] | None:
    """gamma1 from one window on the collapse, shared by every P with a bracketed minimum.

    Eq. 5 puts every curve's elbow at the same x = lambda/lambda_opt, so the early window is
    one interval x <= x_e for all P, in raw lambda it ends at x_e lambda_opt(P). Rule: the
    largest x_e on a log grid (0.01 ... 0.7) for which Eq. 3 (eps = k1 lambda^-gamma1 + q1, q1
    kept by the F test when positive and stable under the jackknife over P, as in
    :func:`fit_gamma1`) fits the pooled points within noise (reduced chi^2 in units of the
    curves' point noise <= 1 + z sqrt(2/dof)); then, as in :func:`fit_gamma1`, each P's window
    is cut to its first GAMMA1_WINDOW_FRACTION in ln lambda. Unlike per-curve
    windows, a floor q1 does not end the window early (the model has q1), so the largest P,
    whose windows reach the lowest errors, carry q1 into the fit. Error: jackknife over P (q1
    decided afresh in each fit).

    Returns:
      (gamma1, gamma1_appendix_d), or None with fewer than 3 bracketed P (then the per-curve
      windows of :func:`fit_gamma1` are used).
    """
    optd = opt_P.set_index("P")
    Ps = [P for P in P_used if bool(optd.loc[P, "bracketed"])]
    if len(Ps) < 3:
        return None
    cur = {}
    for P in Ps:
        c = curves[P].sort_values("lam", kind="stable")
        lam, eps = c["lam"].to_numpy(), c["eps"].to_numpy()
        cur[P] = (lam, eps, lam / optd.loc[P, "lambda_opt"])
    noise = float(np.nanmedian([_noise_log(np.log(e[x < 1])) for lam, e, x in cur.values()]))
    noise = max(noise if np.isfinite(noise) else 0.0, 0.003)
    best = None
    for xe in np.geomspace(0.01, 0.7, 25):
        lam = np.concatenate([l[x <= xe] for l, e, x in cur.values()])
        eps = np.concatenate([e[x <= xe] for l, e, x in cur.values()])
        if lam.size < 10 or sum(int(np.sum(x <= xe)) >= 3 for _, _, x in cur.values()) < 3:
            continue
        f = fit_power_law(lam, eps, with_q="auto", alpha=alpha)
        dof = lam.size - (3 if f.q_kept else 2)
        if f.chi2_red / noise ** 2 <= 1.0 + z * math.sqrt(2.0 / dof) and f.a < 0:
            best = xe
    if best is None:
        return None
    per = []
    for P, (lam, eps, x) in cur.items():
        m = x <= best
        if m.sum() < 3:
            continue
        top = lam[m][0] * (lam[m][-1] / lam[m][0]) ** GAMMA1_WINDOW_FRACTION
        sel = m & (lam <= top * (1 + 1e-9))
        if sel.sum() < 3:
            sel = m
        f = fit_power_law(lam[sel], eps[sel], with_q=False)
        per.append({"P": int(P), "gamma1": -f.a, "sigma": f.sigma_a, "k": f.k,
                    "lambda_start": float(lam[m][0]), "lambda_elbow": float(lam[m][-1]),
                    "lambda_fit_end": float(lam[sel].max()), "n_points": int(sel.sum()),
                    "lam": lam[sel], "eps": eps[sel]})
    # P without a bracketed minimum have no lambda_opt to place the shared window, but their
    # early power law does not need one (a log-log slope does not depend on lambda_opt's
    # normalization): their own detected window (detect_elbow, in absolute lambda) joins.
    n_shared = len(per)
    per += _window_fits(curves, [P for P in P_used if P not in cur], log, {})
    if n_shared < 3:
        return None
    f, s_jk, q_jk = _pooled_eq3(per, alpha, jackknife_q="auto", force_q1=force_q1)
    g = np.array([p["gamma1"] for p in per])
    w = 1.0 / np.array([p["sigma"] for p in per]) ** 2
    chi2 = float(np.sum(w * (g - np.sum(w * g) / np.sum(w)) ** 2))
    windows = [{k: v for k, v in p.items() if k not in ("lam", "eps")} for p in per]
    method = ("pooled least-squares fit of Eq. 3 (eps = k1 lambda^-gamma1 + q1, q1 by F test) on "
              "one early window x = lambda/lambda_opt <= x_e shared by the bracketed P (x_e: the "
              "widest that Eq. 3 fits within noise; P without a bracketed minimum: their own "
              "detected window), first 2/3 of each; sigma: jackknife over P and the window "
              "systematic in quadrature")
    g1 = Exponent(value=-f.a, sigma=s_jk if s_jk is not None else f.sigma_a, method=method,
                  n=f.n_points, k=f.k, q=f.q, sigma_q=f.sigma_q, q_kept=f.q_kept,
                  q_test=f.q_test, chi2_red=f.chi2_red, cov=f.cov, resid_sd=f.resid_sd,
                  x_range=list(f.x_range),
                  detail={"k1": f.k, "q1": f.q, "sigma_q1": f.sigma_q, "n_P": len(per),
                          "x_e": float(best), "noise": noise, "sigma_cov": f.sigma_a,
                          "P_shared_window": sorted(cur), "P_own_window": [
                              p["P"] for p in per[n_shared:]],
                          "sigma_jackknife": _jk_only(f, s_jk), "per_P": windows,
                          "slopes_chi2": chi2,
                          "window_systematic": (f.q_test or {}).get("window_systematic"),
                          "slopes_dof": int(g.size - 1),
                          "slopes_p": float(stats.chi2.sf(chi2, g.size - 1))})
    gad = Exponent(value=float(g.mean()), sigma=float(g.std(ddof=1) / math.sqrt(g.size)),
                   method="Appendix D: mean over P of per-P log-log slopes on the same windows; "
                          "sigma = error of the mean", n=int(g.size))
    return g1, gad


def fit_gamma1_window(curves: dict, opt_P: pd.DataFrame, P_used: Iterable[int],
                      window: tuple, *, log: list | None = None) -> Exponent:
    """The authors' gamma1: per-P log-log slopes inside a hand-chosen window of the collapse.

    For every P >= p_min: x = lambda/lambda_opt(P), y = eps/eps_opt(P) (Eq. 5), points with
    lo <= x <= hi (None = open), least-squares line of ln y on ln x, sigma_i its standard error
    (residual variance / (n - 2)). gamma1 = mean of -slope_i; sigma1 = sqrt(sum sigma_i^2 / n),
    as ``fit_phi`` in the authors' notebook (it reproduces their stored sigma1; Appendix D's
    text says "error of the mean", stored as detail.sigma_error_of_mean).

    Raises:
      ValueError: a P has fewer than 3 points in the window.
    """
    lo, hi = window
    optd = opt_P.set_index("P")
    per = []
    for P in P_used:
        c = curves[P]
        x = c["lam"].to_numpy() / optd.loc[P, "lambda_opt"]
        y = c["eps"].to_numpy() / optd.loc[P, "eps_opt"]
        m = np.isfinite(y) & (x > 0) & (y > 0)
        if lo is not None:
            m &= x >= lo
        if hi is not None:
            m &= x <= hi
        if m.sum() < 3:
            raise ValueError(f"P={P}: {int(m.sum())} points inside gamma1_window={window}; "
                             "a slope with an error needs >= 3")
        f = fit_power_law(x[m], y[m], with_q=False)
        per.append({"P": int(P), "gamma1": -f.a, "sigma": f.sigma_a, "k": f.k,
                    "x_range": list(f.x_range), "n_points": f.n_points})
    g = np.array([p["gamma1"] for p in per])
    s = np.array([p["sigma"] for p in per])
    return Exponent(value=float(g.mean()), sigma=float(math.sqrt(np.sum(s ** 2) / s.size)),
                    method=f"authors' procedure: mean over P >= p_min of log-log slopes of "
                           f"eps/eps_opt vs lambda/lambda_opt in window {list(window)}; "
                           "sigma1 = sqrt(sum sigma_i^2 / n)", n=int(g.size),
                    detail={"per_P": per, "window": list(window),
                            "sigma_error_of_mean": float(g.std(ddof=1) / math.sqrt(g.size))
                            if g.size > 1 else None,
                            "sigma_sqrt_sum_over_n": float(math.sqrt(np.sum(s ** 2)) / s.size)})


def fit_gamma2(opt_P: pd.DataFrame, P_used: Sequence[int], *, column: str = "lambda_opt",
               require_bracketed: bool = True, with_q: bool | str = "auto",
               alpha: float = Q_ALPHA, method: str | None = None,
               average_q: bool = False) -> Exponent:
    """Eq. 4, lambda_opt = k2 P^gamma2 + q2, fitted in log space over P in ``P_used``.

    One point per P (the optimum of its seed-mean curve); the slope's error comes from the
    scatter of the points about the law (whatever its source: seeds, noise, grid). With
    ``require_bracketed`` only P whose minimum is bracketed enter; fewer than MIN_P_FIT (3)
    such P -> not determined, with the reason.

    Args:
      opt_P: from :func:`optimum_per_P`.
      column: "lambda_opt", "lambda_argmin" or "lambda_seed_argmins".
    """
    method = method or (f"log-space fit of Eq. 4 on {column}(P) of the bracketed minima, "
                        "q2 by F test; sigma from the scatter across P")
    sub = opt_P[opt_P["P"].isin(list(P_used))]
    if column not in sub.columns:
        return Exponent.undetermined(method, f"no {column} in the data (per-seed curves needed)")
    nb = [int(p) for p in sub.loc[~sub["bracketed"].astype(bool), "P"]]
    if require_bracketed:
        sub = sub[sub["bracketed"].astype(bool)]
    if len(sub) < MIN_P_FIT:
        why = (f"only {len(sub)} usable values of P (need {MIN_P_FIT})"
               + (f"; minimum not bracketed (lambda_opt only bounded below by the last "
                  f"evaluation) at P = {nb}" if nb else ""))
        return Exponent.undetermined(method, why, n=len(sub))
    e = fit_exponent(sub["P"].to_numpy(float), sub[column].to_numpy(float), sign=+1,
                     method=method, with_q=with_q, alpha=alpha, average_q=average_q,
                     detail={"P": [int(p) for p in sub["P"]], "unbracketed_P": nb})
    if nb and not require_bracketed:
        e = dataclasses.replace(e, reason=f"includes unbracketed minima (lower bounds) at P = {nb}")
    return e


def _fit_fixed_q(x, y, q, sigma_q, sign, method, detail) -> Exponent | None:
    """y = k x^(sign gamma) + q with q known (error sigma_q): a line through ln(y - q)."""
    if not np.all(y - q - abs(sigma_q) > 0):
        return None
    f = fit_power_law(x, y - q, with_q=False)
    shift = [fit_power_law(x, y - (q + d), with_q=False).a for d in (sigma_q, -sigma_q)]
    s_q = abs(shift[0] - shift[1]) / 2.0  # q's own error, propagated
    r = np.log(y) - np.log(f.k * x ** f.a + q)
    resid = math.sqrt(float(r @ r) / max(x.size - 2, 1))
    return Exponent(value=sign * f.a, sigma=math.hypot(f.sigma_a, s_q), method=method,
                    n=f.n_points, k=f.k, q=q, sigma_q=sigma_q, q_kept=True,
                    q_test={"fixed": "q1 of Eq. 3 (Eq. 6 has the same floor)",
                            "sigma_from_q": s_q}, chi2_red=f.chi2_red, cov=f.cov,
                    resid_sd=resid, x_range=list(f.x_range), detail=detail)


def fit_gamma_eps(opt_P: pd.DataFrame, P_used: Sequence[int], column: str = "eps_opt", *,
                  with_q: bool | str = "auto", alpha: float = Q_ALPHA,
                  require_bracketed: bool | None = None,
                  q1: tuple[float, float] | None = None, average_q: bool = False) -> Exponent:
    """eps(P) = k P^-gamma + q (Eq. 6 / Fig. 9) in log space: gamma_opt or gamma_end.

    Args:
      opt_P: from :func:`optimum_per_P`.
      column: "eps_opt" (error at the optimum, Eq. 6's quantity: gamma_opt; only bracketed
        minima by default) or "eps_end" (error at the last evaluation: gamma_end).
      q1: (q1, sigma_q1) of Eq. 3 when its fit kept a floor: Eq. 6 has the same q1, so it is
        used as the known q here (its error propagated) instead of a q of this fit's own; with
        5-8 values of P the F test alone rarely detects it.

    Raises:
      ValueError: an unknown column.
    """
    if column not in ("eps_end", "eps_opt", "eps_argmin"):
        raise ValueError(f"column must be 'eps_opt', 'eps_argmin' or 'eps_end', got {column!r}")
    req = (column == "eps_opt") if require_bracketed is None else require_bracketed
    method = {"eps_opt": "log-space fit of eps_opt(P) (Eq. 6 at the optimum), q by F test",
              "eps_argmin": "log-space fit of eps at the grid arg-min vs P",
              "eps_end": "log-space fit of eps at the last evaluation vs P, q by F test"}[column]
    sub = opt_P[opt_P["P"].isin(list(P_used))]
    nb = [int(p) for p in sub.loc[~sub["bracketed"].astype(bool), "P"]]
    if req:
        sub = sub[sub["bracketed"].astype(bool)]
    if len(sub) < MIN_P_FIT:
        why = (f"only {len(sub)} usable values of P (need {MIN_P_FIT})"
               + (f"; minimum not bracketed at P = {nb}" if nb and req else ""))
        return Exponent.undetermined(method, why, n=len(sub))
    detail = {"quantity": column, "P": [int(p) for p in sub["P"]]}
    if q1 is not None and with_q == "auto":
        e = _fit_fixed_q(sub["P"].to_numpy(float), sub[column].to_numpy(float), q1[0], q1[1],
                         -1, method.replace("q by F test", "q = q1 of Eq. 3"), detail)
        if e is not None:
            return e
    return fit_exponent(sub["P"].to_numpy(float), sub[column].to_numpy(float), sign=-1,
                        method=method, with_q=with_q, alpha=alpha, detail=detail,
                        average_q=average_q)


# ----------------------------------------------------------------------------------------------
# Censored (Tobit) power law: unbracketed minima as bounds
# ----------------------------------------------------------------------------------------------

def _censored_nll(p, lx, ly, cens, bound, m2):
    """Negative log-likelihood of ln y = c + a ln x + e, e ~ N(0, s^2 + m_i^2), s = exp(p[2]).

    Observed points (cens False) enter as Gaussian densities; censored ones as the probability
    of lying beyond their bound: bound = +1, the true ln y >= ly (a lower bound); -1, <= ly."""
    mu = p[0] + p[1] * lx
    sd = np.sqrt(math.exp(2.0 * p[2]) + m2)
    z = (ly - mu) / sd
    obs = ~cens
    nll = float(np.sum(0.5 * z[obs] ** 2 + np.log(sd[obs]))) + 0.5 * math.log(2 * math.pi) * obs.sum()
    if cens.any():
        nll -= float(np.sum(stats.norm.logcdf(-bound * z[cens])))
    return nll


def fit_censored_power_law(x, y, censored, *, bound: int, sigma_meas=None, method: str,
                           sign: int, detail: dict | None = None, min_observed: int = 2,
                           span: float = 3.0) -> Exponent:
    """y = k x^(sign gamma) with some y only bounded (Tobit maximum likelihood in log space).

    A minimum that training did not bracket is a censored observation: lambda_opt(P) >= the
    lambda of the curve's lowest point (``bound=+1``), eps_opt(P) <= the error there
    (``bound=-1``). The model is ln y_i = ln k + a ln x_i + e_i with e_i ~ N(0, s^2 + m_i^2):
    s the scatter about the law (fitted), m_i each point's own measurement error
    (``sigma_meas``, in ln units: the vertex error or the grid step / sqrt(12)). Observed points
    contribute Gaussian densities, censored ones the probability of lying beyond their bound
    (Tobin 1958; the survival term). ln k, a, ln s by maximum likelihood.

    Error of a: the profile likelihood (ln k and ln s re-maximized on a grid of a): the half
    width of the interval where 2 (nll(a) - nll_min) <= 1, scaled by the Student-t quantile
    t_0.8413(n - 3) (the ML scatter s is biased low with a few points), so that +-sigma is a
    68 % interval; the observed-information error is in ``detail.sigma_information``.

    Determined when >= ``min_observed`` points are observed, >= 3 in all, and the profile
    likelihood closes on both sides within ``span`` of the estimate; otherwise not determined,
    with the reason (e.g. every point censored: the bounds alone do not bound gamma).

    Args:
      x, y: shape [n], positive.
      censored: bool [n], True where y is only a bound.
      bound: +1 (censored y are lower bounds) or -1 (upper bounds).
      sigma_meas: per-point errors of ln y, [n] (None: 0).
      sign: +1 for growing laws (returns gamma = a), -1 for decaying ones (gamma = -a).

    Returns:
      :class:`Exponent` (k, cov of [ln k, a], resid_sd = s, detail with the censored points).

    Raises:
      ValueError: a bad ``bound`` or mismatched shapes.
    """
    if bound not in (1, -1):
        raise ValueError(f"bound must be +1 or -1, got {bound!r}")
    x, y = np.asarray(x, float), np.asarray(y, float)
    cens = np.asarray(censored, bool)
    m = np.zeros_like(x) if sigma_meas is None else np.nan_to_num(np.asarray(sigma_meas, float))
    if not (x.shape == y.shape == cens.shape == m.shape):
        raise ValueError("x, y, censored and sigma_meas must have the same shape")
    lx, ly, m2 = np.log(x), np.log(y), m * m + 1e-8
    n_obs, n = int((~cens).sum()), int(x.size)
    detail = {**(detail or {}), "n_observed": n_obs, "n_censored": n - n_obs,
              "bound": "lower" if bound > 0 else "upper"}
    if n_obs < min_observed or n < MIN_P_FIT:
        return Exponent.undetermined(method, f"{n_obs} observed and {n - n_obs} censored points: "
                                     f"need >= {min_observed} observed and >= {MIN_P_FIT} in all",
                                     n=n)
    X = np.column_stack([np.ones(n), lx])
    c0, *_ = np.linalg.lstsq(X[~cens], ly[~cens], rcond=None)
    r0 = ly[~cens] - X[~cens] @ c0
    p0 = np.array([c0[0], c0[1], math.log(max(float(np.std(r0)), 0.02))])
    nll = lambda p: _censored_nll(p, lx, ly, cens, bound, m2)  # noqa: E731
    best = None
    for start in (p0, p0 + [0.0, 0.0, 1.0], np.array([*np.linalg.lstsq(X, ly, rcond=None)[0], 0.0])):
        r = optimize.minimize(nll, start, method="Nelder-Mead",
                              options={"xatol": 1e-7, "fatol": 1e-9, "maxiter": 4000})
        if best is None or r.fun < best.fun:
            best = r
    ph, fmin = best.x, float(best.fun)

    def profile(a):
        r = optimize.minimize(lambda q: nll([q[0], a, q[1]]), [ph[0] + (ph[1] - a) * lx.mean(), ph[2]],
                              method="Nelder-Mead", options={"xatol": 1e-7, "fatol": 1e-9})
        return float(r.fun) - fmin

    ends = []
    for d in (-1.0, 1.0):  # where 2 delta nll = 1, bisection on the profile
        lo_, hi_ = 0.0, None
        step = 0.02
        while step <= span:
            if profile(ph[1] + d * step) >= 0.5:
                hi_ = step
                break
            lo_, step = step, step * 2.0
        if hi_ is None:
            return Exponent.undetermined(
                method, f"the likelihood does not bound the exponent on the "
                f"{'low' if d * sign < 0 else 'high'} side ({n_obs} observed, {n - n_obs} censored "
                f"points)", n=n)
        for _ in range(30):
            mid = 0.5 * (lo_ + hi_)
            lo_, hi_ = (mid, hi_) if profile(ph[1] + d * mid) < 0.5 else (lo_, mid)
        ends.append(0.5 * (lo_ + hi_))
    dof = max(n - 3, 1)
    t = float(stats.t.ppf(stats.norm.cdf(1.0), dof))
    sig = 0.5 * (ends[0] + ends[1]) * t
    # observed information (numerical Hessian of nll in (ln k, a, ln s))
    h = 1e-4
    H = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            e_i, e_j = np.eye(3)[i] * h, np.eye(3)[j] * h
            H[i, j] = (nll(ph + e_i + e_j) - nll(ph + e_i - e_j) - nll(ph - e_i + e_j)
                       + nll(ph - e_i - e_j)) / (4 * h * h)
    def _inv(A):
        try:
            C = np.linalg.inv(A)
        except np.linalg.LinAlgError:
            return None
        return C if np.all(np.isfinite(C)) and np.all(np.diag(C) > 0) else None

    cov = _inv(H)
    if cov is None:
        # The scatter at its lower boundary (s << the points' own errors m_i, e.g. a line through
        # two observed points with the bounds slack): nll is flat in ln s, so H is singular there.
        # s is then not a free parameter; the (ln k, a) block with s held at its estimate is the
        # information of the law itself.
        cov = _inv(H[:2, :2])
    s_info = float(math.sqrt(cov[1, 1])) if cov is not None else None
    s_hat = math.exp(ph[2])
    ratio = (sig / t) / s_info if s_info else 1.0
    cov2 = (cov[:2, :2] * ratio ** 2).tolist() if cov is not None else None
    viol = [int(i) for i in np.flatnonzero(cens & (bound * (ph[0] + ph[1] * lx - ly) < 0))]
    detail.update(sigma_information=s_info, sigma_profile=0.5 * (ends[0] + ends[1]),
                  profile_ends=[float(ph[1] - ends[0]), float(ph[1] + ends[1])], t_factor=t,
                  scatter=s_hat, censored_x=[float(v) for v in x[cens]],
                  censored_bounds=[float(v) for v in y[cens]],
                  bounds_below_law=[float(x[i]) for i in viol], nll=fmin)
    return Exponent(value=sign * float(ph[1]), sigma=float(sig), method=method, n=n,
                    k=float(math.exp(ph[0])), chi2_red=None, cov=cov2, resid_sd=s_hat,
                    x_range=[float(x.min()), float(x.max())], detail=detail)


# ----------------------------------------------------------------------------------------------
# Collapse (Eq. 5)
# ----------------------------------------------------------------------------------------------

def rescaled_curves(curves: dict, opt_P: pd.DataFrame, P_used: Iterable[int] | None = None) -> dict:
    """{P: (x, y)} with x = lambda/lambda_opt(P), y = eps/eps_opt(P) (Eq. 5), seed-mean curves.

    ``opt_P`` is the per-P table of :func:`optimum_per_P` (columns P, lambda_opt, eps_opt).
    """
    optd = opt_P.set_index("P")
    P_used = sorted(curves) if P_used is None else P_used
    return {P: (curves[P]["lam"].to_numpy() / optd.loc[P, "lambda_opt"],
                curves[P]["eps"].to_numpy() / optd.loc[P, "eps_opt"]) for P in P_used}


def collapse_quality(resc: dict, n_grid: int = 60) -> dict:
    """Spread of the rescaled curves on a common log grid (quality of the collapse of Eq. 5).

    On a log10 grid of x = lambda/lambda_opt, each curve is interpolated in (log10 x, log10 y)
    where it has data; spread(x) is the standard deviation across P where >= 2 curves overlap.
    Per P, rms_dev is the rms of its log10 y minus the median of the other curves.

    Returns:
      dict spread_mean, spread_max (log10 units: 0.01 ~ 2.3 %), grid_log10x [min, max],
      n_grid_used, per_P: {P: rms_dev}.
    """
    Ps = sorted(resc)
    if len(Ps) < 2:
        return {"spread_mean": None, "spread_max": None, "grid_log10x": None, "n_grid_used": 0,
                "per_P": {}, "note": "collapse needs >= 2 values of P"}
    lx = {P: np.log10(resc[P][0]) for P in Ps}
    lo = min(a.min() for a in lx.values())
    hi = max(a.max() for a in lx.values())
    grid = np.linspace(lo, hi, n_grid)
    Y = np.full((len(Ps), n_grid), np.nan)
    for r, P in enumerate(Ps):
        o = np.argsort(lx[P])
        xs, ys = lx[P][o], np.log10(resc[P][1])[o]
        inside = (grid >= xs[0]) & (grid <= xs[-1])
        Y[r, inside] = np.interp(grid[inside], xs, ys)
    cnt = np.sum(np.isfinite(Y), axis=0)
    use = cnt >= 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        spread = np.nanstd(Y[:, use], axis=0, ddof=1)
        per = {}
        for r, P in enumerate(Ps):
            others = np.nanmedian(np.delete(Y, r, axis=0), axis=0)
            d = Y[r] - others
            d = d[np.isfinite(d)]
            per[int(P)] = float(np.sqrt(np.mean(d ** 2))) if d.size else None
    return {"spread_mean": _f(np.mean(spread)) if spread.size else None,
            "spread_max": _f(np.max(spread)) if spread.size else None,
            "grid_log10x": [float(grid[use].min()), float(grid[use].max())] if use.any() else None,
            "n_grid_used": int(use.sum()), "per_P": per, "units": "log10"}


def choose_p_min(curves: dict, opt_P: pd.DataFrame, tol: float = 0.08, min_P: int = 3) -> dict:
    """Smallest P from which on every curve collapses onto the larger-P ones (Appendix D, step 1).

    Walking from the largest P down, a P is accepted while the rms (log10) deviation of its
    rescaled curve from the median rescaled curve of the larger P (where they overlap) stays
    below ``tol``; at least ``min_P`` values are always kept.

    Returns:
      dict p_min, deviations {P: rms log10 deviation from the larger-P curves}, tol.
    """
    Ps = sorted(curves)
    resc = rescaled_curves(curves, opt_P, Ps)
    devs = {}
    p_min = Ps[-1]
    for idx in range(len(Ps) - 2, -1, -1):
        P = Ps[idx]
        d = _dev_from(resc[P], [resc[Q] for Q in Ps[idx + 1:]])
        devs[int(P)] = d
        if d is not None and d > tol:
            break
        p_min = P
    kept = [P for P in Ps if P >= p_min]
    if len(kept) < min(min_P, len(Ps)):
        p_min = Ps[-min(min_P, len(Ps))]
    return {"p_min": int(p_min), "deviations": devs, "tol": tol}


def _dev_from(curve, refs, n_grid=40):
    lx, ly = np.log10(curve[0]), np.log10(curve[1])
    o = np.argsort(lx)
    lx, ly = lx[o], ly[o]
    grid = np.linspace(lx[0], lx[-1], n_grid)
    R = np.full((len(refs), n_grid), np.nan)
    for r, (x, y) in enumerate(refs):
        rx, ry = np.log10(x), np.log10(y)
        oo = np.argsort(rx)
        rx, ry = rx[oo], ry[oo]
        inside = (grid >= rx[0]) & (grid <= rx[-1])
        R[r, inside] = np.interp(grid[inside], rx, ry)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(R, axis=0)
    d = np.interp(grid, lx, ly) - med
    d = d[np.isfinite(d)]
    return float(np.sqrt(np.mean(d ** 2))) if d.size >= 3 else None


# ----------------------------------------------------------------------------------------------
# The whole analysis
# ----------------------------------------------------------------------------------------------

def _check_choices(p_min, gamma1_window, optimum, Ps):
    if optimum not in ("vertex", "argmin"):
        raise ValueError(f"optimum must be 'vertex' or 'argmin', got {optimum!r}")
    if gamma1_window is not None:
        ok = isinstance(gamma1_window, (tuple, list)) and len(gamma1_window) == 2 and all(
            w is None or (isinstance(w, (int, float)) and w > 0) for w in gamma1_window)
        if ok and None not in gamma1_window:
            ok = gamma1_window[0] < gamma1_window[1]
        if not ok:
            raise ValueError(f"gamma1_window must be (lo, hi) with 0 < lo < hi on lambda/lambda_opt "
                             f"(None = open), got {gamma1_window!r}")
    if p_min is not None:
        if not isinstance(p_min, (int, np.integer)) or p_min <= 0:
            raise ValueError(f"p_min must be a positive integer, got {p_min!r}")
        if p_min > Ps[-1]:
            raise ValueError(f"p_min={p_min} exceeds the largest P in the data; P values: {Ps}")


def _core(d: pd.DataFrame, P_used: Sequence[int], *, gamma1_window, optimum, alpha, elbow_kw,
          log=None) -> dict:
    """Every exponent for one cleaned frame at a fixed P set (also used by the bootstrap)."""
    seed_opt = optima(d, method=optimum)
    curves = mean_curves(d)
    opt_P = optimum_per_P(curves, optimum, seed_opt)
    if optimum == "vertex":
        opt_P = _joint(curves, opt_P, P_used)
    P_used = [P for P in P_used if P in curves]
    out: dict[str, Any] = {"curves": curves, "opt_P": opt_P, "seed_opt": seed_opt}
    authors = optimum == "argmin"
    if gamma1_window is not None:
        try:
            out["gamma1"] = fit_gamma1_window(curves, opt_P, P_used, tuple(gamma1_window), log=log)
        except ValueError as e:
            out["gamma1"] = Exponent.undetermined("authors' window", str(e))
        out["gamma1_appendix_d"] = out["gamma1"]
    else:
        def gamma1_auto(force_q1=False, log=log):
            col = fit_gamma1_collapse(curves, opt_P, P_used, alpha=alpha, log=log,
                                      force_q1=force_q1) \
                if optimum == "vertex" and not elbow_kw else None
            return col if col is not None else fit_gamma1(
                curves, P_used, log=log, alpha=alpha, force_q1=force_q1, **elbow_kw)
        out["gamma1"], out["gamma1_appendix_d"] = gamma1_auto()
    if authors:
        # The authors' gamma2: a plain log-log line through the grid arg-mins of P >= p_min.
        out["gamma2"] = fit_gamma2(opt_P, P_used, require_bracketed=False, with_q=False,
                                   method="authors' procedure: log-log line of the grid arg-min "
                                          "lambda_opt(P) over P >= p_min; standard error of the slope")
        out["gamma_opt"] = fit_gamma_eps(opt_P, P_used, "eps_opt", with_q=False,
                                         require_bracketed=False)
    else:
        g1 = out["gamma1"]
        q1 = (g1.q, g1.sigma_q) if g1.determined and g1.q_kept else None
        out["gamma2_bracketed"] = out["gamma2"] = fit_gamma2(opt_P, P_used, alpha=alpha,
                                                             average_q=True)
        out["gamma_opt_bracketed"] = out["gamma_opt"] = fit_gamma_eps(
            opt_P, P_used, "eps_opt", alpha=alpha, q1=q1, average_q=True)
        sub = opt_P[opt_P["P"].isin(list(P_used))]
        if not sub["bracketed"].astype(bool).all():
            (out["gamma2"], out["gamma_opt"], out["gamma2_end_convention"],
             out["gamma_opt_end_convention"], out["gamma2_onset"]) = _censored_laws(sub)
    out["gamma2_argmin"] = fit_gamma2(
        opt_P, P_used, column="lambda_argmin", require_bracketed=False, with_q=False,
        method="Appendix D definition: log-log line of the seed-mean curve's grid arg-min vs P")
    out["gamma2_seed_argmins"] = fit_gamma2(
        opt_P, P_used, column="lambda_seed_argmins", require_bracketed=False, with_q=False,
        method="authors' gamma2 input: log-log line of the mean over seeds of each seed's "
               "grid arg-min lambda vs P")
    for k in ("gamma2_bracketed", "gamma_opt_bracketed", "gamma2_end_convention",
              "gamma_opt_end_convention", "gamma2_onset"):
        # Every minimum bracketed (or the authors' argmin): no censored point, so gamma2_bracketed and
        # gamma2_onset are gamma2 itself; the end-of-training conventions are the grid arg-min fits.
        out.setdefault(k, out["gamma2"] if k in ("gamma2_bracketed", "gamma2_onset") else
                       out["gamma_opt"] if k.startswith("gamma_opt") else out["gamma2_argmin"])
    g1 = out["gamma1"]
    out["gamma_end"] = fit_gamma_eps(opt_P, P_used, "eps_end", alpha=alpha,
                                     with_q=False if authors else "auto", average_q=not authors,
                                     q1=(g1.q, g1.sigma_q) if g1.determined and g1.q_kept else None)
    if not authors:
        for k in ("gamma2", "gamma2_bracketed", "gamma_opt", "gamma_opt_bracketed", "gamma_end"):
            out[k] = _t_scaled(out[k])
    cand = ((g1.q_test or {}).get("q1_candidate") or {}) if g1.determined and not g1.q_kept else {}
    go = out["gamma_opt"]
    if (not authors and gamma1_window is None and cand and go.determined and not go.q_kept
            and (go.detail or {}).get("t_factor") is not None):
        # gamma1's fit kept no floor, but Eq. 3's pooled points admit a q1 > 0. Eq. 6 has the
        # same q1, so the eps_opt(P) points are evidence too: their joint weight w
        # (_joint_q1_weight) decides. w >= Q1_JOINT_KEEP: gamma_opt is the fit over that floor
        # (and gamma1 refitted with one); Q1_JOINT_AVERAGE <= w < Q1_JOINT_KEEP: the fits without
        # it; in both, sigma carries the other model (same weights); below, the floor has no
        # support (BIC's Occam factor alone gives a useless parameter w ~ 0.1) and nothing
        # changes.
        alt = fit_gamma_eps(opt_P, P_used, "eps_opt", alpha=alpha,
                            q1=(cand["q1"], cand["sigma_q1"]))
        w = None
        if alt.determined and alt.q_kept and alt.n >= MIN_P_FIT:
            x = np.asarray(alt.detail["P"], float)
            y = opt_P.set_index("P").loc[alt.detail["P"], "eps_opt"].to_numpy(float)
            f0 = fit_power_law(x, y, with_q=False)
            n_o = int(x.size)
            w, ev = _joint_q1_weight(cand, n_o, f0.chi2_red * (n_o - 2),
                                     alt.resid_sd ** 2 * (n_o - 2))
        if w is not None:
            alt = _t_scaled(alt)
            # (a censored gamma_opt keeps its value: the floor fit has the bracketed P only)
            keep = w >= Q1_JOINT_KEEP and not (go.detail or {}).get("censored_P")
            averaged = w >= Q1_JOINT_AVERAGE
            sel, other, w_other = (alt, go, 1.0 - w) if keep else (go, alt, w)
            sig = (_averaged_sigma((sel.value, sel.sigma), (other.value, other.sigma), w_other)
                   if averaged else sel.sigma)
            # The other law stays in detail at every w: predict() carries it (w_alternative).
            method = sel.method + (f"; floor q1 of Eq. 3 kept by the joint evidence of Eq. 3 and "
                                   f"Eq. 6 (w = {w:.3f})" if keep else "")
            out["gamma_opt"] = dataclasses.replace(sel, sigma=sig, method=method, detail={
                **sel.detail, "q1_model_average": {
                    "w_q1": w, "w_q1_eq3_only": cand["w_q"], "evidence_eps_opt": ev,
                    "q1": [cand["q1"], cand["sigma_q1"]], "floor_kept": keep,
                    "sigma_averaged": averaged, "sigma_selected": sel.sigma,
                    "w_alternative": w_other, "alternative": [other.value, other.sigma],
                    "alternative_law": {"value": other.value, "k": other.k, "q": other.q,
                                        "cov": other.cov, "resid_sd": other.resid_sd,
                                        "n": other.n, "determined": True}}})
            if out["gamma_opt_bracketed"] is go:
                out["gamma_opt_bracketed"] = out["gamma_opt"]
            if keep:
                # Eq. 3 shares the floor: gamma1 is refitted over it (same windows), its sigma
                # averaged with the no-floor fit's (weight 1 - w).
                g1q = gamma1_auto(force_q1=True, log=None)[0]
                if g1q.determined and g1q.q_kept:
                    out["gamma1"] = dataclasses.replace(g1q, sigma=_averaged_sigma(
                        (g1q.value, g1q.sigma), (g1.value, g1.sigma), 1.0 - w),
                        detail={**g1q.detail, "q1_joint": {
                            "w_q1": w, "sigma_selected": g1q.sigma,
                            "without_q1": [g1.value, g1.sigma]}})
    out["gamma_pred"] = product_exponent(out["gamma1"], out["gamma2"],
                                         "gamma1 * gamma2; sigma as Appendix D")
    out["gamma_pred_onset"] = product_exponent(
        out["gamma1"], out["gamma2_onset"],
        "gamma1 * gamma2_onset (saturation-onset convention); sigma as Appendix D")
    gm = out["gamma_opt"] if out["gamma_opt"].determined else out["gamma_end"]
    on = "eps_opt" if out["gamma_opt"].determined else "eps_end"
    out["gamma_meas"] = dataclasses.replace(
        gm, method=f"gamma_meas on {on}: " + gm.method,
        detail={**(gm.detail or {}), "quantity": on})
    return out


# Weight w of a floor q1 > 0 that Eq. 3's own rule did not keep, from the evidence of Eq. 3's
# pooled windows and eps_opt(P), which share q1 (_joint_q1_weight): from Q1_JOINT_KEEP on gamma_opt
# is fitted over that floor (gamma1 refitted with one), from Q1_JOINT_AVERAGE on sigma carries
# the floor's model uncertainty (below, the floor has no support: BIC's Occam factor alone gives
# a useless parameter w ~ 0.1).
Q1_JOINT_KEEP = 0.9
Q1_JOINT_AVERAGE = 0.2


def _joint_q1_weight(cand: dict, n_o: int, sse0: float, sse1: float) -> tuple[float | None, float]:
    """Weight w of "Eq. 3 and Eq. 6 share the floor cand["q1"] > 0" against "no floor".

    Eq. 3's pooled early windows (``cand``: n points, residual sums of squares of the fits
    without and with q1) and the eps_opt(P) points (n_o; residual sums of squares of the pure
    power law, sse0, and of the law over the floor cand["q1"], sse1: the floor costs no
    parameter there) are independent data, each with its own variance (profiled out). Delta IC
    = n ln(sse_with / sse_without) + penalty(n) + (n_o - 2) ln(sse1 / sse0): the price of the one
    extra parameter as in :func:`_q_weight` (the harsher of AICc and BIC); the eps_opt(P) term is
    the restricted (REML) likelihood, both laws having the same two parameters: with 4-6 P the
    plain n_o ln(...) counts 2-4 residual degrees of freedom as n_o and kept a floor that was not
    there in 4 of the study's 50 saturating held-out fits (4 P; z_eps down to -9).
    w = 1 / (1 + exp(Delta IC / 2)).

    Returns:
      (w or None when undefined, the eps_opt(P) term (n_o - 2) ln(sse1 / sse0)).
    """
    n = int(cand["n"])
    if n - 4 <= 0 or not (cand["sse_without"] > 0 and cand["sse_with"] > 0 and sse0 > 0
                          and sse1 > 0):
        return None, float("nan")
    pen = max(2 + 24 / (n - 4) - 12 / (n - 3), math.log(n))
    ev = (n_o - 2) * math.log(sse1 / sse0)
    d = n * math.log(cand["sse_with"] / cand["sse_without"]) + pen + ev
    return float(1.0 / (1.0 + math.exp(min(d / 2.0, 700.0)))), float(ev)


def _t_scaled(e: Exponent) -> Exponent:
    """A least-squares exponent whose sigma comes from the scatter of n points (n - n_par
    degrees of freedom) with sigma scaled by the Student-t quantile t_0.8413(dof), so that
    +-sigma is a 68 % interval (x1.32 at 2 dof, x1.14 at 4, x1.09 at 6); the unscaled sigma
    stays in ``detail.sigma_unscaled``. Censored fits (already scaled) and undetermined
    exponents pass unchanged."""
    if not e.determined or e.cov is None or (e.detail or {}).get("t_factor") is not None:
        return e
    dof = max(e.n - len(e.cov), 1)
    t = float(stats.t.ppf(stats.norm.cdf(1.0), dof))
    return dataclasses.replace(e, sigma=e.sigma * t, detail={**(e.detail or {}), "t_factor": t,
                                                             "sigma_unscaled": e.sigma})


def _censored_laws(sub: pd.DataFrame) -> tuple[Exponent, Exponent, Exponent, Exponent, Exponent]:
    """gamma2 and gamma_opt with the unbracketed minima as censored points, the
    end-of-training convention fits of gamma2 and gamma_opt (the paper's: the lowest point taken
    as the minimum, its lambda as lambda_opt and its error as eps_opt), and gamma2 in the
    saturation-onset convention (:func:`_onset_law`).

    An unbracketed minimum bounds the optimum (training stopped while eps was falling or
    flat): lambda_opt(P) >= ``lambda_bound``, the first point whose error is within the
    bracketing tolerance max(3 noise, 1 %) of the lowest one (on a flat end the lowest point
    itself may lie past the true minimum: taking it as the bound biased gamma2 by +0.7 sigma in
    the study), and eps_opt(P) <= the lowest error. Both laws are fitted by
    :func:`fit_censored_power_law` (bracketed P: vertex value and error; censored P: the bound,
    error grid step / sqrt(12) resp. the curve noise). Every P is listed in
    ``detail``. The value is reported only when the likelihood determines it (>= 2 bracketed P,
    a closed profile likelihood); with every minimum censored gamma2 is not determined and
    ``detail.lambda_opt_lower_bounds`` gives what the data do say.

    Args:
      sub: rows of :func:`optimum_per_P` for P >= p_min.
    """
    br = sub["bracketed"].astype(bool).to_numpy()
    P = sub["P"].to_numpy(float)
    step = np.nan_to_num(sub["grid_step"].to_numpy(float)) / math.sqrt(12.0)
    lam = np.where(br, sub["lambda_opt"], sub["lambda_bound"]).astype(float)
    s_lam = np.where(br, np.nan_to_num(sub["sigma_ln_lambda_opt"].to_numpy(float)), step)
    eps = np.where(br, sub["eps_opt"], sub["eps_argmin"]).astype(float)
    s_eps = np.where(br, np.nan_to_num(sub["sigma_ln_eps_opt"].to_numpy(float)),
                     np.nan_to_num(sub["noise"].to_numpy(float)))
    det = {"P": [int(p) for p in P], "censored_P": [int(p) for p in P[~br]]}
    g2 = fit_censored_power_law(
        P, lam, ~br, bound=+1, sigma_meas=s_lam, sign=+1, detail=dict(det),
        method="censored (Tobit) maximum-likelihood fit of Eq. 4 in log space: bracketed "
               "minima as Gaussian points, unbracketed ones as lower bounds lambda_opt(P) >= "
               "lambda_bound (first point within noise of the lowest); scatter fitted; sigma: "
               "profile likelihood, Student t")
    bounds = {int(p): float(v) for p, v, b in zip(P, lam, br) if not b}
    if not g2.determined:
        g2 = dataclasses.replace(
            g2, reason=f"{g2.reason}; minimum not bracketed at P = {det['censored_P']}: "
                       "lambda_opt only bounded below there (detail.lambda_opt_lower_bounds)",
            detail={**det, "lambda_opt_lower_bounds": bounds, "n_bracketed": int(br.sum())})
    go = fit_censored_power_law(
        P, eps, ~br, bound=-1, sigma_meas=s_eps, sign=-1, detail=dict(det),
        method="censored (Tobit) maximum-likelihood fit of eps_opt(P) (Eq. 6 at the optimum): "
               "unbracketed minima as upper bounds eps_opt(P) <= eps at the lowest point; no q; "
               "sigma: profile likelihood, Student t")
    lam_low = np.where(br, sub["lambda_opt"], sub["lambda_argmin"]).astype(float)
    end = fit_exponent(P, lam_low, sign=+1, with_q=False,
                       method="end-of-training convention (the paper's): log-log line of "
                              "lambda_opt(P), the lowest point's lambda where the minimum is not "
                              "bracketed (a lower bound used as a value)",
                       detail={**det, "note": "unbracketed minima used as if they were minima"})
    onset = _onset_law(sub, det)
    eps_low = np.where(br, sub["eps_opt"], sub["eps_argmin"]).astype(float)
    end_eps = fit_exponent(P, eps_low, sign=-1, with_q=False,
                           method="end-of-training convention for eps_opt(P): log-log line of "
                                  "eps_opt(P), the lowest error where the minimum is not "
                                  "bracketed (an upper bound used as a value)",
                           detail={**det, "note": "unbracketed minima used as if they were minima"})
    return g2, go, end, end_eps, onset


ONSET_METHOD = ("saturation-onset convention: lambda_opt(P) = the vertex where the minimum is "
                "bracketed, the first point within noise of the lowest (lambda_bound) where the "
                "curve has provably saturated (optima.saturated); log-log line vs P, sigma "
                "Student-t scaled")


def _onset_law(sub: pd.DataFrame, det: dict) -> Exponent:
    """gamma2 in the saturation-onset convention (a reported alternative, not the headline).

    Sec. 3.1 trains "large enough to see the test error overfit or saturate". On a saturated
    curve (no significant fall over its last evaluations, :func:`saturation`) the lowest
    error is reached, within noise, from ``lambda_bound`` on, so that first point is where the
    curve's optimum begins; the point where the (flat) curve happens to be lowest, or its end,
    measures only how long training went on (the end-of-training convention). Undetermined when
    some P of the fit is neither bracketed nor saturated (still falling: its optimum lies beyond
    the data). Caveat: added after a LeNet-5 run in which every curve saturated; unlike the
    censored fit's, its bias and coverage have not been studied.
    """
    br = sub["bracketed"].astype(bool).to_numpy()
    sat = (sub["saturated"].to_numpy() if "saturated" in sub.columns
           else np.full(len(sub), None, dtype=object))
    P = sub["P"].to_numpy(float)
    open_P = [int(p) for p, b, s_ in zip(P, br, sat) if not b and not (pd.notna(s_) and bool(s_))]
    if open_P:
        return Exponent.undetermined(
            ONSET_METHOD, f"not bracketed and not saturated (still falling) at P = {open_P}",
            n=int(P.size))
    lam = np.where(br, sub["lambda_opt"], sub["lambda_bound"]).astype(float)
    return _t_scaled(fit_exponent(P, lam, sign=+1, with_q=False, method=ONSET_METHOD,
                                  detail={**det, "saturated_P": [int(p) for p in P[~br]],
                                          "lambda_opt": [float(v) for v in lam]}))


def analyze(df: pd.DataFrame, *, p_min: int | None = None, gamma1_window: tuple | None = None,
            optimum: str = "vertex", collapse_tol: float = 0.08, alpha: float = Q_ALPHA,
            n_boot: int = 0, boot_seed: int = 0, elbow_kw: dict | None = None) -> dict:
    """The Sec. 3.2 / Sec. 4 / Appendix D analysis of one (arch, dataset) results table.

    With ``p_min``, ``gamma1_window=(lo, hi)`` and ``optimum="argmin"`` it is the authors'
    procedure exactly (module docstring); each choice left at its default is made by the
    automatic rule instead:

    * p_min: the smallest P from which on the rescaled curves collapse within ``collapse_tol``
      (rms log10 deviation from the larger-P curves; :func:`choose_p_min`), at least 3 P kept;
    * early window: :func:`detect_elbow` per P, pooled Eq. 3 fit (:func:`fit_gamma1`);
    * lambda_opt: parabola vertex, unbracketed minima left out (:func:`curve_optimum`).

    Args:
      df: results of one architecture and dataset (per-seed curves, or seed-mean curves on a
        lambda grid with a constant seed and epoch = grid index).
      p_min: smallest P in the fits (None: automatic).
      gamma1_window: (lo, hi) bounds of lambda/lambda_opt for the authors' per-P gamma1
        (None entries = open); None: automatic pooled fit.
      optimum: "vertex" (default) or "argmin" (the authors': grid arg-min of the seed-mean
        curve, unbracketed minima used as they are; gamma2 a plain log-log line).
      collapse_tol: tolerance of the automatic p_min.
      alpha: level of the F test that keeps q terms.
      n_boot: bootstrap resamples over seeds (0: none).
      elbow_kw: options for :func:`detect_elbow`.

    Returns:
      JSON-ready summary dict: labels, choices, p_min, P_used, optima (per P), seed_optima,
      collapse quality, every exponent as a serialized :class:`Exponent` (gamma1,
      gamma1_appendix_d, gamma2 (censored fit when some P >= p_min are not bracketed),
      gamma2_bracketed, gamma2_end_convention, gamma_opt_end_convention, gamma2_argmin,
      gamma2_seed_argmins, gamma2_onset (saturation-onset convention, :func:`_onset_law`),
      gamma_opt, gamma_opt_bracketed, gamma_end,
      gamma_meas = the one Table 1 uses, gamma_pred, gamma_pred_onset = gamma1 gamma2_onset),
      comparison, thresholds, warnings,
      table1, table2.

    Raises:
      ValueError: unusable input (missing columns, duplicated rows, no usable replica, bad
        p_min / gamma1_window / optimum, several arch/dataset).
    """
    log: list = []
    elbow_kw = dict(elbow_kw or {})
    if isinstance(df, pd.DataFrame):
        for col in ("arch", "dataset", "size"):
            _single_label(df, col)  # several models in one table: say so before anything else
    d = clean(df, log)
    Ps = sorted(int(p) for p in d["P"].unique())
    _check_choices(p_min, gamma1_window, optimum, Ps)
    s: dict[str, Any] = {"arch": _single_label(d, "arch"), "dataset": _single_label(d, "dataset"),
                         "size": _single_label(d, "size"), "n_rows": int(len(df)),
                         "n_rows_used": int(len(d)), "P_values": Ps,
                         "seeds": sorted(int(x) for x in d["seed"].unique()), "warnings": log,
                         "choices": {"p_min": p_min, "gamma1_window": gamma1_window,
                                     "optimum": optimum, "alpha_q": alpha},
                         "mode": "authors" if (gamma1_window is not None and optimum == "argmin"
                                               and p_min is not None) else
                                 ("automatic" if (gamma1_window is None and optimum == "vertex"
                                                  and p_min is None) else "mixed")}
    curves = mean_curves(d)
    opt_P = optimum_per_P(curves, optimum, optima(d, method=optimum))
    if p_min is None:
        okP = [int(P) for P in opt_P.loc[opt_P["bracketed"], "P"]]
        okP = okP if len(okP) >= 2 else Ps
        ch = (choose_p_min({P: curves[P] for P in okP}, opt_P, tol=collapse_tol)
              if len(okP) >= 2 else {"p_min": Ps[0], "deviations": {}})
        p_min_used, s["p_min_mode"], s["p_min_deviations"] = ch["p_min"], "auto", ch["deviations"]
    else:
        p_min_used, s["p_min_mode"] = int(p_min), "user"
    P_used = [P for P in Ps if P >= p_min_used]
    s.update(p_min=int(p_min_used), collapse_tol=collapse_tol, P_used=P_used)
    if len(Ps) < 2:
        _note(log, f"only one value of P ({Ps}): gamma2, gamma_meas and the collapse need >= {MIN_P_FIT}")
    nb = [int(p) for p in opt_P.loc[~opt_P["bracketed"], "P"]]
    if nb:
        sat = opt_P.set_index("P")["saturated"] if "saturated" in opt_P.columns else None
        state = {P: (None if sat is None or pd.isna(sat.loc[P]) else bool(sat.loc[P])) for P in nb}
        falling = [P for P in nb if state[P] is False]
        flat = [P for P in nb if state[P] is True]
        folds = [int(p) for p in opt_P.loc[~opt_P["bracketed"] & opt_P["folds"], "P"]]
        _note(log, f"minimum not bracketed at P = {nb}: the seed-mean test error does not rise "
                   "significantly after its lowest point"
                   + (f"; at P = {folds} it rises beyond it in lambda only at earlier evaluations (lambda "
                      "shrinks later in training, so eps(lambda) folds back: optima.folds)" if folds else "")
                   + (f"; saturated (no significant fall over the last {SATURATION_TAIL:.0%} of the "
                      f"evaluations, optima.saturated) at P = {flat}" if flat else "")
                   + (f"; still falling when training ended at P = {falling}: train longer" if falling else "")
                   + "; lambda_opt there is only bounded below and is "
                   + ("used anyway (optimum='argmin', the authors' choice)" if optimum == "argmin"
                      else "left out of gamma2 and gamma_opt"))
    core = _core(d, P_used, gamma1_window=gamma1_window, optimum=optimum, alpha=alpha,
                 elbow_kw=elbow_kw, log=log)
    s["optima"] = _records(core["opt_P"])
    s["seed_optima"] = _records(core["seed_opt"])
    ok = [P for P in Ps if bool(opt_P.set_index("P").loc[P, "bracketed"])] or Ps
    s["collapse"] = collapse_quality(rescaled_curves(curves, opt_P, [P for P in P_used if P in ok]))
    s["collapse_all_P"] = collapse_quality(rescaled_curves(curves, opt_P, Ps))
    for name in ("gamma1", "gamma1_appendix_d", "gamma2", "gamma2_bracketed",
                 "gamma2_end_convention", "gamma_opt_end_convention", "gamma2_argmin",
                 "gamma2_seed_argmins", "gamma2_onset", "gamma_opt",
                 "gamma_opt_bracketed", "gamma_end", "gamma_meas", "gamma_pred", "gamma_pred_onset"):
        s[name] = core[name].to_dict()
    g1, g2, gm, gp = core["gamma1"], core["gamma2"], core["gamma_meas"], core["gamma_pred"]
    if g1.determined and g1.detail and "per_P" in g1.detail:
        s["elbow"] = [{k: p.get(k) for k in ("P", "lambda_start", "lambda_elbow")}
                      for p in g1.detail["per_P"] if "lambda_elbow" in p]
    if gp.determined and gm.determined:
        sig = math.hypot(gp.sigma, gm.sigma)  # Appendix D comparison sigma
        s["comparison"] = {"gamma_pred": gp.value, "gamma_meas": gm.value, "sigma": sig,
                           "z": (gp.value - gm.value) / sig if sig > 0 else None,
                           "gamma_meas_on": gm.detail.get("quantity")}
    if g1.determined and g2.determined and g1.detail and "k1" in g1.detail:
        th = thresholds(g1.detail["k1"], g1.value, g1.detail["q1"], g2.k, g2.value, g2.q)
        th["note"] = ("P_- needs q2 > 0 and P_+ needs q1 > 0; None means the q term was not "
                      "kept by the F test (Sec. 4: compatible with zero)")
        s["thresholds"] = th
    if n_boot:
        s["bootstrap"] = bootstrap(d, P_used, n_boot=n_boot, seed=boot_seed,
                                   gamma1_window=gamma1_window, optimum=optimum, alpha=alpha,
                                   elbow_kw=elbow_kw)
    s["table1"] = table1_row(s)
    s["table2"] = table2_row(s)
    return _jsonable(s)


def bootstrap(df: pd.DataFrame, P_used: Sequence[int], *, n_boot: int = 100, seed: int = 0,
              **core_kw) -> dict:
    """Bootstrap over seeds of gamma1, gamma2, gamma_opt and gamma_pred (a cross-check).

    Each resample draws the seed labels with replacement (the same draw for every P) and reruns
    the fits at fixed P set. With few seeds it underestimates the spread (by (n-1)/n in variance).

    Returns:
      dict n (successful resamples), n_seeds, and per quantity {mean, std, p16, p84}.
    """
    seeds = np.array(sorted(df["seed"].unique()))
    if seeds.size < 2:
        return {"n": 0, "n_seeds": int(seeds.size), "note": "bootstrap needs >= 2 seeds"}
    gen = np.random.default_rng(seed)
    by_seed = {x: g for x, g in df.groupby("seed")}
    names = ("gamma1", "gamma2", "gamma_opt", "gamma_pred")
    vals: dict = {k: [] for k in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n_boot):
            draw = gen.choice(seeds, size=seeds.size, replace=True)
            parts = [by_seed[x].assign(seed=k) for k, x in enumerate(draw)]
            try:
                r = _core(pd.concat(parts, ignore_index=True), P_used, **core_kw)
            except (ValueError, np.linalg.LinAlgError):
                continue
            for k in names:
                if r[k].determined:
                    vals[k].append(r[k].value)
    out: dict = {"n": n_boot, "n_seeds": int(seeds.size), "seed": seed}
    for k, v in vals.items():
        v = np.asarray(v)
        out[k] = ({"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else None,
                   "p16": float(np.percentile(v, 16)), "p84": float(np.percentile(v, 84)),
                   "n": int(v.size)} if v.size else None)
    return out


class Prediction(NamedTuple):
    """eps_opt and lambda_opt at one P from the fitted Eqs. 4 and 6 (:func:`predict`).

    sigma_ln_*: error of the law at P (fit parameters only); sigma_ln_*_obs: the error of a new
    measurement at P (adds the scatter of one point about the law, resid_sd), the band a
    held-out measurement should fall in. Both are Gaussian-equivalent: the Student-t quantile of
    the fit's degrees of freedom is folded in, so +-2 sigma is a 95 % interval.
    """

    P: float
    lambda_opt: float
    sigma_ln_lambda_opt: float
    sigma_ln_lambda_opt_obs: float
    eps_opt: float
    sigma_ln_eps_opt: float
    sigma_ln_eps_opt_obs: float


def _predict_law(e: dict, P: float, sign: int) -> tuple[float, float, float]:
    if not e or not e.get("determined", True) or e.get("value") is None:
        raise ValueError(f"law not determined: {e.get('reason') if e else 'missing'}")
    if e.get("cov") is None:
        raise ValueError(f"the law's fit has no covariance ({e.get('method')}), so no error can be propagated")
    k, a, q = e["k"], sign * e["value"], e.get("q") or 0.0
    cov = np.asarray(e["cov"], float)
    lp = math.log(P)
    pw = k * P ** a
    y = pw + q
    if y <= 0:
        raise ValueError(f"the fitted law is not positive at P={P}")
    g = np.array([pw / y, pw * lp / y] + ([1.0 / y] if cov.shape[0] == 3 else []))
    var = float(g @ cov @ g)
    r = e.get("resid_sd") or 0.0
    # Both variances come from the fit's own residuals (n - n_par degrees of freedom), so a new
    # point's deviation is Student-t distributed: the sigmas are scaled to Gaussian-equivalent
    # ones (t_0.975(dof) / 1.96; x2.2 at 2 dof, x1.4 at 4), so that 2 sigma is a 95 % band.
    dof = max(int(e.get("n") or 0) - cov.shape[0], 1)
    t = float(stats.t.ppf(0.975, dof) / stats.norm.ppf(0.975))
    return y, t * math.sqrt(max(var, 0.0)), t * math.sqrt(max(var, 0.0) + r * r)


def predict(summary: dict, P: float) -> Prediction:
    """lambda_opt(P) (Eq. 4: k2 P^gamma2 + q2) and eps_opt(P) (Eq. 6's form: k P^-gamma + q,
    the fitted gamma_opt law) at any P, with delta-method errors in ln units.

    When gamma_opt weighed a floor q1 (``detail.q1_model_average``: Eq. 3's candidate floor on the
    joint evidence of Eq. 3 and Eq. 6), eps_opt's sigma carries the other law (with the floor if
    the selected one has none, and vice versa) at its weight w: sigma^2 = (1 - w) s_sel^2 +
    w (s_alt^2 + (ln eps_alt - ln eps_sel)^2); the value is the selected law's.

    Args:
      summary: one group's summary from :func:`analyze` (uses its "gamma2" and "gamma_opt").
      P: dataset size (> 0).

    Raises:
      ValueError: P not positive, or a law not determined (the reason is given).
    """
    if not (isinstance(P, (int, float, np.integer, np.floating)) and P > 0):
        raise ValueError(f"P must be a positive number, got {P!r}")
    lo, slo, slo_obs = _predict_law(summary.get("gamma2"), float(P), +1)
    go = summary.get("gamma_opt")
    eo, seo, seo_obs = _predict_law(go, float(P), -1)
    qa = ((go or {}).get("detail") or {}).get("q1_model_average") or {}
    if qa.get("alternative_law") and qa.get("w_q1") is not None:
        # gamma_opt's q1 model uncertainty (a floor that Eq. 3 admits, kept or not by the joint
        # evidence): the prediction's sigma carries the other law, same weight (value: the
        # selected law).
        try:
            ea, sea, sea_obs = _predict_law(qa["alternative_law"], float(P), -1)
        except ValueError:
            ea = None
        if ea is not None:
            w, d2 = float(qa.get("w_alternative", qa["w_q1"])), (math.log(ea) - math.log(eo)) ** 2
            seo = math.sqrt((1 - w) * seo ** 2 + w * (sea ** 2 + d2))
            seo_obs = math.sqrt((1 - w) * seo_obs ** 2 + w * (sea_obs ** 2 + d2))
    return Prediction(float(P), lo, slo, slo_obs, eo, seo, seo_obs)


def _holdout_end(s: dict, full: pd.DataFrame, Ps: Sequence[int]) -> dict:
    """Held-out check of the end-of-training law eps_end(P) (``gamma_end``), usable when no minimum is bracketed:
    {"per_P": [{P, eps_end, eps_end_pred, z}]} or {"error": reason}."""
    rows = []
    for P in Ps:
        try:
            e, _, se_obs = _predict_law(s.get("gamma_end"), float(P), -1)
        except ValueError as err:
            return {"error": f"gamma_end: {err}"}
        m = float(full.loc[P, "eps_end"])
        rows.append({"P": int(P), "eps_end": m, "eps_end_pred": e, "z": (math.log(m) - math.log(e)) / se_obs})
    return {"per_P": rows}


def holdout(df: pd.DataFrame, n_out: int = 2, **analyze_kw) -> dict:
    """Fits on all but the ``n_out`` largest P and predicts their optima (the scaling law's use).

    The held-out optima are measured on the full data the same way (:func:`optimum_per_P`);
    z = (ln measured - ln predicted) / sigma_ln_obs. The end-of-training error eps_end(P) is predicted the
    same way from the ``gamma_end`` law (key ``eps_end``), also when the optima cannot be.

    Returns:
      dict P_fit, per_P: [{P, lambda_opt, lambda_pred, z_lambda, eps_opt, eps_pred, z_eps,
      bracketed}], eps_end: {per_P: [{P, eps_end, eps_end_pred, z}]} or {error}; or {"P_fit", "error": reason,
      "eps_end"} when the fit on the smaller P cannot predict the optima.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalysisWarning)
        d = clean(df)
        Ps = sorted(int(p) for p in d["P"].unique())
        if len(Ps) < MIN_P_FIT + n_out:
            return {"error": f"{len(Ps)} values of P; holding out {n_out} leaves fewer than {MIN_P_FIT}"}
        keep = Ps[:-n_out]
        s = analyze(d[d["P"].isin(keep)], **analyze_kw)
        curves = mean_curves(d)
        full = optimum_per_P(curves, analyze_kw.get("optimum", "vertex"))
        if analyze_kw.get("optimum", "vertex") == "vertex":  # measured as the fit measures them
            full = _joint(curves, full, [P for P in Ps if P >= s["p_min"]])
        full = full.set_index("P")
    out = {"P_fit": keep, "per_P": [], "eps_end": _holdout_end(s, full, Ps[-n_out:])}
    for P in Ps[-n_out:]:
        try:
            pr = predict(s, P)
        except ValueError as e:
            return _jsonable({"P_fit": keep, "error": str(e), "eps_end": out["eps_end"]})
        m = full.loc[P]
        out["per_P"].append({
            "P": P, "bracketed": bool(m["bracketed"]),
            "lambda_opt": float(m["lambda_opt"]), "lambda_pred": pr.lambda_opt,
            "z_lambda": (math.log(m["lambda_opt"]) - math.log(pr.lambda_opt)) / pr.sigma_ln_lambda_opt_obs,
            "eps_opt": float(m["eps_opt"]), "eps_pred": pr.eps_opt,
            "z_eps": (math.log(m["eps_opt"]) - math.log(pr.eps_opt)) / pr.sigma_ln_eps_opt_obs})
    return _jsonable(out)


def analyze_all(df: pd.DataFrame, **kw) -> dict:
    """Runs :func:`analyze` for every (arch, dataset) in the table.

    Returns:
      {"arch/dataset": summary}. A group whose analysis fails gets {"error": message}.
    """
    if not isinstance(df, pd.DataFrame) or len(df) == 0:
        raise ValueError("results table is empty")
    keys = [c for c in ("arch", "dataset") if c in df.columns]
    if "size" in df.columns and df["size"].nunique() > 1:
        keys.append("size")
    if not keys:
        return {"unknown/unknown": analyze(df, **kw)}
    out = {}
    for key, g in df.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        name = "/".join(str(k) for k in key)
        try:
            out[name] = analyze(g, **kw)
        except ValueError as e:
            out[name] = {**{k: str(v) for k, v in zip(keys, key)}, "error": str(e)}
    return out


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------

_NAMES = {"cnn": "CNN", "resnet": "ResNet", "vit": "ViT", "mnist": "MNIST",
          "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def _model_name(s: dict) -> str:
    name = _NAMES.get(s.get("arch"), s.get("arch"))
    size = s.get("size")
    return f"{name} ({size})" if size not in (None, "paper") else name


def table1_row(s: dict) -> dict:
    """Table 1 row: Model, Dataset, gamma_pred, gamma_meas, sigma (Appendix D), gamma_meas_on
    (eps_opt: Eq. 6's quantity, or eps_end when the optima are not determined), gamma_end and
    the reasons for what is not determined."""
    gp, gm, ge = (_exp_dict(s.get(k)) for k in ("gamma_pred", "gamma_meas", "gamma_end"))
    notes = "; ".join(f"{k}: {e.get('reason')}" for k, e in (("gamma_pred", gp), ("gamma_meas", gm))
                      if e and not e.get("determined", True))
    return {"Model": _model_name(s), "Dataset": _NAMES.get(s.get("dataset"), s.get("dataset")),
            "gamma_pred": gp.get("value"), "gamma_meas": gm.get("value"),
            "sigma": (s.get("comparison") or {}).get("sigma"),
            "sigma_pred": gp.get("sigma"), "sigma_meas": gm.get("sigma"),
            "gamma_meas_on": (gm.get("detail") or {}).get("quantity"),
            "gamma_end": ge.get("value"), "sigma_end": ge.get("sigma"), "notes": notes or None}


def table2_row(s: dict) -> dict:
    """Table 2 row: Model, Dataset, gamma1, sigma1, gamma2, sigma2, then Appendix D's numbers
    beside them (gamma1_appD: mean of per-P slopes; gamma2_argmin: grid arg-min definition)."""
    g1, g2, ad, ga = (_exp_dict(s.get(k)) for k in ("gamma1", "gamma2", "gamma1_appendix_d",
                                                     "gamma2_argmin"))
    notes = "; ".join(f"{k}: {e.get('reason')}" for k, e in (("gamma1", g1), ("gamma2", g2))
                      if e and not e.get("determined", True))
    return {"Model": _model_name(s), "Dataset": _NAMES.get(s.get("dataset"), s.get("dataset")),
            "gamma1": g1.get("value"), "sigma1": g1.get("sigma"),
            "gamma2": g2.get("value"), "sigma2": g2.get("sigma"),
            "gamma1_appD": ad.get("value"), "sigma1_appD": ad.get("sigma"),
            "gamma2_argmin": ga.get("value"), "sigma2_argmin": ga.get("sigma"),
            "p_min": s.get("p_min"), "notes": notes or None}


_T1 = ["Model", "Dataset", "gamma_pred", "gamma_meas", "sigma", "sigma_pred", "sigma_meas",
       "gamma_meas_on", "gamma_end", "sigma_end", "notes"]
_T2 = ["Model", "Dataset", "gamma1", "sigma1", "gamma2", "sigma2", "gamma1_appD", "sigma1_appD",
       "gamma2_argmin", "sigma2_argmin", "p_min", "notes"]


def tables(summaries: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table 1 and Table 2 DataFrames from {name: summary} (groups that failed are skipped)."""
    ok = [s for s in summaries.values() if "table1" in s]
    return (pd.DataFrame([s["table1"] for s in ok], columns=_T1),
            pd.DataFrame([s["table2"] for s in ok], columns=_T2))


def to_markdown(table: pd.DataFrame, digits: int = 3) -> str:
    """A pipe table (no tabulate dependency); numbers to ``digits`` significant figures."""
    def fmt(v):
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            return "-"
        if isinstance(v, (float, np.floating)):
            return f"{v:.{digits}g}"
        return str(v)
    head = "| " + " | ".join(table.columns) + " |"
    sep = "| " + " | ".join("---" for _ in table.columns) + " |"
    rows = ["| " + " | ".join(fmt(v) for v in r) + " |" for r in table.itertuples(index=False)]
    return "\n".join([head, sep, *rows]) + "\n"


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def _single_label(df, col):
    if col not in df.columns:
        return None
    vals = df[col].dropna().unique()
    if len(vals) > 1:
        raise ValueError(f"analyze() takes one {col}, got {sorted(map(str, vals))}; "
                         "use analyze_all() for several")
    return str(vals[0]) if len(vals) else None


def _Ps(frame: pd.DataFrame) -> list:
    return sorted(int(p) for p in frame["P"].unique())


def _records(frame: pd.DataFrame) -> list:
    return [_jsonable(r) for r in frame.to_dict(orient="records")]


def _f(v):
    if v is None:
        return None
    v = float(v)
    return v if np.isfinite(v) else None


def _jsonable(obj):
    """Recursively converts numpy scalars/arrays and non-finite floats (-> None) for JSON."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _f(obj)
    return obj


def dump_json(obj, path: str) -> None:
    """Writes ``obj`` as indented JSON (numpy values converted, NaN -> null)."""
    with open(path, "w") as fh:
        json.dump(_jsonable(obj), fh, indent=2)


# ----------------------------------------------------------------------------------------------
# Which norm collapses the early phase best? (issue 11; self-contained: numpy/pandas only)
# ----------------------------------------------------------------------------------------------

def _cn_mean_curves(df: pd.DataFrame, column: str) -> dict:
    """{P: (x, eps)} seed-mean curves by epoch: x averaged geometrically, eps arithmetically; x > 0 only."""
    out = {}
    d = df[["P", "epoch", "test_error", column]].copy()
    d["x"] = pd.to_numeric(d[column], errors="coerce").astype(float)
    d = d[np.isfinite(d["x"]) & (d["x"] > 0) & np.isfinite(d["test_error"].astype(float))]
    for P, g in d.groupby("P", sort=True):
        agg = g.assign(lx=np.log(g["x"])).groupby("epoch").agg(lx=("lx", "mean"), eps=("test_error", "mean"))
        agg = agg.reset_index().sort_values("epoch")
        out[int(P)] = (np.exp(agg["lx"].to_numpy()), agg["eps"].to_numpy(dtype=float))
    return out


def _cn_early(x: np.ndarray, eps: np.ndarray, early_cut: float) -> tuple[np.ndarray, np.ndarray]:
    """The early phase of one curve: from the start while eps > eps_opt + early_cut (eps_0 - eps_opt), before
    the minimum of the test error."""
    if x.size < 2:
        return x[:0], eps[:0]
    i_opt = int(np.argmin(eps))
    level = eps[i_opt] + early_cut * (eps[0] - eps[i_opt])
    stop = i_opt
    below = np.nonzero(eps[: i_opt + 1] <= level)[0]
    if below.size:
        stop = int(below[0])
    return x[: stop + 1], eps[: stop + 1]


def _cn_spread(curves: dict, n_grid: int) -> dict:
    """Spread across P of log10 eps interpolated in (log10 x, log10 eps) on a common grid (>= 2 curves)."""
    usable = {P: c for P, c in curves.items() if c[0].size >= 2 and np.all(c[1] > 0)}
    nan = dict(spread_mean=np.nan, spread_max=np.nan, overlap_decades=0.0, n_grid_used=0, n_P=len(usable))
    if len(usable) < 2:
        return nan
    lx = {P: np.log10(c[0]) for P, c in usable.items()}
    grid = np.linspace(min(a.min() for a in lx.values()), max(a.max() for a in lx.values()), n_grid)
    Y = np.full((len(usable), n_grid), np.nan)
    for r, P in enumerate(usable):
        o = np.argsort(lx[P], kind="stable")
        xs, ys = lx[P][o], np.log10(usable[P][1])[o]
        inside = (grid >= xs[0]) & (grid <= xs[-1])
        Y[r, inside] = np.interp(grid[inside], xs, ys)
    use = np.sum(np.isfinite(Y), axis=0) >= 2
    if not use.any():
        return nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        spread = np.nanstd(Y[:, use], axis=0, ddof=1)
    return dict(spread_mean=float(np.mean(spread)), spread_max=float(np.max(spread)),
                overlap_decades=float(grid[use].max() - grid[use].min()), n_grid_used=int(use.sum()),
                n_P=len(usable))


def compare_norms(df: pd.DataFrame, columns: Sequence[str] | None = None, *, early_cut: float = 0.3,
                  n_grid: int = 60, baseline: bool = True, min_overlap: float = 0.2) -> pd.DataFrame:
    """Early-phase collapse quality of the learning curves eps(x) for each norm column x ("which norm makes
    the curves collapse best?").

    For every column, each P's seed-mean curve (x averaged geometrically, test error arithmetically, per
    epoch) is cut to its early phase: from the first evaluation while ``eps > eps_opt + early_cut (eps_0 -
    eps_opt)``, before the minimum of the test error (the P-independent power-law phase of the paper's Fig. 3).
    On a common grid of log10 x, each curve is interpolated in (log10 x, log10 eps) where it has data; the
    spread is the standard deviation of log10 eps across P where >= 2 curves overlap (0.01 ~ 2.3 %). A
    perfect collapse has spread 0; curves that do not overlap in x give NaN.

    Args:
      df: tidy results (``jaxnorm.results.load``): P, seed, epoch, test_error and the norm columns.
      columns: norm columns to compare; default ``spectral_complexity``, ``spectral_complexity_upper`` and every
        ``zoo/*`` column present.
      early_cut: fraction of the error drop left out at the end of the early phase (0: up to the optimum).
      n_grid: grid points. baseline: also rank ``epoch`` (training time; the paper's Fig. 7 says it does not
        collapse the curves).
      min_overlap: columns whose curves overlap over fewer decades of x than this are ranked after the others
        (``thin_overlap``): their spread rests on a sliver of the early phase.

    Returns:
      DataFrame, one row per column, best (smallest ``spread_mean`` among those with ``overlap_decades >=
      min_overlap``) first: column, spread_mean, spread_max (log10 units), overlap_decades (decades of x where
      >= 2 curves overlap), n_grid_used, n_P, thin_overlap, rank.

    Raises:
      ValueError: a requested column is missing, or df lacks P/epoch/test_error.
    """
    for c in ("P", "epoch", "test_error"):
        if c not in df.columns:
            raise ValueError(f"compare_norms: df has no {c!r} column; it needs P, epoch, test_error")
    if columns is None:
        columns = [c for c in ("spectral_complexity", "spectral_complexity_upper") if c in df.columns]
        columns += sorted(c for c in df.columns if str(c).startswith("zoo/"))
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"compare_norms: columns {missing} not in df; norm columns there: "
                         f"{[c for c in df.columns if c.startswith(('zoo/', 'spectral'))]}")
    if "diverged" in df.columns:
        df = df[~df["diverged"].astype(bool)]
    cols = list(columns) + (["epoch"] if baseline and "epoch" not in columns else [])
    rows = []
    for col in cols:
        src = df.assign(_x=df["epoch"]) if col == "epoch" else df.assign(_x=df[col])
        curves = _cn_mean_curves(src, "_x")
        early = {P: _cn_early(x, e, early_cut) for P, (x, e) in curves.items()}
        rows.append(dict(column=col, **_cn_spread(early, n_grid)))
    out = pd.DataFrame(rows)
    # A spread measured where the curves barely overlap says little (a norm whose early phases of different P
    # occupy disjoint ranges would rank first on a sliver): those with less than min_overlap decades go last.
    out["thin_overlap"] = ~(out["overlap_decades"] >= min_overlap)
    out = out.sort_values(["thin_overlap", "spread_mean"], na_position="last", kind="stable").reset_index(drop=True)
    out["rank"] = np.arange(1, len(out) + 1)
    return out

"""Scaling-law analysis of learning curves against the spectral complexity norm.

Implements Sec. 3.2, Sec. 4 and Appendix D of D'Amico, Bocchi, Negri (2025):

* per (P, seed) learning curves eps(lambda(t)), lambda = spectral complexity (Eq. 2);
* the optimum (lambda_opt(P), eps_opt(P)) at the minimum test error, mean and spread over seeds;
* the early, P-independent power law eps = k1 lambda^-gamma1 + q1 (Eq. 3) on a detected
  pure power-law window that ends at lambda_elbow(P);
* lambda_opt = k2 P^gamma2 + q2 (Eq. 4);
* the collapse eps/eps_opt = Phi(lambda/lambda_opt) (Eq. 5) and a numeric collapse quality;
* gamma_meas from eps(P) at the end of training, gamma_pred = gamma1 gamma2 with the error
  propagation of Appendix D, also by a bootstrap over seeds;
* the thresholds P_- and P_+ of Eq. 6 (Sec. 4).

Everything consumes the tidy results DataFrame of ``jaxnorm.results.load`` (one row per replica
and evaluation point), so tests and notebooks can feed synthetic frames from
:func:`synthetic_curves`. Exponents are reported as positive numbers: eps ~ lambda^-gamma1,
lambda_opt ~ P^gamma2, eps ~ P^-gamma (the paper's gamma_tot = -gamma1 gamma2 of Eq. 6).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import optimize

REQUIRED_COLUMNS = ("P", "seed", "epoch", "test_error", "spectral_complexity")
_Q_THRESHOLD = 3.0  # keep a q term only if |q| > 3 sigma_q (Sec. 4: q1, q2 "compatible with zero")


class AnalysisWarning(UserWarning):
    """A problem in the data that the analysis worked around (also recorded in the summary)."""


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def load_run(run_dir: str) -> pd.DataFrame:
    """Loads the results table of a run directory.

    Uses ``jaxnorm.results.load`` when that module exists; otherwise reads ``results.csv`` or
    ``results.parquet`` in ``run_dir``.

    Args:
      run_dir: a sweep run directory.

    Returns:
      The tidy results DataFrame (one row per replica and evaluation point).

    Raises:
      ValueError: the directory does not exist or holds no results.
    """
    if not os.path.isdir(run_dir):
        raise ValueError(f"run directory {run_dir!r} does not exist")
    try:
        from jaxnorm import results as _results  # noqa: PLC0415  (optional peer module)
    except ImportError:
        _results = None
    if _results is not None and hasattr(_results, "load"):
        try:
            df = _results.load(run_dir)
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None
    else:
        for name in ("results.parquet", "results.csv", "results.csv.gz"):
            path = os.path.join(run_dir, name)
            if os.path.exists(path):
                df = pd.read_parquet(path) if name.endswith("parquet") else pd.read_csv(path)
                break
        else:
            raise ValueError(f"run directory {run_dir!r} holds no results table "
                             "(expected results.csv or results.parquet)")
    if df is None or len(df) == 0:
        raise ValueError(f"run directory {run_dir!r} has an empty results table")
    return df


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
      sigma_k, sigma_a, sigma_q: one-sigma errors from the Jacobian covariance, scaled by the
        reduced chi^2 (as ``curve_fit`` with absolute_sigma=False).
      q_kept: whether the model includes q (fitted with and without; kept only if significant).
      q_test: the with-q fit's q, sigma_q and z = |q|/sigma_q (None if not attempted).
      n_points: points in the fit; x_range: [min x, max x] actually fitted.
      chi2_red: reduced chi^2 of the log residuals (in units of the given sigmas, or raw).
      loss: the robust loss of ``scipy.optimize.least_squares``.
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
    loss: str
    success: bool = True

    def __call__(self, x):
        return self.k * np.asarray(x, dtype=float) ** self.a + self.q

    def to_dict(self) -> dict:
        return _jsonable(dataclasses.asdict(self))


def _lsq(x, y, s, with_q, loss, p0):
    """One robust fit in log space; returns (params, cov, chi2_red, success)."""
    lx, ly = np.log(x), np.log(y)

    def resid(p):
        model = np.exp(p[0] + p[1] * lx) + (p[2] if with_q else 0.0)
        return (np.log(np.maximum(model, 1e-300)) - ly) / s

    # f_scale ~ 3 robust sigmas of a first log-log line: soft_l1 only downweights outliers.
    r0 = resid(np.asarray(p0[: 3 if with_q else 2]))
    mad = 1.4826 * np.median(np.abs(r0 - np.median(r0)))
    f_scale = max(3.0 * mad, 1e-8 if np.all(s == 1) else 1.0)
    res = optimize.least_squares(resid, np.asarray(p0[: 3 if with_q else 2], float),
                                 loss=loss, f_scale=f_scale, x_scale="jac", max_nfev=5000)
    npar = res.x.size
    dof = x.size - npar
    J = res.jac
    try:
        cov = np.linalg.pinv(J.T @ J)
    except np.linalg.LinAlgError:
        cov = np.full((npar, npar), np.nan)
    # Scale by the raw residuals (not the robust cost, which grows only linearly for outliers
    # and would shrink the errors).
    chi2 = float(np.sum(res.fun ** 2)) / dof if dof > 0 else np.nan
    cov = cov * chi2 if dof > 0 else np.full((npar, npar), np.nan)
    return res.x, cov, chi2, bool(res.success)


def fit_power_law(x, y, sigma=None, *, with_q: bool | str = "auto", loss: str = "soft_l1",
                  q_threshold: float = _Q_THRESHOLD) -> PowerLawFit:
    """Fits y = k x^a + q by robust least squares on log y.

    Args:
      x, y: positive data, shape [n].
      sigma: optional absolute errors of y, shape [n] (converted to log errors sigma/y).
      with_q: True, False, or "auto" (fit both; keep q only if |q| > q_threshold sigma_q).
      loss: ``least_squares`` loss ("linear", "soft_l1", "huber", ...).
      q_threshold: significance (in sigmas) needed to keep q.

    Returns:
      :class:`PowerLawFit`.

    Raises:
      ValueError: fewer than 2 finite positive points, or a bad ``with_q``.
    """
    if with_q not in (True, False, "auto"):
        raise ValueError(f"with_q must be True, False or 'auto', got {with_q!r}")
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    s = np.ones_like(y) if sigma is None else np.asarray(sigma, dtype=float) / y
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0) & np.isfinite(s)
    if sigma is not None:
        ok &= s > 0
    x, y, s = x[ok], y[ok], s[ok]
    if x.size < 2 or np.unique(x).size < 2:
        raise ValueError(f"a power-law fit needs at least 2 distinct positive points, got {x.size}")
    # Start from the ordinary log-log line.
    a0, lk0 = np.polyfit(np.log(x), np.log(y), 1)
    p_pure, cov_pure, chi_pure, succ_pure = _lsq(x, y, s, False, loss, [lk0, a0, 0.0])
    q_test = None
    use_q = with_q is True
    p_q = cov_q = None
    if with_q in (True, "auto") and x.size >= 3:
        # q starts at zero; the pure fit gives the power law's start.
        p_q, cov_q, chi_q, succ_q = _lsq(x, y, s, True, loss, [p_pure[0], p_pure[1], 0.0])
        sq = float(np.sqrt(cov_q[2, 2])) if np.isfinite(cov_q[2, 2]) and cov_q[2, 2] >= 0 else np.nan
        z = abs(p_q[2]) / sq if (np.isfinite(sq) and sq > 0) else (np.inf if sq == 0 else np.nan)
        q_test = {"q": float(p_q[2]), "sigma_q": sq, "z": float(z) if np.isfinite(z) else None,
                  "threshold": q_threshold}
        if with_q == "auto":
            use_q = bool(succ_q and np.isfinite(sq) and p_q[2] != 0
                         and abs(p_q[2]) > q_threshold * sq)
    elif with_q is True:
        raise ValueError(f"a power-law fit with q needs at least 3 points, got {x.size}")
    if use_q:
        p, cov, chi2, succ = p_q, cov_q, chi_q, succ_q
    else:
        p, cov, chi2, succ = p_pure, cov_pure, chi_pure, succ_pure
    k = float(np.exp(p[0]))
    err = np.sqrt(np.clip(np.diag(cov), 0, None)) if np.all(np.isfinite(np.diag(cov))) \
        else np.full(p.size, np.nan)
    return PowerLawFit(k=k, a=float(p[1]), q=float(p[2]) if use_q else 0.0,
                       sigma_k=float(k * err[0]), sigma_a=float(err[1]),
                       sigma_q=float(err[2]) if use_q else 0.0, q_kept=use_q, q_test=q_test,
                       n_points=int(x.size), x_range=(float(x.min()), float(x.max())),
                       chi2_red=float(chi2), loss=loss, success=succ)


# ----------------------------------------------------------------------------------------------
# Curves and optima
# ----------------------------------------------------------------------------------------------

def clean(df: pd.DataFrame, log: list | None = None) -> pd.DataFrame:
    """Validates a results table and drops diverged or non-finite rows.

    Args:
      df: results DataFrame (needs columns P, seed, epoch, test_error, spectral_complexity).
      log: list that receives a message per problem found (also issued as AnalysisWarning).

    Returns:
      A copy with the rows flagged diverged and rows with non-finite or non-positive
      test_error / spectral_complexity removed, sorted by (P, seed, epoch).

    Raises:
      ValueError: missing columns, or no usable rows.
    """
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"results table lacks columns {missing}; required: {list(REQUIRED_COLUMNS)}")
    if len(df) == 0:
        raise ValueError("results table is empty")
    out = df.copy()
    # Zero test error is dropped too: every fit works on log eps (Eqs. 3-6 in log space).
    eps = out["test_error"].astype(float)
    lam = out["spectral_complexity"].astype(float)
    bad = ~(np.isfinite(eps) & (eps > 0) & np.isfinite(lam) & (lam > 0))
    if "diverged" in out.columns:
        bad |= out["diverged"].fillna(False).astype(bool)
    if bad.any():
        which = sorted({(int(p), int(s_))
                        for p, s_ in out.loc[bad, ["P", "seed"]].itertuples(index=False)})
        _note(log, f"dropped {int(bad.sum())} rows that diverged or have a NaN or non-positive "
                   f"test error / spectral complexity, in (P, seed) = {which}")
        out = out.loc[~bad]
    if len(out) == 0:
        raise ValueError("no usable rows: every row diverged or has a NaN test error / norm")
    return out.sort_values(["P", "seed", "epoch"]).reset_index(drop=True)


def _note(log, msg):
    warnings.warn(msg, AnalysisWarning, stacklevel=3)
    if log is not None:
        log.append(msg)


def curve_optimum(lam: np.ndarray, eps: np.ndarray, refine: bool = True,
                  delta: float = 0.1) -> dict:
    """Minimum of one learning curve eps(lambda).

    The raw arg-min is refined by the vertex of a parabola in (log lambda, log eps) fitted on the
    lambda range where log eps is within ``delta`` of its minimum (delta is raised to 3 noise
    sigmas on noisy curves). The window is defined on eps/eps_min, which the rescaling of Eq. 5
    leaves unchanged, so any bias of the vertex is the same factor for every P and cancels in
    the exponent of Eq. 4.

    Args:
      lam, eps: one curve, shape [T], in evaluation order.
      refine: use the parabola vertex when it is a minimum inside the window.
      delta: log-eps depth of the window.

    Returns:
      dict lambda_opt, eps_opt, index (raw arg-min), at_end (True when the curve never rises
      clearly after its minimum: training ended before the minimum was bracketed, so
      lambda_opt may be a lower bound).
    """
    lam = np.asarray(lam, float)
    eps = np.asarray(eps, float)
    i = int(np.argmin(eps))
    lo, eo = lam[i], eps[i]
    u, v = np.log(lam), np.log(eps)
    noise = _noise_log(v)
    noise = noise if np.isfinite(noise) else 0.0
    # The minimum is bracketed only if the curve later rises clearly above it (3 noise sigmas,
    # at least 2 %); otherwise training stopped while eps was still falling or flat.
    at_end = not bool(np.any(v[i:] > v[i] + max(3.0 * noise, 0.02)))
    if refine and not at_end and i > 0:
        d = max(delta, 3.0 * noise)
        near = v <= v[i] + d
        a, b = u[near].min(), u[near].max()
        win = (u >= a) & (u <= b)
        if win.sum() >= 5 and b > a:
            c2, c1, c0 = np.polyfit(u[win], v[win], 2)
            if c2 > 0:
                us = -c1 / (2 * c2)
                if a <= us <= b:
                    lo, eo = float(np.exp(us)), float(np.exp(c0 + c1 * us + c2 * us * us))
    return {"lambda_opt": float(lo), "eps_opt": float(eo), "index": i, "at_end": bool(at_end)}


def optima(df: pd.DataFrame, refine: bool = True, log: list | None = None) -> pd.DataFrame:
    """Optimum of every (P, seed) curve and its end-of-training error.

    Args:
      df: cleaned results (see :func:`clean`).
      refine: see :func:`curve_optimum`.
      log: receives a message listing the curves whose minimum is not bracketed.

    Returns:
      DataFrame per (P, seed): lambda_opt, eps_opt, epoch_opt, at_end, eps_end, lambda_end,
      epoch_end, n_points.
    """
    rows = []
    ends = []
    for (P, seed), g in df.groupby(["P", "seed"], sort=True):
        o = curve_optimum(g["spectral_complexity"].to_numpy(), g["test_error"].to_numpy(), refine)
        if o["at_end"]:
            ends.append((int(P), int(seed)))
        rows.append(dict(P=int(P), seed=int(seed), lambda_opt=o["lambda_opt"],
                         eps_opt=o["eps_opt"], epoch_opt=int(g["epoch"].iloc[o["index"]]),
                         at_end=o["at_end"], eps_end=float(g["test_error"].iloc[-1]),
                         lambda_end=float(g["spectral_complexity"].iloc[-1]),
                         epoch_end=int(g["epoch"].iloc[-1]), n_points=len(g)))
    if ends:
        _note(log, f"minimum not bracketed (test error never rises clearly after it; training may "
                   f"have stopped before the minimum) for (P, seed) = {ends}: their lambda_opt is the "
                   f"lowest point seen, possibly a lower bound")
    return pd.DataFrame(rows)


def optima_by_P(opt: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation and error of the mean over seeds of the optima, per P.

    Returns:
      DataFrame indexed by position with P, n_seeds, n_at_end and <q>_mean/_std/_sem for
      q in lambda_opt, eps_opt, eps_end.
    """
    rows = []
    for P, g in opt.groupby("P", sort=True):
        r = {"P": int(P), "n_seeds": len(g), "n_at_end": int(g["at_end"].sum())}
        for q in ("lambda_opt", "eps_opt", "eps_end"):
            v = g[q].to_numpy(float)
            sd = float(np.std(v, ddof=1)) if v.size > 1 else np.nan
            r[f"{q}_mean"] = float(np.mean(v))
            r[f"{q}_std"] = sd
            r[f"{q}_sem"] = sd / math.sqrt(v.size) if v.size > 1 else np.nan
        rows.append(r)
    return pd.DataFrame(rows)


def mean_curves(df: pd.DataFrame) -> dict:
    """Seed-averaged learning curve of every P, aligned on the evaluation epoch.

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


# ----------------------------------------------------------------------------------------------
# Early power law: elbow detection and gamma1
# ----------------------------------------------------------------------------------------------

def _noise_log(v: np.ndarray) -> float:
    """Robust per-point noise of a smooth series: MAD of second differences / sqrt(6)."""
    if v.size < 5:
        return float("nan")
    d2 = v[2:] - 2 * v[1:-1] + v[:-2]
    return float(1.4826 * np.median(np.abs(d2 - np.median(d2))) / math.sqrt(6.0))


def detect_elbow(lam, eps, *, sigma_floor: float = 0.003, z: float = 2.0,
                 min_points: int = 5, max_points: int = 400, max_start: int = 2) -> dict:
    """Finds the pure power-law early window of a learning curve and its elbow.

    Grid search over the windows [i, j] before the curve's minimum that start at one of the
    curve's first ``max_start + 1`` points: a window is a power law when a straight line in
    (log lambda, log eps) fits it to within the noise (reduced chi^2 below 1 + z sqrt(2/(n-2)),
    the chi^2 tail at z sigmas) with a negative slope. The widest such window in log lambda is
    the early phase of Eq. 3; its right end is lambda_elbow, where the curve departs from the
    power law by more than noise. The early phase is where training starts (Sec. 3.2): without
    the start constraint, a long, nearly flat late stretch of a saturating curve (within noise
    a line too) would win and bias gamma1 towards 0.

    Args:
      lam, eps: one curve, shape [T], lambda increasing.
      sigma_floor: smallest per-point log noise assumed (for noiseless curves).
      z: tolerance of the chi^2 test in its own standard deviations.
      min_points: smallest window.
      max_points: longer curves are averaged down to this many points first.
      max_start: latest index at which the early window may start (0 = the first point).

    Returns:
      dict i0, i1 (indices into the possibly averaged curve), lambda_start, lambda_elbow,
      slope, noise (log eps per point), n_points; None entries if no window exists.

    Raises:
      ValueError: fewer than min_points points before the minimum.
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
    ok = ((chi2r <= 1.0 + z * np.sqrt(2.0 / (nw - 2))) & (dsse <= z * z) & (slope < 0)
          & (C2 > 0) & (i <= max_start))
    if not ok.any():
        return {"i0": None, "i1": None, "lambda_start": None, "lambda_elbow": None,
                "slope": None, "noise": noise, "n_points": 0}
    span = np.where(ok, w[j] - w[i], -np.inf)
    best = np.flatnonzero(span >= span.max() - 1e-12)
    b = best[np.argmax(nw[best])]
    return {"i0": int(i[b]), "i1": int(j[b]), "lambda_start": float(np.exp(u[i[b]])),
            "lambda_elbow": float(np.exp(u[j[b]])), "slope": float(slope[b]),
            "noise": float(noise), "n_points": int(nw[b])}


def fit_gamma1(curves: dict, opt_P: pd.DataFrame, P_used: Iterable[int], *,
               log: list | None = None, **elbow_kw) -> dict:
    """gamma1 per P on the collapsed curves, then mean and error of the mean (Appendix D).

    For every P: the seed-averaged curve is rescaled by (lambda_opt(P), eps_opt(P)) (Eq. 5),
    its pure power-law window is detected (:func:`detect_elbow`) and y = k x^-gamma1 is fitted
    there in log space.

    Returns:
      dict value, sigma (error of the mean over P; the fit error if only one P), n_P, method and
      per_P: list of dicts P, gamma1, sigma, k, lambda_start, lambda_elbow, x_range, n_points,
      noise.
    """
    per = []
    optd = opt_P.set_index("P")
    for P in P_used:
        c = curves[P]
        lo, eo = optd.loc[P, "lambda_opt_mean"], optd.loc[P, "eps_opt_mean"]
        x, y = c["lam"].to_numpy() / lo, c["eps"].to_numpy() / eo
        try:
            el = detect_elbow(x, y, **elbow_kw)
        except ValueError as e:
            _note(log, f"P={P}: no early power law ({e})")
            continue
        if el["i0"] is None:
            _note(log, f"P={P}: no window before the minimum is a power law within noise")
            continue
        sel = (x >= el["lambda_start"] * (1 - 1e-9)) & (x <= el["lambda_elbow"] * (1 + 1e-9))
        try:
            f = fit_power_law(x[sel], y[sel], with_q=False)
        except ValueError as e:
            _note(log, f"P={P}: gamma1 fit failed ({e})")
            continue
        # Range systematic: the same fit on the first 2/3 (in log lambda) of the window.
        cut = el["lambda_start"] * (el["lambda_elbow"] / el["lambda_start"]) ** (2.0 / 3.0)
        sel2 = sel & (x <= cut)
        g_short = -fit_power_law(x[sel2], y[sel2], with_q=False).a if sel2.sum() >= 3 else np.nan
        per.append({"P": int(P), "gamma1": -f.a, "sigma": f.sigma_a, "k": f.k,
                    "gamma1_short_window": g_short,
                    "lambda_start": el["lambda_start"] * lo, "lambda_elbow": el["lambda_elbow"] * lo,
                    "x_range": [el["lambda_start"], el["lambda_elbow"]],
                    "n_points": f.n_points, "noise": el["noise"], "chi2_red": f.chi2_red})
    if not per:
        raise ValueError("no P has a detectable early power-law window; cannot fit gamma1")
    g = np.array([p["gamma1"] for p in per])
    if g.size > 1:
        val, sig = float(g.mean()), float(g.std(ddof=1) / math.sqrt(g.size))
    else:
        val, sig = float(g[0]), float(per[0]["sigma"])
        _note(log, "gamma1 from a single P: sigma1 is that fit's error, not an error of the mean")
    gs = np.array([p["gamma1_short_window"] for p in per], float)
    sys = float(abs(np.nanmean(gs) - val)) if np.isfinite(gs).any() else 0.0
    return {"value": val, "sigma": sig, "sigma_window": sys, "sigma_total": math.hypot(sig, sys),
            "n_P": int(g.size), "per_P": per,
            "method": "mean over P of log-space fits x^-gamma1 on the collapsed curves' detected "
                      "pure power-law windows; sigma = error of the mean (Appendix D); "
                      "sigma_window = shift of the mean when each window is cut to its first 2/3 "
                      "in log lambda; sigma_total = both in quadrature"}


def fit_eq3(curves: dict, gamma1_res: dict, *, log: list | None = None) -> dict:
    """Global fit of Eq. 3, eps = k1 lambda^-gamma1 + q1, on the pooled early windows of all P."""
    lam, eps = [], []
    for p in gamma1_res["per_P"]:
        c = curves[p["P"]]
        sel = (c["lam"] >= p["lambda_start"] * (1 - 1e-9)) & (c["lam"] <= p["lambda_elbow"] * (1 + 1e-9))
        lam.append(c["lam"][sel].to_numpy())
        eps.append(c["eps"][sel].to_numpy())
    lam, eps = np.concatenate(lam), np.concatenate(eps)
    f = fit_power_law(lam, eps, with_q="auto")
    return {"k1": f.k, "sigma_k1": f.sigma_k, "gamma1": -f.a, "sigma_gamma1": f.sigma_a,
            "q1": f.q, "sigma_q1": f.sigma_q, "q1_kept": f.q_kept, "q_test": _jsonable(f.q_test),
            "fit_range_lambda": list(f.x_range), "n_points": f.n_points, "chi2_red": f.chi2_red}


def fit_gamma2(opt: pd.DataFrame, P_used: Sequence[int], *, with_q="auto",
               drop_unreached: bool = False, log: list | None = None) -> dict:
    """Fit of Eq. 4, lambda_opt = k2 P^gamma2 + q2, in log space on the per-seed optima.

    Every (P, seed) optimum is one point (equal weights in log space: the seed scatter sets the
    error through the reduced chi^2; a 3-5 seed standard error is too noisy to weight by).
    Curves whose minimum was not bracketed (at_end) stay in by default, as in the paper, where
    lambda_opt is "at the end of the training" for models that do not overfit; drop_unreached
    leaves them out.

    Args:
      opt: per (P, seed) optima from :func:`optima`.
      P_used: values of P in the fit.

    Returns:
      dict k2, gamma2, q2 with sigmas, q2_kept and its test, fit_range_P, n_points, n_P.

    Raises:
      ValueError: fewer than 2 values of P with a reached minimum.
    """
    sub = opt[opt["P"].isin(list(P_used))]
    if drop_unreached:
        dropped = sorted({int(p) for p in sub.loc[sub["at_end"], "P"]})
        sub = sub[~sub["at_end"]]
        if dropped:
            _note(log, f"gamma2: left out curves whose minimum was not reached, at P={dropped}")
    nP = sub["P"].nunique()
    if nP < 2:
        raise ValueError(f"gamma2 needs lambda_opt at >= 2 values of P, got P={_Ps(sub)}")
    f = fit_power_law(sub["P"].to_numpy(float), sub["lambda_opt"].to_numpy(float),
                      with_q=with_q if nP >= 4 else False)
    return {"k2": f.k, "sigma_k2": f.sigma_k, "gamma2": f.a, "sigma_gamma2": f.sigma_a,
            "q2": f.q, "sigma_q2": f.sigma_q, "q2_kept": f.q_kept, "q_test": _jsonable(f.q_test),
            "fit_range_P": list(f.x_range), "n_points": f.n_points, "n_P": int(nP),
            "chi2_red": f.chi2_red}


def fit_gamma_eps(opt: pd.DataFrame, P_used: Sequence[int], column: str = "eps_end",
                  with_q="auto") -> dict:
    """Fit of eps(P) = k P^-gamma + q (Fig. 9) in log space on the per-seed ``column`` values.

    Args:
      opt: per (P, seed) optima from :func:`optima`.
      P_used: values of P in the fit.
      column: "eps_end" (test error at the last evaluation: gamma_meas) or "eps_opt".

    Raises:
      ValueError: fewer than 2 values of P, or an unknown column.
    """
    if column not in ("eps_end", "eps_opt"):
        raise ValueError(f"column must be 'eps_end' or 'eps_opt', got {column!r}")
    sub = opt[opt["P"].isin(list(P_used))]
    nP = sub["P"].nunique()
    if nP < 2:
        raise ValueError(f"eps(P) exponent needs >= 2 values of P, got P={_Ps(sub)}")
    f = fit_power_law(sub["P"].to_numpy(float), sub[column].to_numpy(float),
                      with_q=with_q if nP >= 4 else False)
    return {"gamma": -f.a, "sigma": f.sigma_a, "k": f.k, "sigma_k": f.sigma_k, "q": f.q,
            "sigma_q": f.sigma_q, "q_kept": f.q_kept, "q_test": _jsonable(f.q_test),
            "fit_range_P": list(f.x_range), "n_points": f.n_points, "n_P": int(nP),
            "chi2_red": f.chi2_red, "quantity": column}


# ----------------------------------------------------------------------------------------------
# Collapse (Eq. 5)
# ----------------------------------------------------------------------------------------------

def rescaled_curves(curves: dict, opt_P: pd.DataFrame, P_used: Iterable[int] | None = None) -> dict:
    """{P: (x, y)} with x = lambda/lambda_opt(P), y = eps/eps_opt(P) (Eq. 5), seed-mean curves."""
    optd = opt_P.set_index("P")
    P_used = sorted(curves) if P_used is None else P_used
    return {P: (curves[P]["lam"].to_numpy() / optd.loc[P, "lambda_opt_mean"],
                curves[P]["eps"].to_numpy() / optd.loc[P, "eps_opt_mean"]) for P in P_used}


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

def _core(df, P_used, refine, log, elbow_kw):
    """gamma1, gamma2, gamma_meas, gamma_pred for one cleaned frame (also used by the bootstrap)."""
    opt = optima(df, refine=refine, log=log)
    opt_P = optima_by_P(opt)
    curves = mean_curves(df)
    P_used = [P for P in P_used if P in curves]
    out = {"opt": opt, "opt_P": opt_P, "curves": curves, "P_used": P_used}
    out["gamma1"] = fit_gamma1(curves, opt_P, P_used, log=log, **elbow_kw)
    out["gamma2"] = fit_gamma2(opt, P_used)
    out["gamma_meas"] = fit_gamma_eps(opt, P_used, "eps_end")
    g1, s1 = out["gamma1"]["value"], out["gamma1"]["sigma"]
    g2, s2 = out["gamma2"]["gamma2"], out["gamma2"]["sigma_gamma2"]
    gp = g1 * g2
    out["gamma_pred"] = {"value": gp, "sigma": abs(gp) * math.sqrt((s1 / g1) ** 2 + (s2 / g2) ** 2)}
    return out


def analyze(df: pd.DataFrame, *, p_min: int | None = None, collapse_tol: float = 0.08,
            refine_optimum: bool = True, n_boot: int = 100, boot_seed: int = 0,
            elbow_kw: dict | None = None) -> dict:
    """Full Sec. 3.2 / Sec. 4 / Appendix D analysis of one (arch, dataset) results table.

    Args:
      df: results DataFrame of one architecture and dataset (see :func:`clean`).
      p_min: smallest P used in the fits; None chooses it from the collapse
        (:func:`choose_p_min`).
      collapse_tol: tolerance (rms log10 deviation) of the automatic P_min.
      refine_optimum: parabola refinement of each curve's minimum (:func:`curve_optimum`).
      n_boot: bootstrap resamples over seeds (0 disables).
      boot_seed: seed of the bootstrap.
      elbow_kw: options for :func:`detect_elbow`.

    Returns:
      JSON-serializable summary dict: labels, P values, p_min, warnings, optima per P, elbows,
      gamma1 (Appendix D), eq3 (global Eq. 3 fit), gamma2 (Eq. 4), gamma_meas and gamma_opt
      (eps(P) fits), gamma_pred, comparison sigma (Appendix D), bootstrap, collapse quality,
      thresholds P_-/P_+, and the Table 1 / Table 2 rows. Failures of a step are recorded under
      "errors" with the reason instead of raising.

    Raises:
      ValueError: unusable input (missing columns, no rows, bad p_min, several arch/dataset).
    """
    log: list = []
    errors: dict = {}
    elbow_kw = dict(elbow_kw or {})
    d = clean(df, log)
    arch = _single_label(d, "arch")
    dataset = _single_label(d, "dataset")
    size = _single_label(d, "size")  # a model size ("paper"/"small") is part of the model
    Ps = sorted(int(p) for p in d["P"].unique())
    summary: dict[str, Any] = {"arch": arch, "dataset": dataset, "size": size,
                               "n_rows": int(len(df)),
                               "n_rows_used": int(len(d)), "P_values": Ps,
                               "seeds": sorted(int(s) for s in d["seed"].unique()),
                               "warnings": log, "errors": errors}
    curves = mean_curves(d)
    opt = optima(d, refine=refine_optimum, log=log)
    opt_P = optima_by_P(opt)
    summary["optimum_method"] = "parabola vertex in log-log around the arg-min" if refine_optimum \
        else "arg-min"
    summary["optima"] = _records(opt_P)
    if p_min is None:
        if len(Ps) >= 2:
            ch = choose_p_min(curves, opt_P, tol=collapse_tol)
            p_min_used, summary["p_min_mode"] = ch["p_min"], "auto"
            summary["p_min_deviations"] = ch["deviations"]
        else:
            p_min_used, summary["p_min_mode"] = Ps[0], "auto"
    else:
        if p_min > Ps[-1]:
            raise ValueError(f"p_min={p_min} exceeds the largest P in the data; P values: {Ps}")
        p_min_used, summary["p_min_mode"] = int(p_min), "user"
    P_used = [P for P in Ps if P >= p_min_used]
    summary["p_min"] = int(p_min_used)
    summary["collapse_tol"] = collapse_tol
    summary["P_used"] = P_used
    if len(Ps) < 2:
        _note(log, f"only one value of P ({Ps}): gamma2, gamma_meas and the collapse need >= 2")

    resc = rescaled_curves(curves, opt_P, P_used)
    summary["collapse"] = collapse_quality(resc)
    summary["collapse_all_P"] = collapse_quality(rescaled_curves(curves, opt_P, Ps))

    g1 = g2 = gm = None
    try:
        g1 = fit_gamma1(curves, opt_P, P_used, log=log, **elbow_kw)
        summary["gamma1"] = g1
        summary["elbow"] = [{"P": p["P"], "lambda_start": p["lambda_start"],
                             "lambda_elbow": p["lambda_elbow"]} for p in g1["per_P"]]
        summary["eq3"] = fit_eq3(curves, g1, log=log)
    except ValueError as e:
        errors["gamma1"] = str(e)
        _note(log, f"gamma1: {e}")
    try:
        g2 = fit_gamma2(opt, P_used, log=log)
        summary["gamma2"] = g2
    except ValueError as e:
        errors["gamma2"] = str(e)
        _note(log, f"gamma2: {e}")
    try:
        gm = fit_gamma_eps(opt, P_used, "eps_end")
        summary["gamma_meas"] = gm
        summary["gamma_opt"] = fit_gamma_eps(opt, P_used, "eps_opt")
    except ValueError as e:
        errors["gamma_meas"] = str(e)
        _note(log, f"gamma_meas: {e}")

    if g1 is not None and g2 is not None:
        a, sa, b, sb = g1["value"], g1["sigma"], g2["gamma2"], g2["sigma_gamma2"]
        gp = a * b
        sp = abs(gp) * math.sqrt((sa / a) ** 2 + (sb / b) ** 2)  # Appendix D
        # The same propagation with sigma1 including the fit-window systematic.
        a_tot = g1.get("sigma_total", sa)
        sp_tot = abs(gp) * math.sqrt((a_tot / a) ** 2 + (sb / b) ** 2)
        summary["gamma_pred"] = {"value": gp, "sigma": sp, "sigma_total": sp_tot,
                                 "formula": "gamma1 * gamma2; sigma as Appendix D"}
        if gm is not None:
            sig = math.sqrt(sp ** 2 + gm["sigma"] ** 2)  # Appendix D comparison sigma
            sig_tot = math.sqrt(sp_tot ** 2 + gm["sigma"] ** 2)
            summary["comparison"] = {"gamma_pred": gp, "gamma_meas": gm["gamma"], "sigma": sig,
                                     "z": (gp - gm["gamma"]) / sig if sig > 0 else None,
                                     "sigma_total": sig_tot}
    if g1 is not None and g2 is not None and "eq3" in summary:
        e3 = summary["eq3"]
        th = thresholds(e3["k1"], e3["gamma1"], e3["q1"], g2["k2"], g2["gamma2"], g2["q2"])
        th.update(_threshold_log_sigmas(e3, g2))
        th["note"] = ("P_- needs q2 > 0 and P_+ needs q1 > 0; None means the q term was "
                      "compatible with zero (Sec. 4), i.e. the data sit in the power-law regime")
        summary["thresholds"] = th

    if n_boot and g1 is not None and g2 is not None and gm is not None:
        summary["bootstrap"] = bootstrap(d, P_used, n_boot=n_boot, seed=boot_seed,
                                         refine=refine_optimum, elbow_kw=elbow_kw)
    summary["table1"] = table1_row(summary)
    summary["table2"] = table2_row(summary)
    return _jsonable(summary)


def _threshold_log_sigmas(e3: dict, g2: dict) -> dict:
    """First-order errors of ln P_- and ln P_+ from the (independent) fit errors of Eqs. 3-4."""
    k1, sk1, a, sa, q1, sq1 = (e3[k] for k in ("k1", "sigma_k1", "gamma1", "sigma_gamma1", "q1",
                                               "sigma_q1"))
    k2, sk2, b, sb, q2, sq2 = (g2[k] for k in ("k2", "sigma_k2", "gamma2", "sigma_gamma2", "q2",
                                               "sigma_q2"))
    out = {"sigma_ln_P_minus": None, "sigma_ln_P_plus": None}
    if q2 and q2 > 0:
        L = math.log(q2 / k2)
        out["sigma_ln_P_minus"] = _f(math.sqrt(((sq2 / q2) ** 2 + (sk2 / k2) ** 2) / b ** 2
                                               + (L * sb / b ** 2) ** 2))
    if q1 and q1 > 0:
        L = math.log(k1) - a * math.log(k2) - math.log(q1)
        sL2 = (sk1 / k1) ** 2 + (a * sk2 / k2) ** 2 + (math.log(k2) * sa) ** 2 + (sq1 / q1) ** 2
        out["sigma_ln_P_plus"] = _f(math.sqrt(sL2 / (a * b) ** 2
                                              + (L / (a * b)) ** 2 * ((sa / a) ** 2 + (sb / b) ** 2)))
    return out


def bootstrap(df: pd.DataFrame, P_used: Sequence[int], *, n_boot: int = 100, seed: int = 0,
              refine: bool = True, elbow_kw: dict | None = None) -> dict:
    """Bootstrap over seeds of gamma1, gamma2, gamma_meas and gamma_pred.

    Each resample draws the seed labels with replacement (the same draw for every P, which keeps
    any correlation between a seed's runs at different P) and reruns the fits at fixed P_min.

    Returns:
      dict n (successful resamples), n_seeds, and per quantity {mean, std, p16, p84}.
    """
    seeds = np.array(sorted(df["seed"].unique()))
    if seeds.size < 2:
        return {"n": 0, "n_seeds": int(seeds.size), "note": "bootstrap needs >= 2 seeds"}
    gen = np.random.default_rng(seed)
    by_seed = {s: g for s, g in df.groupby("seed")}
    vals = {"gamma1": [], "gamma2": [], "gamma_meas": [], "gamma_pred": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n_boot):
            draw = gen.choice(seeds, size=seeds.size, replace=True)
            parts = [by_seed[s].assign(seed=k) for k, s in enumerate(draw)]
            try:
                r = _core(pd.concat(parts, ignore_index=True), P_used, refine, None, elbow_kw or {})
            except (ValueError, np.linalg.LinAlgError):
                continue
            vals["gamma1"].append(r["gamma1"]["value"])
            vals["gamma2"].append(r["gamma2"]["gamma2"])
            vals["gamma_meas"].append(r["gamma_meas"]["gamma"])
            vals["gamma_pred"].append(r["gamma_pred"]["value"])
    out = {"n": len(vals["gamma1"]), "n_seeds": int(seeds.size), "seed": seed}
    for k, v in vals.items():
        v = np.asarray(v)
        out[k] = ({"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else None,
                   "p16": float(np.percentile(v, 16)), "p84": float(np.percentile(v, 84))}
                  if v.size else None)
    if out["gamma_pred"] and out["gamma_meas"] and out["gamma_pred"]["std"] is not None:
        out["comparison_sigma"] = math.hypot(out["gamma_pred"]["std"], out["gamma_meas"]["std"])
    return out


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
    """Table 1 row: Model, Dataset, gamma_pred, gamma_meas, sigma (Appendix D)."""
    gp, gm = s.get("gamma_pred") or {}, s.get("gamma_meas") or {}
    return {"Model": _model_name(s),
            "Dataset": _NAMES.get(s.get("dataset"), s.get("dataset")),
            "gamma_pred": gp.get("value"), "gamma_meas": gm.get("gamma"),
            "sigma": (s.get("comparison") or {}).get("sigma"),
            "sigma_pred": gp.get("sigma"), "sigma_meas": gm.get("sigma"),
            "sigma_total": (s.get("comparison") or {}).get("sigma_total"),
            "sigma_boot": ((s.get("bootstrap") or {}).get("comparison_sigma"))}


def table2_row(s: dict) -> dict:
    """Table 2 row: Model, Dataset, gamma1, sigma1, gamma2, sigma2."""
    g1, g2 = s.get("gamma1") or {}, s.get("gamma2") or {}
    return {"Model": _model_name(s),
            "Dataset": _NAMES.get(s.get("dataset"), s.get("dataset")),
            "gamma1": g1.get("value"), "sigma1": g1.get("sigma"),
            "gamma2": g2.get("gamma2"), "sigma2": g2.get("sigma_gamma2"),
            "sigma1_total": g1.get("sigma_total"),
            "sigma1_boot": ((s.get("bootstrap") or {}).get("gamma1") or {}).get("std"),
            "sigma2_boot": ((s.get("bootstrap") or {}).get("gamma2") or {}).get("std")}


def tables(summaries: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table 1 and Table 2 DataFrames from {name: summary} (groups that failed are skipped)."""
    ok = [s for s in summaries.values() if "table1" in s]
    cols1 = ["Model", "Dataset", "gamma_pred", "gamma_meas", "sigma", "sigma_pred", "sigma_meas",
             "sigma_total", "sigma_boot"]
    cols2 = ["Model", "Dataset", "gamma1", "sigma1", "gamma2", "sigma2", "sigma1_total",
             "sigma1_boot", "sigma2_boot"]
    return (pd.DataFrame([s["table1"] for s in ok], columns=cols1),
            pd.DataFrame([s["table2"] for s in ok], columns=cols2))


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
                  n_grid: int = 60, baseline: bool = True) -> pd.DataFrame:
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

    Returns:
      DataFrame, one row per column, best (smallest ``spread_mean``) first: column, spread_mean, spread_max
      (log10 units), overlap_decades (decades of x where >= 2 curves overlap), n_grid_used, n_P, rank.

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
    out = pd.DataFrame(rows).sort_values("spread_mean", na_position="last", kind="stable").reset_index(drop=True)
    out["rank"] = np.arange(1, len(out) + 1)
    return out

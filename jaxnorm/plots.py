"""Figures of D'Amico, Bocchi, Negri (2025) from a results table and its analysis summary.

Every function writes a PNG and a PDF (``path`` with or without extension) with the Agg backend
and returns the written paths. Curves are coloured by P from blue (small) to orange (large), as
in the paper's Figs. 3-4.

Figures: :func:`plot_curves` (quick look), :func:`fig3_curves`, :func:`fig4_collapse`,
:func:`fig5_eq6`, :func:`fig6_margins`, :func:`fig7_time`, :func:`fig8_fits`,
:func:`fig9_pred_vs_meas`; :func:`all_figures` writes them all.
"""

from __future__ import annotations

import os
import textwrap
import warnings
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap, LogNorm  # noqa: E402

from jaxnorm import analysis  # noqa: E402

P_CMAP = LinearSegmentedColormap.from_list("blue_orange", ["#1f3f99", "#5b8fd6", "#b7a3c8",
                                                           "#f0a050", "#e8700a"])


def _colors(Ps: Sequence[int]) -> dict:
    """P -> colour, evenly spaced in log P from blue to orange."""
    Ps = sorted(Ps)
    if len(Ps) == 1:
        return {Ps[0]: P_CMAP(0.0)}
    lp = np.log(np.asarray(Ps, float))
    t = (lp - lp.min()) / (lp.max() - lp.min())
    return {P: P_CMAP(float(v)) for P, v in zip(Ps, t)}


def _colorbar(fig, ax, Ps):
    sm = plt.cm.ScalarMappable(cmap=P_CMAP, norm=LogNorm(min(Ps), max(Ps) if max(Ps) > min(Ps)
                                                         else min(Ps) * 1.0001))
    cb = fig.colorbar(sm, ax=ax, pad=0.01)
    cb.set_label("P")


def _save(fig, path: str) -> list[str]:
    root, ext = os.path.splitext(path)
    if ext.lower() not in (".png", ".pdf"):
        root = path
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    for ax in fig.axes:  # minor-tick labels of a log axis spanning < 1 decade collide with each other
        if ax.get_xscale() == "log":
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    out = []
    for e in (".png", ".pdf"):
        fig.savefig(root + e, dpi=150, bbox_inches="tight")
        out.append(root + e)
    plt.close(fig)
    return out


def _title(df: pd.DataFrame) -> str:
    parts = [str(df[c].iloc[0]) for c in ("arch", "dataset") if c in df.columns and len(df)]
    return " / ".join(parts)


def _curves(df):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", analysis.AnalysisWarning)
        d = analysis.clean(df)
    return d, analysis.mean_curves(d)


def _opt_table(summary: dict | None, d: pd.DataFrame) -> pd.DataFrame:
    """Per-P optima (columns P, lambda_opt, eps_opt, bracketed, eps_end, ...): the summary's, or
    computed as analysis.analyze would."""
    if summary and summary.get("optima"):
        return pd.DataFrame(summary["optima"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", analysis.AnalysisWarning)
        return analysis.optimum_per_P(analysis.mean_curves(d), "vertex", analysis.optima(d))


def _exp(summary: dict | None, name: str) -> dict | None:
    """A determined exponent of the summary in its one serialized form, else None."""
    e = (summary or {}).get(name)
    return e if e and e.get("determined", True) and e.get("value") is not None else None


# ----------------------------------------------------------------------------------------------

def plot_curves(df: pd.DataFrame, path: str) -> list[str]:
    """Test error vs spectral complexity per P, mean over seeds (log-log); the sweep's quick look.

    Args:
      df: results DataFrame.
      path: output path (".png"/".pdf" or no extension; both are written).

    Returns:
      The written file paths.
    """
    d, curves = _curves(df)
    cols = _colors(list(curves))
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for P, c in curves.items():
        ax.plot(c["lam"], c["eps"], color=cols[P], lw=1.4, label=f"P={P}")
    ax.set(xscale="log", yscale="log", xlabel=r"spectral complexity $\lambda$",
           ylabel=r"test error $\epsilon$", title=_title(d))
    if len(curves) <= 8:
        ax.legend(fontsize=7, frameon=False)
    else:
        _colorbar(fig, ax, list(curves))
    return _save(fig, path)


def fig3_curves(df: pd.DataFrame, path: str, summary: dict | None = None) -> list[str]:
    """Fig. 3: eps vs lambda(t) per P, log-log, blue (small P) to orange (large P).

    Per-seed curves are drawn thin, the seed mean thick; with a summary, the fitted early power
    law of Eq. 3 (dashed) and the optima (stars) are overlaid.
    """
    d, curves = _curves(df)
    cols = _colors(list(curves))
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    for (P, _s), g in d.groupby(["P", "seed"]):
        ax.plot(g["spectral_complexity"], g["test_error"], color=cols[int(P)], lw=0.5, alpha=0.25)
    for P, c in curves.items():
        ax.plot(c["lam"], c["eps"], color=cols[P], lw=1.6)
    opt = _opt_table(summary, d)
    br = opt["bracketed"].astype(bool)
    ax.scatter(opt.loc[br, "lambda_opt"], opt.loc[br, "eps_opt"], marker="*", s=70,
               c=[cols[int(P)] for P in opt.loc[br, "P"]], edgecolors="k", linewidths=0.5,
               zorder=5, label=r"$(\lambda_{opt}, \epsilon_{opt})$")
    if (~br).any():
        ax.scatter(opt.loc[~br, "lambda_opt"], opt.loc[~br, "eps_opt"], marker=">", s=40,
                   facecolors="none", edgecolors="k", linewidths=0.7, zorder=5,
                   label="minimum not bracketed")
    g1 = _exp(summary, "gamma1")
    if g1 and g1.get("k") is not None:
        lam = np.geomspace(d["spectral_complexity"].min(), opt["lambda_opt"].max(), 100)
        ax.plot(lam, g1["k"] * lam ** (-g1["value"]) + (g1.get("q") or 0.0), "k--", lw=1.0,
                label=rf"Eq. 3: $\gamma_1$={g1['value']:.3g}")
    ax.set(xscale="log", yscale="log", xlabel=r"spectral complexity $\lambda(t)$",
           ylabel=r"test error $\epsilon$", title=_title(d))
    ax.legend(fontsize=7, frameon=False, loc="lower left")
    _colorbar(fig, ax, list(curves))
    return _save(fig, path)


def fig4_collapse(df: pd.DataFrame, path: str, summary: dict | None = None) -> list[str]:
    """Fig. 4: eps/eps_opt vs lambda/lambda_opt (Eq. 5), one seed-mean curve per P.

    With a summary, P < P_min are drawn faded and the collapse spread is printed.
    """
    d, curves = _curves(df)
    cols = _colors(list(curves))
    opt = _opt_table(summary, d)
    resc = analysis.rescaled_curves(curves, opt)
    p_min = (summary or {}).get("p_min", min(curves))
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    for P, (x, y) in resc.items():
        ax.plot(x, y, color=cols[P], lw=1.5, alpha=1.0 if P >= p_min else 0.3)
    ax.axvline(1.0, color="0.6", lw=0.7, ls=":")
    ax.axhline(1.0, color="0.6", lw=0.7, ls=":")
    ax.set(xscale="log", yscale="log", xlabel=r"$\lambda/\lambda_{opt}(P)$",
           ylabel=r"$\epsilon/\epsilon_{opt}(P)$", title=_title(d))
    cq = (summary or {}).get("collapse") or {}
    if cq.get("spread_mean") is not None:
        ax.text(0.98, 0.97, f"spread (P $\\geq$ {p_min}): {cq['spread_mean']:.3f} dex",
                transform=ax.transAxes, ha="right", va="top", fontsize=8)
    _colorbar(fig, ax, list(curves))
    return _save(fig, path)


def fig5_eq6(path: str, gamma1: float = 0.6, k1: float = 50.0, q1: float = 0.01,
             gamma2: float = 1.0, k2: float = 1.0, q2: float = 1000.0,
             P_range: tuple = (1.0, 1e9)) -> list[str]:
    """Fig. 5: sketch of Eq. 6 with its three regimes and the thresholds P_-, P_+ (Sec. 4).

    Defaults are the paper's caption (gamma1=0.6, k1=50, q1=0.01, gamma2=1, k2=1, q2=1000).
    """
    P = np.geomspace(*P_range, 400)
    eps = analysis.eq6(P, k1, gamma1, q1, k2, gamma2, q2)
    th = analysis.thresholds(k1, gamma1, q1, k2, gamma2, q2)
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    ax.plot(P, eps, color="C0", lw=2.0, label="Eq. 6")
    ax.plot(P, k1 * k2 ** (-gamma1) * P ** (-gamma1 * gamma2), "k--", lw=0.9,
            label=(rf"$k_1 k_2^{{-\gamma_1}} P^{{-\gamma_1\gamma_2}}$ "
                   rf"($\gamma_1\gamma_2$={gamma1 * gamma2:.2g})"))
    if th["low_P_plateau"] is not None:
        ax.axhline(th["low_P_plateau"], color="C2", ls=":", lw=1.0,
                   label=r"$k_1 q_2^{-\gamma_1} + q_1$")
    if q1 > 0:
        ax.axhline(q1, color="C3", ls=":", lw=1.0, label=r"$q_1$")
    for name, lab in (("P_minus", r"$P_-$"), ("P_plus", r"$P_+$")):
        if th[name] is not None and P_range[0] < th[name] < P_range[1]:
            ax.axvline(th[name], color="0.4", lw=0.8)
            ax.text(th[name], 0.03, " " + lab, transform=ax.get_xaxis_transform(), fontsize=9)
    ax.set(xscale="log", yscale="log", xlabel="P", ylabel=r"$\epsilon(P)$",
           ylim=(0.5 * min(eps.min(), q1 if q1 > 0 else eps.min()), 2.0 * eps.max()),
           title=rf"$\gamma_1$={gamma1}, $k_1$={k1}, $q_1$={q1}, $\gamma_2$={gamma2}, "
                 rf"$k_2$={k2}, $q_2$={q2}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, frameon=False, loc="center right")
    return _save(fig, path)


def fig6_margins(run_dir_or_table, df: pd.DataFrame, path: str, P: int | None = None,
                 seed: int | None = None, max_epochs: int = 6) -> list[str]:
    """Fig. 6 right: test-margin distributions at several epochs, margins / spectral complexity.

    Args:
      run_dir_or_table: a run directory (reads margins/P{P}_s{seed}_e{epoch}.npy) or the table of
        :func:`jaxnorm.analysis.load_margins`.
      df: results DataFrame (for lambda at each saved epoch).
      path: output path.
      P, seed: which network (default: the largest P and smallest seed with margins).
      max_epochs: at most this many epochs, evenly picked.

    Raises:
      ValueError: no margin files (for that P/seed).
    """
    tab = (analysis.load_margins(run_dir_or_table) if isinstance(run_dir_or_table, str)
           else run_dir_or_table)
    if len(tab) == 0:
        raise ValueError("no margin files (margins/P{P}_s{seed}_e{epoch}.npy) found")
    P = int(tab["P"].max()) if P is None else int(P)
    sub = tab[tab["P"] == P]
    seed = int(sub["seed"].min()) if seed is None and len(sub) else seed
    sub = sub[sub["seed"] == seed].sort_values("epoch")
    if len(sub) == 0:
        raise ValueError(f"no margin files for P={P}, seed={seed}; available (P, seed): "
                         f"{sorted(set(zip(tab['P'], tab['seed'])))}")
    if len(sub) > max_epochs:
        sub = sub.iloc[np.unique(np.linspace(0, len(sub) - 1, max_epochs).round().astype(int))]
    lam_of = df[(df["P"] == P) & (df["seed"] == seed)].set_index("epoch")["spectral_complexity"]
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    n = len(sub)
    for k, r in enumerate(sub.itertuples(index=False)):
        m = np.load(r.path).astype(float)
        lam = float(lam_of.get(r.epoch, np.nan))
        if not np.isfinite(lam):  # nearest evaluated epoch
            near = lam_of.index[np.argmin(np.abs(lam_of.index.to_numpy() - r.epoch))]
            lam = float(lam_of.loc[near])
        ax.hist(m / lam, bins=60, density=True, histtype="step", lw=1.4,
                color=cmap(k / max(n - 1, 1)), label=f"epoch {r.epoch}")
    ax.axvline(0.0, color="0.5", lw=0.7, ls=":")
    ax.set(xlabel=r"margin / spectral complexity  $(f_y - \max_{j\neq y} f_j)/\lambda$",
           ylabel="density", title=f"{_title(df)}  P={P}, seed={seed}")
    ax.legend(fontsize=7, frameon=False)
    return _save(fig, path)


def fig7_time(df: pd.DataFrame, path: str) -> list[str]:
    """Fig. 7: test error vs epochs (left) and spectral complexity vs epochs (right), per P."""
    d, curves = _curves(df)
    cols = _colors(list(curves))
    fig, (a, b) = plt.subplots(1, 2, figsize=(9.5, 3.8))
    for P, c in curves.items():
        a.plot(c["epoch"], c["eps"], color=cols[P], lw=1.4)
        b.plot(c["epoch"], c["lam"], color=cols[P], lw=1.4)
    a.set(xscale="log", yscale="log", xlabel="epoch", ylabel=r"test error $\epsilon$")
    b.set(xscale="log", yscale="log", xlabel="epoch", ylabel=r"spectral complexity $\lambda$")
    fig.suptitle(_title(d), fontsize=10)
    _colorbar(fig, b, list(curves))
    return _save(fig, path)


def fig8_fits(df: pd.DataFrame, summary: dict, path: str) -> list[str]:
    """Fig. 8: gamma1 fits on the collapse (dashed, left) and the Eq. 4 fit of lambda_opt(P) (right)."""
    d, curves = _curves(df)
    cols = _colors(list(curves))
    opt = _opt_table(summary, d)
    P_used = summary.get("P_used", sorted(curves))
    resc = analysis.rescaled_curves(curves, opt, P_used)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.9))
    for P, (x, y) in resc.items():
        a.plot(x, y, color=cols[P], lw=1.2, alpha=0.8)
    g1 = _exp(summary, "gamma1")
    optd = opt.set_index("P")
    for p in ((g1 or {}).get("detail") or {}).get("per_P", []):
        lo_opt, eo = optd.loc[p["P"], "lambda_opt"], optd.loc[p["P"], "eps_opt"]
        if "lambda_elbow" in p:  # automatic: window in raw lambda
            lam = np.geomspace(p["lambda_start"], p["lambda_elbow"], 20)
            a.plot(lam / lo_opt, 1.6 * p["k"] * lam ** (-p["gamma1"]) / eo, "--",
                   color=cols[p["P"]], lw=1.2)
        else:  # authors' window on the collapse
            xx = np.geomspace(*p["x_range"], 20)
            a.plot(xx, 1.6 * p["k"] * xx ** (-p["gamma1"]), "--", color=cols[p["P"]], lw=1.2)
    if g1:
        a.text(0.03, 0.04, rf"$\gamma_1$ = {g1['value']:.3f} $\pm$ {g1['sigma']:.3f}"
               "\n(dashed: fit windows, shifted up x1.6)", transform=a.transAxes, fontsize=8)
    a.set(xscale="log", yscale="log", xlabel=r"$\lambda/\lambda_{opt}$",
          ylabel=r"$\epsilon/\epsilon_{opt}$", title="early power law on the collapse")
    br = opt["bracketed"].astype(bool)
    o = opt[opt["P"].isin(P_used) & br]
    sig = o["sigma_ln_lambda_opt"].fillna(0).to_numpy(float)
    b.errorbar(o["P"], o["lambda_opt"], yerr=[o["lambda_opt"] * (1 - np.exp(-sig)),
                                              o["lambda_opt"] * (np.exp(sig) - 1)],
               fmt="o", color="C0", ms=4, capsize=2, label=r"$\lambda_{opt}$ (seed-mean curve)")
    oo = opt[~opt["P"].isin(P_used) & br]
    if len(oo):
        b.plot(oo["P"], oo["lambda_opt"], "o", color="0.7", ms=4, label=r"$P < P_{min}$")
    nb = opt[~br]
    if len(nb):
        b.plot(nb["P"], nb["lambda_bound"] if "lambda_bound" in nb else nb["lambda_opt"], "^",
               mfc="none", color="k", ms=5, label="not bracketed: lower bound (censored)")
    g2 = _exp(summary, "gamma2")
    if g2:
        PP = np.geomspace(opt["P"].min(), opt["P"].max(), 100)
        b.plot(PP, g2["k"] * PP ** g2["value"] + (g2.get("q") or 0.0), "k--", lw=1.0,
               label=rf"$\gamma_2$ = {g2['value']:.3f} $\pm$ {g2['sigma']:.3f}"
                     + (rf", $q_2$={g2['q']:.3g}" if g2.get("q_kept") else "")
                     + (" (censored fit)" if "Tobit" in (g2.get("method") or "") else ""))
    elif (summary.get("gamma2") or {}).get("reason"):
        b.text(0.03, 0.04, "gamma2 not determined:\n" + textwrap.fill(summary["gamma2"]["reason"], 60),
               transform=b.transAxes, fontsize=6)
    b.set(xscale="log", yscale="log", xlabel="P", ylabel=r"$\lambda_{opt}$",
          title=r"Eq. 4: $\lambda_{opt} = k_2 P^{\gamma_2} + q_2$")
    b.legend(fontsize=7, frameon=False)
    fig.suptitle(_title(d), fontsize=10)
    return _save(fig, path)


def fig9_pred_vs_meas(df: pd.DataFrame, summary: dict, path: str) -> list[str]:
    """Fig. 9: measured eps(P) (end of training and at the optimum) with fits, and the predicted law.

    The predicted law has exponent gamma_pred = gamma1 gamma2; its coefficient is chosen to
    match the data at the geometric mean of P (only the exponent is predicted, as in the paper).
    """
    d, curves = _curves(df)
    opt = _opt_table(summary, d)
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    ax.plot(opt["P"], opt["eps_end"], "o", color="k", ms=4, label=r"$\epsilon$ at end of training")
    br = opt["bracketed"].astype(bool)
    ax.plot(opt.loc[br, "P"], opt.loc[br, "eps_opt"], "s", mfc="none", color="C3", ms=5,
            label=r"$\epsilon_{opt}$ (bracketed minima)")
    P_used = summary.get("P_used", list(opt["P"]))
    PP = np.geomspace(min(P_used), max(P_used), 100)
    gp = _exp(summary, "gamma_pred")
    for name, style, lab in (("gamma_end", "C0-", r"\gamma_{end}"), ("gamma_opt", "C3-", r"\gamma_{opt}")):
        g = _exp(summary, name)
        if g:
            ax.plot(PP, g["k"] * PP ** (-g["value"]) + (g.get("q") or 0.0), style, lw=1.2,
                    label=rf"fit: ${lab}$ = {g['value']:.3f} $\pm$ {g['sigma']:.3f}")
    if gp:
        u = opt[opt["P"].isin(P_used)]
        Pm = float(np.exp(np.mean(np.log(u["P"]))))
        em = float(np.exp(np.mean(np.log(u["eps_end"]))))
        ax.plot(PP, em * (PP / Pm) ** (-gp["value"]), "C1--", lw=1.4,
                label=rf"predicted: $\gamma_{{pred}}$ = {gp['value']:.3f} $\pm$ {gp['sigma']:.3f}")
    ax.set(xscale="log", yscale="log", xlabel="P", ylabel=r"test error $\epsilon$",
           title=_title(d))
    ax.legend(fontsize=7, frameon=False)
    return _save(fig, path)


def all_figures(df: pd.DataFrame, summary: dict, out_dir: str,
                run_dir: str | None = None) -> dict:
    """Writes every figure into ``out_dir``.

    Returns:
      {figure name: [paths]} and, for figures that could not be drawn, {name: "skipped: reason"}.
    """
    os.makedirs(out_dir, exist_ok=True)
    jobs = {
        "fig3_curves": lambda p: fig3_curves(df, p, summary),
        "fig4_collapse": lambda p: fig4_collapse(df, p, summary),
        "fig5_eq6_sketch": lambda p: fig5_eq6(p),
        "fig7_time": lambda p: fig7_time(df, p),
        "fig8_fits": lambda p: fig8_fits(df, summary, p),
        "fig9_pred_vs_meas": lambda p: fig9_pred_vs_meas(df, summary, p),
    }
    if run_dir is not None:
        jobs["fig6_margins"] = lambda p: fig6_margins(run_dir, df, p)
    out = {}
    for name, job in jobs.items():
        try:
            out[name] = job(os.path.join(out_dir, name))
        except (ValueError, KeyError, TypeError) as e:
            plt.close("all")
            out[name] = f"skipped: {e}"
    return out

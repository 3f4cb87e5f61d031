"""Tests of jaxnorm.analysis on synthetic learning curves generated from known scaling laws.

The synthetic curves (analysis.synthetic_curves) satisfy Eqs. 3-6 exactly:
eps = eps_opt(P) Phi(lambda/lambda_opt(P)) with a shared early branch k1 lambda^-gamma1,
lambda_opt = k2 P^gamma2 + q2 and eps_end ~ P^-(gamma1 gamma2); so the analysis must return the
generating exponents, within its own stated uncertainties.
"""

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest

from jaxnorm import analysis as A

warnings.filterwarnings("ignore", category=A.AnalysisWarning)


def _analyze(df, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", A.AnalysisWarning)
        return A.analyze(df, **kw)


# ---------------------------------------------------------------------------------------------
# Power-law fits
# ---------------------------------------------------------------------------------------------

def test_fit_power_law_recovers_exact_law():
    x = np.geomspace(10, 1e4, 30)
    f = A.fit_power_law(x, 3.0 * x ** -0.7, with_q="auto")
    # Noiseless data: only the optimizer tolerance remains.
    assert f.a == pytest.approx(-0.7, abs=1e-6)
    assert f.k == pytest.approx(3.0, rel=1e-5)
    assert not f.q_kept and f.q == 0.0


def test_fit_power_law_keeps_significant_q():
    x = np.geomspace(10, 1e5, 40)
    f = A.fit_power_law(x, 2.0 * x ** -0.5 + 0.05, with_q="auto")
    assert f.q_kept
    assert f.q == pytest.approx(0.05, rel=1e-4)
    assert f.a == pytest.approx(-0.5, abs=1e-5)


def test_fit_power_law_drops_q_compatible_with_zero():
    rng = np.random.default_rng(0)
    x = np.geomspace(100, 1e4, 25)
    y = 5.0 * x ** -0.6 * np.exp(0.03 * rng.standard_normal(x.size))
    f = A.fit_power_law(x, y, with_q="auto")
    assert not f.q_kept
    assert f.q_test is not None and f.q_test["z"] < 3.0


def test_fit_power_law_sigma_has_frequentist_coverage():
    # 300 noisy realizations: the true exponent lies within 1 stated sigma ~68 % of the time.
    # Binomial sd of the fraction is 0.027, so [0.58, 0.78] is a ~4-sd band.
    rng = np.random.default_rng(1)
    x = np.geomspace(1e3, 5e4, 12)
    hits = []
    for _ in range(300):
        y = 2.0 * x ** -0.4 * np.exp(0.05 * rng.standard_normal(x.size))
        f = A.fit_power_law(x, y, with_q=False)
        hits.append(abs(f.a + 0.4) < f.sigma_a)
    assert 0.58 < np.mean(hits) < 0.78


def test_fit_power_law_rejects_bad_input():
    with pytest.raises(ValueError, match="with_q"):
        A.fit_power_law([1, 2, 3], [1, 2, 3], with_q="maybe")
    with pytest.raises(ValueError, match="at least 2"):
        A.fit_power_law([1.0], [1.0])


# ---------------------------------------------------------------------------------------------
# Optimum, elbow, collapse
# ---------------------------------------------------------------------------------------------

def test_curve_optimum_finds_parabola_vertex():
    lam = np.geomspace(1, 1e4, 80)
    u = np.log(lam)
    eps = np.exp(0.3 * (u - np.log(123.0)) ** 2 + np.log(0.05))
    o = A.curve_optimum(lam, eps)
    # An exact parabola in (log lambda, log eps): the vertex is exact up to round-off.
    assert o["lambda_opt"] == pytest.approx(123.0, rel=1e-8)
    assert o["eps_opt"] == pytest.approx(0.05, rel=1e-8)
    assert not o["at_end"]


def test_curve_optimum_flags_unbracketed_minimum():
    lam = np.geomspace(1, 100, 50)
    o = A.curve_optimum(lam, lam ** -0.5)
    assert o["at_end"] and o["lambda_opt"] == pytest.approx(100.0)


def test_detect_elbow_on_broken_power_law():
    # Pure power law up to lambda_b = 1e3, then a parabola in log-log (the late phase).
    lam = np.geomspace(1, 1e5, 200)
    u, ub = np.log(lam), np.log(1e3)
    v = np.where(u < ub, -0.5 * u, -0.5 * ub + -0.5 * (u - ub) + 0.4 * (u - ub) ** 2)
    el = A.detect_elbow(lam, np.exp(v))
    # The departure is ~(0.4 du^2); at the noise floor (0.003) it is detectable within
    # du ~ 0.1-0.3 after the break, i.e. within a factor 1.4 of lambda_b.
    assert 1e3 / 1.1 < el["lambda_elbow"] < 1e3 * 1.4
    assert el["slope"] == pytest.approx(-0.5, abs=1e-3)
    assert el["lambda_start"] == pytest.approx(1.0)


def test_detect_elbow_needs_points_before_minimum():
    lam = np.geomspace(1, 10, 20)
    with pytest.raises(ValueError, match="before the minimum"):
        A.detect_elbow(lam, lam ** 2.0)


def test_elbow_grows_with_P_and_collapse_is_tight():
    df = A.synthetic_curves(noise=0.01, rng=3)
    s = _analyze(df, n_boot=0)
    el = np.array([e["lambda_elbow"] for e in s["elbow"]])
    P = np.array([e["P"] for e in s["elbow"]])
    # lambda_elbow(P) grows with P (Sec. 3.2); here lambda_elbow / lambda_opt is the same for all
    # P in the noiseless law, so ln lambda_elbow ~ gamma2 ln P (gamma2 = 1). The detected elbow
    # moves with the noise realization by ~30 %, hence the wide band.
    slope = np.polyfit(np.log(P), np.log(el), 1)[0]
    assert 0.6 < slope < 1.2
    # 1 % point noise, 4 seeds: the seed-mean curves scatter ~0.002 dex; 0.01 dex is 5x that.
    assert s["collapse"]["spread_mean"] < 0.01


def test_broken_collapse_is_measured_and_excluded_from_p_min():
    df = A.synthetic_curves(noise=0.005, rng=4, P_values=(500, 1000, 2000, 4000, 8000, 16000))
    # The smallest P overfits three times faster: a different Phi, so it cannot collapse.
    m = df["P"] == 500
    lam_opt = 500.0
    x = df.loc[m, "spectral_complexity"] / lam_opt
    df.loc[m, "test_error"] *= np.where(x > 1, x ** 1.0, 1.0)
    s = _analyze(df, n_boot=0)
    per = s["collapse_all_P"]["per_P"]
    assert per["500"] > 3 * max(v for k, v in per.items() if k != "500")
    assert s["p_min"] == 1000 and s["p_min_mode"] == "auto"


# ---------------------------------------------------------------------------------------------
# Exponent recovery
# ---------------------------------------------------------------------------------------------

def test_exponents_within_5_percent_at_low_noise():
    df = A.synthetic_curves(gamma1=0.5, gamma2=1.0, noise=0.005, seed_jitter=0.005, rng=0)
    s = _analyze(df, n_boot=0)
    g = 0.5 * 1.0
    assert s["gamma1"]["value"] == pytest.approx(0.5, rel=0.05)
    assert s["gamma2"]["gamma2"] == pytest.approx(1.0, rel=0.05)
    assert s["gamma_meas"]["gamma"] == pytest.approx(g, rel=0.05)
    assert s["gamma_pred"]["value"] == pytest.approx(g, rel=0.05)
    assert s["eq3"]["gamma1"] == pytest.approx(0.5, rel=0.05)
    assert s["eq3"]["k1"] == pytest.approx(0.9 * 10 ** 0.5, rel=0.05)  # k1 = eps0 lambda0^gamma1
    assert not s["gamma2"]["q2_kept"] and not s["eq3"]["q1_kept"]


@pytest.mark.parametrize("gamma1,gamma2,noise,lambda0,rng", [
    (0.5, 1.0, 0.02, 10.0, 0),
    (0.3, 1.5, 0.02, 10.0, 1),
    (0.8, 0.6, 0.04, 0.1, 2),
    (0.2, 1.2, 0.04, 10.0, 3),
])
def test_exponents_within_stated_uncertainty(gamma1, gamma2, noise, lambda0, rng):
    df = A.synthetic_curves(gamma1=gamma1, gamma2=gamma2, noise=noise, seed_jitter=0.02,
                            lambda0=lambda0, rng=rng)
    s = _analyze(df, n_boot=0)
    g = gamma1 * gamma2
    # 3 sigma: a 99.7 % band for each estimate. sigma1_total adds the fit-window systematic
    # (the early window necessarily ends where the curve starts to bend; see fit_gamma1).
    assert abs(s["gamma1"]["value"] - gamma1) < 3 * s["gamma1"]["sigma_total"]
    assert abs(s["gamma2"]["gamma2"] - gamma2) < 3 * s["gamma2"]["sigma_gamma2"]
    assert abs(s["gamma_meas"]["gamma"] - g) < 3 * s["gamma_meas"]["sigma"]
    assert abs(s["gamma_pred"]["value"] - g) < 3 * s["gamma_pred"]["sigma_total"]
    assert abs(s["comparison"]["gamma_pred"] - s["comparison"]["gamma_meas"]) < \
        3 * s["comparison"]["sigma_total"]
    # And within 10 % at these (moderate) noise levels.
    assert s["gamma_pred"]["value"] == pytest.approx(g, rel=0.1)


def test_sigma_pred_follows_appendix_d():
    df = A.synthetic_curves(noise=0.01, rng=5)
    s = _analyze(df, n_boot=0)
    g1, s1 = s["gamma1"]["value"], s["gamma1"]["sigma"]
    g2, s2 = s["gamma2"]["gamma2"], s["gamma2"]["sigma_gamma2"]
    sp = g1 * g2 * math.sqrt((s1 / g1) ** 2 + (s2 / g2) ** 2)
    assert s["gamma_pred"]["value"] == pytest.approx(g1 * g2, rel=1e-12)
    assert s["gamma_pred"]["sigma"] == pytest.approx(sp, rel=1e-12)
    assert s["comparison"]["sigma"] == pytest.approx(math.hypot(sp, s["gamma_meas"]["sigma"]),
                                                     rel=1e-12)
    # sigma1 is the error of the mean of the per-P gamma1 (Appendix D).
    per = np.array([p["gamma1"] for p in s["gamma1"]["per_P"]])
    assert s1 == pytest.approx(per.std(ddof=1) / math.sqrt(per.size), rel=1e-12)
    assert s["gamma1"]["value"] == pytest.approx(per.mean(), rel=1e-12)


def test_bootstrap_over_seeds_agrees_with_fit_errors():
    df = A.synthetic_curves(noise=0.02, seed_jitter=0.03, rng=6, seeds=range(6))
    s = _analyze(df, n_boot=40, boot_seed=1)
    b = s["bootstrap"]
    assert b["n"] >= 35
    # Same order of magnitude as the analytic errors (the bootstrap of 6 seeds is itself noisy).
    for key, sig in (("gamma2", s["gamma2"]["sigma_gamma2"]), ("gamma_meas", s["gamma_meas"]["sigma"])):
        assert sig / 4 < b[key]["std"] < 4 * sig
    assert abs(b["gamma_pred"]["mean"] - 0.5) < 0.05


# ---------------------------------------------------------------------------------------------
# Thresholds of Sec. 4
# ---------------------------------------------------------------------------------------------

def test_thresholds_closed_form():
    k1, g1, q1, k2, g2, q2 = 50.0, 0.6, 0.01, 1.0, 1.0, 1000.0  # Fig. 5 caption
    th = A.thresholds(k1, g1, q1, k2, g2, q2)
    # At P_- the two terms of Eq. 4 are equal; at P_+ the power law of Eq. 6 equals q1.
    assert k2 * th["P_minus"] ** g2 == pytest.approx(q2, rel=1e-12)
    assert k1 * (k2 * th["P_plus"] ** g2) ** (-g1) == pytest.approx(q1, rel=1e-12)
    assert th["P_plus"] == pytest.approx(5000 ** (1 / 0.6), rel=1e-12)
    # Regimes: plateau k1 q2^-g1 + q1 below P_-, slope -g1 g2 in between, q1 above P_+.
    assert A.eq6(1e-3, k1, g1, q1, k2, g2, q2) == pytest.approx(th["low_P_plateau"], rel=1e-5)
    assert A.eq6(1e14, k1, g1, q1, k2, g2, q2) == pytest.approx(q1, rel=1e-3)
    Pm = math.sqrt(th["P_minus"] * th["P_plus"])
    e = lambda P: A.eq6(P, k1, g1, 0.0, k2, g2, q2)  # noqa: E731
    slope = (math.log(e(Pm * 1.01)) - math.log(e(Pm / 1.01))) / (2 * math.log(1.01))
    assert slope == pytest.approx(-g1 * g2, rel=0.05)  # q2/(k2 Pm) ~ 3 % correction


def test_thresholds_absent_when_q_is_zero():
    th = A.thresholds(50.0, 0.6, 0.0, 1.0, 1.0, 0.0)
    assert th["P_minus"] is None and th["P_plus"] is None


def test_p_minus_recovered_from_data():
    Ps = (250, 500, 1000, 2000, 4000, 8000, 16000, 32000)
    df = A.synthetic_curves(P_values=Ps, q2=1000.0, lambda0=1.0, noise=0.01, rng=7)
    s = _analyze(df, n_boot=0, p_min=250)
    assert s["gamma2"]["q2_kept"]
    assert s["gamma2"]["gamma2"] == pytest.approx(1.0, rel=0.05)
    th = s["thresholds"]
    assert th["P_minus"] == pytest.approx(1000.0, rel=0.15)
    assert abs(math.log(th["P_minus"] / 1000.0)) < 3 * th["sigma_ln_P_minus"]


def test_p_plus_recovered_from_data():
    Ps = (250, 500, 1000, 2000, 4000, 8000, 16000, 32000)
    df = A.synthetic_curves(P_values=Ps, q1=0.01, lambda0=1.0, noise=0.01, rng=8)
    s = _analyze(df, n_boot=0)
    assert s["eq3"]["q1_kept"] and s["eq3"]["q1"] == pytest.approx(0.01, rel=0.2)
    # True P_+ = (k1 k2^-g1 / q1)^(1/(g1 g2)) = (0.9/0.01)^2 = 8100. P_+ ~ q1^-2 here, so a
    # 10 % error on q1 is 20 % on P_+: compare within 3 propagated sigmas.
    th = s["thresholds"]
    assert abs(math.log(th["P_plus"] / 8100.0)) < 3 * th["sigma_ln_P_plus"]
    assert th["sigma_ln_P_plus"] < 0.5


# ---------------------------------------------------------------------------------------------
# Edge cases and output
# ---------------------------------------------------------------------------------------------

def test_single_P_records_errors_instead_of_crashing():
    s = _analyze(A.synthetic_curves(P_values=(4000,), noise=0.01), n_boot=5)
    assert "gamma2" in s["errors"] and "2 values of P" in s["errors"]["gamma2"]
    assert "gamma_meas" in s["errors"]
    assert s["gamma1"]["value"] == pytest.approx(0.5, rel=0.05)
    assert any("only one value of P" in w for w in s["warnings"])
    assert s["table1"]["gamma_pred"] is None
    json.dumps(s)


def test_unreached_minimum_is_warned():
    df = A.synthetic_curves(noise=0.01, rng=9)
    df = df[~((df["P"] == 1000) & (df["seed"] == 0) & (df["spectral_complexity"] > 500))]
    s = _analyze(df, n_boot=0)
    assert any("minimum not bracketed" in w and "(1000, 0)" in w for w in s["warnings"])
    assert s["gamma2"]["gamma2"] == pytest.approx(1.0, rel=0.05)


def test_diverged_replica_rows_are_dropped_with_a_warning():
    df = A.synthetic_curves(noise=0.01, rng=10)
    m = (df["P"] == 2000) & (df["seed"] == 1) & (df["epoch"] > 60)
    df.loc[m, ["test_error", "spectral_complexity"]] = np.nan
    df.loc[m, "diverged"] = True
    s = _analyze(df, n_boot=0)
    assert any("dropped 60 rows" in w and "(2000, 1)" in w for w in s["warnings"])
    assert s["gamma2"]["gamma2"] == pytest.approx(1.0, rel=0.05)
    assert s["n_rows_used"] == len(df) - 60


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.drop(columns="spectral_complexity"), "lacks columns"),
    (lambda d: d.iloc[:0], "empty"),
    (lambda d: d.assign(test_error=np.nan), "no usable rows"),
])
def test_bad_tables_raise_clear_value_errors(mutate, match):
    with pytest.raises(ValueError, match=match):
        _analyze(mutate(A.synthetic_curves(P_values=(1000, 2000), n_epochs=30)))


def test_bad_p_min_and_mixed_groups():
    df = A.synthetic_curves(P_values=(1000, 2000, 4000), n_epochs=60)
    with pytest.raises(ValueError, match="p_min=10000"):
        _analyze(df, p_min=10000)
    both = pd.concat([df, df.assign(arch="resnet")], ignore_index=True)
    with pytest.raises(ValueError, match="analyze_all"):
        _analyze(both)
    out = A.analyze_all(both, n_boot=0)
    assert set(out) == {"cnn/mnist", "resnet/mnist"}


def test_summary_json_and_tables():
    df = A.synthetic_curves(noise=0.01, rng=11)
    s = _analyze(df, n_boot=5)
    text = json.dumps(s)  # JSON-serializable: no numpy scalars, NaN -> null
    assert "NaN" not in text
    for key in ("p_min", "P_used", "collapse", "thresholds", "eq3", "gamma1", "gamma2",
                "gamma_meas", "gamma_pred", "comparison", "bootstrap", "optima", "elbow"):
        assert key in s, key
    assert s["gamma2"]["fit_range_P"] == [1000.0, 32000.0]
    assert len(s["eq3"]["fit_range_lambda"]) == 2
    assert all(len(p["x_range"]) == 2 for p in s["gamma1"]["per_P"])
    t1, t2 = A.tables({"cnn/mnist": s})
    assert list(t1.columns[:5]) == ["Model", "Dataset", "gamma_pred", "gamma_meas", "sigma"]
    assert list(t2.columns[:6]) == ["Model", "Dataset", "gamma1", "sigma1", "gamma2", "sigma2"]
    md = A.to_markdown(t2)
    assert md.splitlines()[2].startswith("| CNN | MNIST | 0.")


def test_synthetic_curves_follow_their_laws():
    df = A.synthetic_curves(P_values=(1000, 4000), seeds=(0,), noise=0.0, n_epochs=400)
    for P, g in df.groupby("P"):
        assert np.all(np.diff(g["spectral_complexity"]) > 0)  # lambda(t) monotone
        i = g["test_error"].idxmin()
        # Optimum at lambda_opt = k2 P^gamma2 (grid spacing ~2 % in lambda at 400 epochs).
        assert g.loc[i, "spectral_complexity"] == pytest.approx(P, rel=0.03)
    early = df[df["spectral_complexity"] < 20]
    k1 = 0.9 * 10 ** 0.5
    np.testing.assert_allclose(early["test_error"], k1 * early["spectral_complexity"] ** -0.5,
                               rtol=2e-3)  # Phi's late term is < 0.2 % this early

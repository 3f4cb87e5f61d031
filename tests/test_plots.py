"""Tests of jaxnorm.plots and the analyze CLI on synthetic run directories."""

import json
import os
import warnings

import numpy as np
import pandas as pd
import pytest

from jaxnorm import analysis as A
from jaxnorm import analyze as cli
from jaxnorm import plots


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A synthetic run directory in the results format (results.csv, margins/*.npy) + analysis."""
    d = str(tmp_path_factory.mktemp("run"))
    A.write_synthetic_run(d, margin_epochs=(10, 40, 80), P_values=(500, 1000, 2000, 4000, 8000),
                          seeds=(0, 1, 2), n_epochs=80, noise=0.02, rng=0)
    df = A.load_run(d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = A.analyze(df, n_boot=0)
    return d, df, summary


def _check(paths):
    assert sorted(os.path.splitext(p)[1] for p in paths) == [".pdf", ".png"]
    for p in paths:
        assert os.path.getsize(p) > 1000, p
    with open([p for p in paths if p.endswith(".png")][0], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with open([p for p in paths if p.endswith(".pdf")][0], "rb") as fh:
        assert fh.read(5) == b"%PDF-"


def test_written_run_dir_reads_back_through_results_load(run):
    d, df, _ = run
    assert len(df) == 5 * 3 * 80
    assert df["diverged"].dtype == bool
    # The margins listing parses the file names of the results format.
    m = A.load_margins(d)
    assert len(m) == 5 * 3 * 3 and set(m["epoch"]) == {10, 40, 80}


@pytest.mark.parametrize("name", ["plot_curves", "fig3_curves", "fig4_collapse", "fig7_time",
                                  "fig8_fits", "fig9_pred_vs_meas"])
def test_figure_writes_png_and_pdf(run, tmp_path, name):
    _, df, s = run
    fn = getattr(plots, name)
    path = str(tmp_path / name)
    if name in ("plot_curves", "fig7_time"):
        paths = fn(df, path)
    elif name in ("fig3_curves", "fig4_collapse"):
        paths = fn(df, path, s)
    else:
        paths = fn(df, s, path)
    _check(paths)


def test_fig5_eq6_sketch(tmp_path):
    _check(plots.fig5_eq6(str(tmp_path / "fig5.png")))  # an explicit .png still writes both


def test_fig6_margins(run, tmp_path):
    d, df, _ = run
    _check(plots.fig6_margins(d, df, str(tmp_path / "fig6"), P=1000, seed=1))
    with pytest.raises(ValueError, match="no margin files for P=3"):
        plots.fig6_margins(d, df, str(tmp_path / "x"), P=3)
    with pytest.raises(ValueError, match="no margin files"):
        plots.fig6_margins(str(tmp_path), df, str(tmp_path / "x"))


def test_plot_curves_tolerates_diverged_rows(tmp_path):
    df = A.synthetic_curves(P_values=(1000, 2000), n_epochs=30)
    df.loc[df.index[-5:], ["test_error", "spectral_complexity"]] = np.nan
    _check(plots.plot_curves(df, str(tmp_path / "c")))


def test_cli_end_to_end(run, tmp_path, capsys):
    d, _, _ = run
    out = str(tmp_path / "analysis")
    assert cli.main([d, "--out", out, "--n-boot", "3"]) == 0
    for f in ("table1.md", "table1.csv", "table2.md", "table2.csv", "summary.json"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    t1 = pd.read_csv(os.path.join(out, "table1.csv"))
    t2 = pd.read_csv(os.path.join(out, "table2.csv"))
    assert list(t1.iloc[0][["Model", "Dataset"]]) == ["CNN", "MNIST"]
    # Synthetic law: gamma1 = 0.5, gamma2 = 1, gamma = 0.5 (2 % noise: within 5 %); the
    # tables carry the summary's Exponent values.
    assert t2.iloc[0]["gamma1"] == pytest.approx(0.5, rel=0.05)
    # sigma2 comes from the scatter of 5 points about a line (3 dof): the 99 % band is
    # t_0.995(3) = 5.8 sigma (measured here: 3.8 sigma, a flat-bottomed minimum with 2 % noise).
    assert abs(t2.iloc[0]["gamma2"] - 1.0) < 5.8 * t2.iloc[0]["sigma2"]
    assert t1.iloc[0]["gamma_meas"] == pytest.approx(0.5, rel=0.05)
    assert t1.iloc[0]["gamma_meas_on"] == "eps_opt"
    with open(os.path.join(out, "summary.json")) as fh:
        summ = json.load(fh)
    g = summ["groups"]["cnn/mnist"]
    assert g["p_min"] >= 500 and g["collapse"]["spread_mean"] is not None
    assert g["gamma2"]["value"] == pytest.approx(t2.iloc[0]["gamma2"], rel=1e-12) and "holdout" in g
    figs = summ["figures"]["cnn/mnist"]
    assert set(figs) == {"fig3_curves", "fig4_collapse", "fig5_eq6_sketch", "fig6_margins",
                         "fig7_time", "fig8_fits", "fig9_pred_vs_meas"}
    for paths in figs.values():
        assert isinstance(paths, list), paths
        _check(paths)
    assert "| CNN | MNIST |" in capsys.readouterr().out


def test_cli_default_out_and_p_min(run, tmp_path):
    d, df, _ = run
    run2 = str(tmp_path / "run2")
    A.write_synthetic_run(run2, df=df)
    assert cli.main([run2, "--p-min", "1000", "--n-boot", "0", "--no-figures"]) == 0
    with open(os.path.join(run2, "analysis", "summary.json")) as fh:
        g = json.load(fh)["groups"]["cnn/mnist"]
    assert g["p_min"] == 1000 and g["p_min_mode"] == "user" and g["P_used"][0] == 1000


def test_cli_clear_errors(tmp_path, capsys):
    assert cli.main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main([str(empty)]) == 2
    assert "results.csv" in capsys.readouterr().err
    (empty / "results.csv").write_text("")
    assert cli.main([str(empty)]) == 2
    assert "empty" in capsys.readouterr().err
    assert cli.main([str(empty), "--p-min", "-3"]) == 2
    assert "--p-min" in capsys.readouterr().err
    # A row that does not parse: one error line naming the file and the line, nothing written.
    bad = tmp_path / "bad"
    A.write_synthetic_run(str(bad), P_values=(1000, 2000, 4000), n_epochs=10, seeds=(0,))
    lines = (bad / "results.csv").read_text().splitlines()
    lines[4] = ",".join(lines[4].split(",")[:5])
    (bad / "results.csv").write_text("\n".join(lines) + "\n")
    assert cli.main([str(bad), "--no-figures"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "results.csv, line 5" in err[0]
    assert not (bad / "analysis").exists()

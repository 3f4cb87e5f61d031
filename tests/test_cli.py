"""Every user mistake at the command line: one `error:` line naming the value or file, exit 2, nothing lost.

The cases are those of issue 13 (items 3-8). They call the CLIs' ``main`` in this process (fast: each fails
before any training); the Ctrl-C case and the non-root case run real subprocesses.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from jaxnorm import analysis, analyze, cli, rundir, sweep
from jaxnorm import config as config_lib

REPO = Path(__file__).resolve().parents[1]
DEMO = ["--config", str(REPO / "sweeps" / "demo.toml"), "--no-plot", "--quiet", "--cache-dir", "none"]


@pytest.fixture(autouse=True)
def _no_user_data(monkeypatch, tmp_path_factory):
    monkeypatch.delenv("JAXNORM_DATA_DIR", raising=False)
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", os.fspath(tmp_path_factory.mktemp("tfds_empty")))


def one_error(capsys, code, want_code=2):
    """The stderr of a failed CLI call: one `error:` line first, no traceback, the expected exit code."""
    err = capsys.readouterr().err
    assert code == want_code, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


def make_run(path):
    """A finished-looking jaxnorm run directory to be protected."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(config_lib.to_json(config_lib.SweepConfig()))
    (path / "results.csv").write_text("arch,dataset,size,P,seed,replica,epoch\ncnn,mnist,paper,89,0,89000,0\n")
    return {p.name: p.read_bytes() for p in path.iterdir()}


# ----------------------------------------------------------------------------- sweep: data


def test_dataset_not_installed(tmp_path, capsys):
    code = sweep.main(["--arch", "cnn", "--dataset", "mnist", "--out", str(tmp_path / "run"), *DEMO[2:]])
    err = one_error(capsys, code)
    assert "dataset 'mnist' was not found" in err and "mnist.npz" in err
    assert not (tmp_path / "run").exists()  # nothing left behind


def test_data_dir_that_does_not_exist_is_not_replaced_by_the_debian_copy(tmp_path, capsys):
    code = sweep.main([*DEMO, "--data-dir", "/nonexistent", "--out", str(tmp_path / "run")])
    err = one_error(capsys, code)
    assert "'/nonexistent'" in err and "not an existing folder" in err
    assert not (tmp_path / "run").exists()


def test_corrupt_npz_names_the_file_not_allow_pickle(tmp_path, capsys):
    (tmp_path / "mnist.npz").write_bytes(b"\x00garbage" * 100)
    code = sweep.main(["--arch", "cnn", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out",
                       str(tmp_path / "run"), *DEMO[2:]])
    err = one_error(capsys, code)
    assert f"{tmp_path / 'mnist.npz'} is not a .npz (zip) archive" in err and "allow_pickle" not in err


# ----------------------------------------------------------------------------- sweep: config


@pytest.mark.parametrize("text, want", [
    ("lr_overrides = 5", "lr_overrides=5; allowed: a list of tables"),
    ('lr_overrides = [{P = 250, seed = 0, lr = "fast"}]', "lr='fast'; allowed: a positive number"),
    ("lr_overrides = [{P = 250, seed = 0, lr = -1.0}]", "lr=-1.0; allowed: a positive finite number"),
    (b"\x89PNG\r\n\x1a\n\xff\xfe binary", "is not a text (UTF-8 TOML) file"),
    ("epochs = ", "is not valid TOML"),
])
def test_bad_config_file_names_itself_and_the_allowed_values(tmp_path, capsys, text, want):
    path = tmp_path / "bad.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text((REPO / "sweeps" / "demo.toml").read_text() + "\n" + text + "\n")
    with pytest.raises(SystemExit) as exc:  # argparse's usage error: exit 2, no traceback
        sweep.main(["--config", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and want in err and "Traceback" not in err, err
    if "TOML" in want:
        assert str(path) in err


def test_config_that_is_a_directory(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        sweep.main(["--config", str(tmp_path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"config file {str(tmp_path)!r} is not a file" in err


# ----------------------------------------------------------------------------- sweep: run directory


@pytest.mark.parametrize("where", ["file", "below_file"])
def test_out_that_is_or_lies_below_a_file(tmp_path, capsys, where):
    (tmp_path / "f").write_text("keep")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "run"
    err = one_error(capsys, sweep.main([*DEMO, "--out", str(out)]))
    assert repr(str(out)) in err and ("is a file" in err if where == "file" else "which is a file" in err)
    assert (tmp_path / "f").read_text() == "keep"


def test_out_in_use_by_another_process_is_refused_at_once(tmp_path, capsys):
    with rundir.lock(tmp_path / "run"):
        t0 = time.monotonic()
        err = one_error(capsys, sweep.main([*DEMO, "--out", str(tmp_path / "run")]))
    assert f"is in use by process {os.getpid()} on host" in err
    assert time.monotonic() - t0 < 30  # before loading data or compiling anything


@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_directory_is_kept_with_or_without_overwrite(tmp_path, capsys, overwrite):
    (tmp_path / "figs").mkdir()
    (tmp_path / "thesis.tex").write_text("\\documentclass{book}")
    (tmp_path / "results.csv").write_text("epoch,loss\n1,0.5\n")  # someone else's results
    err = one_error(capsys, sweep.main([*DEMO, "--out", str(tmp_path)] + ["--overwrite"] * overwrite))
    assert "is not a jaxnorm run directory" in err and "thesis.tex" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figs", "results.csv", "thesis.tex"]
    assert (tmp_path / "results.csv").read_text() == "epoch,loss\n1,0.5\n"


def test_overwrite_with_an_invalid_new_config_keeps_the_old_run(tmp_path, capsys):
    before = make_run(tmp_path / "run")
    err = one_error(capsys, sweep.main([*DEMO, "--p", "70000", "--out", str(tmp_path / "run"), "--overwrite"]))
    assert "P values [70000] exceed the 60000 training examples" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


# ----------------------------------------------------------------------------- perceptron report


def test_perceptron_report_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("keep")
    with pytest.raises(SystemExit) as exc:
        sweep.main(["--arch", "perceptron", "--quick", "--out", str(tmp_path / "f" / "x")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "which is a file" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- analyze


@pytest.fixture
def run_dir(tmp_path):
    df = analysis.synthetic_curves(P_values=(1000, 2000, 4000), n_epochs=30)
    df.to_csv(tmp_path / "results.csv", index=False)
    return tmp_path


def test_analyze_out_that_is_a_file(run_dir, capsys):
    (run_dir / "f").write_text("keep")
    err = one_error(capsys, analyze.main([str(run_dir), "--out", str(run_dir / "f"), "--n-boot", "0",
                                          "--no-figures"]))
    assert f"--out {str(run_dir / 'f')!r} is a file" in err


def test_analyze_default_out_blocked_by_a_file(run_dir, capsys):
    (run_dir / "analysis").write_text("keep")
    err = one_error(capsys, analyze.main([str(run_dir), "--n-boot", "0", "--no-figures"]))
    assert "is a file" in err and "--out" in err


def test_analyze_table_that_does_not_parse_names_file_and_line(run_dir, capsys):
    lines = (run_dir / "results.csv").read_text().splitlines(keepends=True)
    lines[4] = lines[4].rstrip("\n") + ",1,2,3\n"  # line 5 of the file: three fields too many
    (run_dir / "results.csv").write_text("".join(lines))
    err = one_error(capsys, analyze.main([str(run_dir), "--n-boot", "0", "--no-figures"]))
    assert f"{run_dir / 'results.csv'}, line 5:" in err and "does not parse" in err


def test_analyze_fails_when_every_group_failed(run_dir, capsys):
    code = analyze.main([str(run_dir), "--p-min", "100000", "--n-boot", "0", "--no-figures"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "p_min" in err
    assert not (run_dir / "analysis" / "summary.json").exists()  # nothing half-written
    assert analyze.main([str(run_dir), "--n-boot", "0", "--no-figures"]) == 0  # the same table is fine


# ----------------------------------------------------------------------------- the edge itself


def test_guard_maps_mistakes_interrupts_and_bugs():
    def raiser(exc):
        def main(argv):
            raise exc
        return main

    assert cli.guard(raiser(KeyboardInterrupt())) == 130
    assert cli.guard(raiser(ValueError("x"))) == 2
    assert cli.guard(raiser(FileNotFoundError(2, "No such file or directory", "/a/b"))) == 2
    assert cli.message(PermissionError(13, "Permission denied", "/a/b")) == "'/a/b': permission denied"
    with pytest.raises(TypeError):  # a bug keeps its traceback
        cli.guard(raiser(TypeError("bug")))
    assert cli.guard(lambda argv: None) == 0


# ----------------------------------------------------------------------------- real processes


NON_ROOT = os.geteuid() == 0 and shutil.which("setpriv") and os.path.exists("/usr/bin/python3")


@pytest.mark.skipif(not NON_ROOT, reason="needs root, setpriv and a system python3 to drop to user nobody")
def test_not_writable_out_as_a_non_root_user():
    # root ignores permissions, so drop to nobody; rundir needs only the standard library, so the
    # system python (readable by nobody, unlike the venv's interpreter) can run it.
    base = Path(tempfile.mkdtemp(prefix="jaxnorm-nonroot-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        (base / "ro").mkdir(mode=0o555)
        (base / "private").mkdir(mode=0o700)
        paths = [base / "ro", base / "ro" / "run", base / "private" / "run"]
        code = ("import sys\nfrom jaxnorm import rundir\nfor p in sys.argv[1:]:\n  try:\n"
                "    with rundir.lock(p): pass\n  except rundir.RunDirError as e: print(e)\n")
        out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                              "-c", code, *map(str, paths)], capture_output=True, text=True, timeout=60,
                             env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == [
            f"run directory {str(paths[0])!r} is not writable by this user; allowed: a directory you can write",
            f"cannot create run directory {str(paths[1])!r}: permission denied",
            f"cannot access run directory {str(paths[2])!r}: permission denied; allowed: a directory you can write"]
    finally:
        shutil.rmtree(base)


def test_ctrl_c_says_how_to_resume_and_exits_130(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxnorm.sweep", *DEMO, "--p", "250", "--seeds", "1", "--epochs", "40",
           "--out", str(out)]
    env = os.environ | {"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not (out / "results.csv").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
    assert "Traceback" not in err
    assert not list(out.glob(".lock-*"))  # released


@pytest.mark.slow
def test_same_command_twice_is_refused_and_a_killed_run_does_not_block_its_rerun(tmp_path):
    # Issue 13 item 3: started twice on one --out, the second copy used to add duplicated rows.
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxnorm.sweep", *DEMO, "--p", "250", "--seeds", "1", "--epochs", "10",
           "--margin-epochs", "10", "--out", str(out)]
    env = os.environ | {"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (out / "results.csv").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
        assert second.returncode == 2, second.stderr[-2000:]
        assert second.stderr.startswith(f"error: run directory {str(out)!r} is in use by process {first.pid} on host")
    finally:
        first.kill()  # SIGKILL: no chance to release anything
        first.wait(timeout=60)
    third = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert third.returncode == 0, third.stderr[-2000:]
    from jaxnorm import results

    df = results.load(out)
    epochs = config_lib.resolve(None, None, REPO / "sweeps" / "demo.toml", {"epochs": 10, "margin_epochs": [10]}).eval_epochs()
    assert sorted(df["epoch"]) == sorted(epochs)  # each evaluation once: no duplicated rows


def test_ctrl_c_swallowed_by_a_gc_callback_is_redelivered(capsys):
    # Seen on jax 0.12: SIGINT landing while JAX's gc callback ran became "Exception ignored in
    # _xla_gc_callback ... KeyboardInterrupt" and the sweep finished with exit 0.
    import gc

    def callback(phase, info):
        if phase == "start" and not fired:
            fired.append(1)
            os.kill(os.getpid(), signal.SIGINT)  # handled here, inside the callback: dropped
            time.sleep(0.01)

    def main(argv):
        gc.callbacks.append(callback)
        try:
            gc.collect()
            for _ in range(100):  # the redelivery (0.5 s later) must interrupt this
                time.sleep(0.02)
            return 0
        finally:
            gc.callbacks.remove(callback)

    fired: list = []
    assert cli.guard(main, []) == cli.EXIT_INTERRUPTED and fired
    err = capsys.readouterr().err
    assert err.strip() == cli.INTERRUPTED and "Exception ignored" not in err


def test_analyze_writes_norm_collapse_and_the_runs_engine_summary(tmp_path, capsys):
    # A run directory as the engine leaves it: results with zoo columns and the engine's summary.json. The
    # analysis ranks every norm column (a P-dependent rescaling of lambda cannot collapse the curves) and copies
    # the run's wall time and throughput into its summary.
    import json

    import numpy as np

    df = analysis.synthetic_curves(P_values=(1000, 2000, 4000), n_epochs=30)
    df["zoo/frobenius"] = 2.0 * df["spectral_complexity"]  # collapses exactly as lambda does
    df["zoo/by_P"] = df["spectral_complexity"] * df["P"] ** 2  # shifted by 2 decades per decade of P
    df.to_csv(tmp_path / "results.csv", index=False)
    engine_summary = {"wall_time": 123.4, "seconds_by_part": {"train": 100.0, "eval_norms": 5.0}, "train_images_per_s": 999.0}
    (tmp_path / "summary.json").write_text(json.dumps(engine_summary))
    out = tmp_path / "analysis"
    assert analyze.main([str(tmp_path), "--out", str(out), "--no-figures"]) == 0
    capsys.readouterr()
    s = json.loads((out / "summary.json").read_text())
    assert s["run"] == {"summary.json": engine_summary}
    (group,) = s["groups"].values()
    ranks = {r["column"]: r for r in group["norm_collapse"]}
    assert ranks["zoo/frobenius"]["spread_mean"] == pytest.approx(ranks["spectral_complexity"]["spread_mean"], abs=1e-9)
    assert ranks["zoo/by_P"]["rank"] > ranks["spectral_complexity"]["rank"]
    assert np.isfinite(ranks["spectral_complexity"]["spread_mean"])
    (md,) = out.glob("norm_collapse_*.md")
    assert "zoo/by_P" in md.read_text()


def test_an_exception_that_follows_ctrl_c_is_the_interruption(capsys):
    # Flax's trace-state check turned a KeyboardInterrupt raised during model.init into an
    # AssertionError, so a Ctrl-C at that moment printed a traceback and exited 1 (seen once in
    # test_ctrl_c_says_how_to_resume_and_exits_130). After a SIGINT any exception means "interrupted";
    # without one, a bug keeps its traceback.
    def main(argv):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)
        except KeyboardInterrupt:
            raise AssertionError  # what the library let out instead
        return 0

    assert cli.guard(main, []) == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == cli.INTERRUPTED

    def bug(argv):
        raise AssertionError("a real bug")

    with pytest.raises(AssertionError, match="a real bug"):
        cli.guard(bug, [])

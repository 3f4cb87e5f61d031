"""Run directories (jaxnorm.rundir): lock, whose directory it is, late overwrite, results checksum."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from jaxnorm import config as config_lib
from jaxnorm import rundir


def make_run_dir(path, results=b"arch,dataset,size,P,seed,replica,epoch\ncnn,mnist,small,40,0,40000,0\n"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(config_lib.to_json(config_lib.SweepConfig()))
    (path / "results.csv").write_bytes(results)
    (path / "checkpoints" / "3").mkdir(parents=True)
    return path


# ----------------------------------------------------------------------------- lock


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    with rundir.lock(tmp_path / "run") as lock_file:
        assert json.loads(lock_file.read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
        # flock belongs to the open file description: a second open in this process is a second writer.
        with pytest.raises(rundir.RunDirLocked,
                           match=f"in use by process {os.getpid()} on host {socket.gethostname()}"):
            with rundir.lock(tmp_path / "run"):
                pass
        with rundir.lock(tmp_path / "run", shard=1):  # another process's shard of the same run
            pass
    with rundir.lock(tmp_path / "run"):  # released: free again
        pass


def test_new_directory_refused_later_is_removed_again(tmp_path):
    with pytest.raises(RuntimeError):
        with rundir.lock(tmp_path / "new" / "run"):
            assert (tmp_path / "new" / "run").is_dir()
            raise RuntimeError("validation failed")
    assert not (tmp_path / "new" / "run").exists()
    (tmp_path / "kept").mkdir()
    with rundir.lock(tmp_path / "kept"):
        pass
    assert (tmp_path / "kept").is_dir() and not list((tmp_path / "kept").iterdir())


def test_lock_of_a_killed_process_does_not_block(tmp_path):
    code = ("import sys, time; from jaxnorm import rundir\n"
            "with rundir.lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONPATH": os.getcwd()})
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(rundir.RunDirLocked, match=f"process {proc.pid} on host"):
            with rundir.lock(tmp_path):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert (tmp_path / ".lock-0").exists()  # SIGKILL left the file behind, but not the lock
    with rundir.lock(tmp_path):
        pass


@pytest.mark.parametrize("where", ["file", "below_file"])
def test_output_path_that_is_or_lies_below_a_file_is_refused(tmp_path, where):
    (tmp_path / "f").write_text("x")
    path = tmp_path / "f" if where == "file" else tmp_path / "f" / "run"
    with pytest.raises(rundir.RunDirError, match="is a file" if where == "file" else "which is a file"):
        with rundir.lock(path):
            pass
    assert (tmp_path / "f").read_text() == "x"


# ----------------------------------------------------------------------------- whose directory


def test_classify_tells_runs_from_other_folders(tmp_path):
    assert rundir.classify(tmp_path / "absent") == "absent"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".lock-0").write_text("")
    assert rundir.classify(tmp_path / "empty") == "empty"
    assert rundir.classify(make_run_dir(tmp_path / "run")) == "run"
    thesis = tmp_path / "thesis"
    (thesis / "figs").mkdir(parents=True)
    (thesis / "thesis.tex").write_text("\\documentclass{book}")
    assert rundir.classify(thesis) == "foreign"
    other = make_run_dir(tmp_path / "other", results=b"epoch,loss\n1,0.5\n")  # someone else's results.csv
    assert rundir.classify(other) == "foreign"
    (tmp_path / "badcfg").mkdir()
    (tmp_path / "badcfg" / "config.json").write_text(json.dumps({"lr": 0.1, "model": "resnet"}))
    assert rundir.classify(tmp_path / "badcfg") == "foreign"


def test_foreign_directory_is_neither_reused_nor_deleted(tmp_path):
    thesis = tmp_path / "thesis"
    (thesis / "figs").mkdir(parents=True)
    (thesis / "thesis.tex").write_text("x")
    with pytest.raises(rundir.RunDirError, match=r"not a jaxnorm run directory \(it holds figs/, thesis.tex"):
        rundir.check_reusable(thesis)
    with pytest.raises(rundir.RunDirError, match="not a jaxnorm run directory"):
        rundir.plan_overwrite(thesis)
    other = make_run_dir(tmp_path / "other", results=b"epoch,loss\n1,0.5\n")
    with pytest.raises(rundir.RunDirError, match="its results.csv was not written by jaxnorm"):
        rundir.plan_overwrite(other)
    assert sorted(p.name for p in thesis.iterdir()) == ["figs", "thesis.tex"]
    assert (other / "results.csv").read_bytes() == b"epoch,loss\n1,0.5\n"


def test_overwrite_deletes_only_when_called_and_keeps_the_locks(tmp_path):
    run = make_run_dir(tmp_path / "run")
    with rundir.lock(run):
        discard = rundir.plan_overwrite(run)
        assert (run / "results.csv").exists()  # nothing deleted by the check itself
        discard()
        assert [p.name for p in run.iterdir()] == [".lock-0"]
    assert rundir.plan_overwrite(tmp_path / "absent") is not None


# ----------------------------------------------------------------------------- results checksum


def test_results_mark_detects_truncation_and_edits_but_not_appends(tmp_path):
    path = tmp_path / "results.csv"
    text = b"".join(b"cnn,mnist,%d,0.25\n" % i for i in range(100))
    path.write_bytes(text)
    mark = rundir.mark_results(path)
    assert mark == rundir.ResultsMark(len(text), hashlib.sha256(text).hexdigest())  # independent digest
    assert rundir.mark_results(path, 10).sha256 == hashlib.sha256(text[:10]).hexdigest()
    assert rundir.check_results(path, mark._asdict()) is None  # round trip through JSON metadata
    with open(path, "ab") as f:
        f.write(b"cnn,mnist,100,0.5\n")  # rows after the checkpoint: the prefix still verifies
    assert rundir.check_results(path, mark) is None
    os.truncate(path, len(text) - 7)
    assert "is 7 bytes shorter than the" in rundir.check_results(path, mark)
    assert path.stat().st_size == len(text) - 7  # never padded
    path.write_bytes(text.replace(b"0.25", b"0.26", 1))
    assert "differs from what the checkpoint recorded" in rundir.check_results(path, mark)
    with pytest.raises(rundir.RunDirError, match="fewer than"):
        rundir.mark_results(path, len(text) + 1)
    path.unlink()
    assert "is missing" in rundir.check_results(path, mark)

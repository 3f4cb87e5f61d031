"""The accelerator check (bench/gpu_check.sh) runs end to end on the CPU at tiny sizes, so that the
one-shot script a GPU session depends on cannot rot between sessions (issue 14)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_gpu_check_runs_tiny_on_cpu_and_writes_its_json(tmp_path):
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--tiny", "--archs", "cnn", "--budget", "600"],
                          env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r["mode"] == "tiny" and r["skipped"] == [], r["skipped"]
    eng = r["engine"]["cnn"]["2"]
    assert eng["images_per_s"] > 0 and eng["tflops"] > 0 and (eng["conv"], eng["axis"]) == ("phase", "map")
    assert r["memory"]["cnn"]["bytes_per_replica"] > 0 and r["memory"]["cnn"]["slots_paper_mnist_grid"] >= 1
    sweep = r["sweeps"]["cnn"]
    # Killed by SIGKILL after its first checkpoint; the same command resumed and finished every job with
    # exactly one row per (P, seed, step) and the norm columns.
    assert sweep["ok"] and sweep["killed_after_checkpoint"] and sweep["rerun_rc"] == 0, sweep
    assert sweep["finished"] == sweep["jobs"] == 4 and sweep["duplicate_rows"] == 0 and sweep["norm_columns"] > 0
    alts = r["alternatives"]["cnn"]
    assert set(alts) == {"replica_axis=vmap", "bf16 matmuls", "patches convs"}
    assert all(v["images_per_s"] > 0 for v in alts.values()), alts
    assert alts["bf16 matmuls"]["precision"] == "bfloat16" and alts["patches convs"]["conv"] == "patches"
    est = r["paper_estimate"]["cnn"]
    assert est["training_images"] == 10 * 500 * (sum([89, 188, 375, 750, 1500, 3000, 6000, 12000, 24000, 30000, 36000,
                                                       42000, 48000]) + 2 * sum(range(4000, 48001, 4000)))
    assert est["hours"] > 0
    assert (tmp_path / "gpu_check.log").exists()


def test_bench_ab_rejects_an_unknown_revision_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_ab.py"), "no-such-rev-0000"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "bench_ab: unknown revision 'no-such-rev-0000'; give a commit of this repository"]


def test_bench_ab_without_a_revision_or_flags_says_so_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_ab.py"), "--arch", "cnn"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "bench_ab: nothing to compare; give a commit REV, --xla-flags FLAGS, or both"]

"""Reliability of the multi-device engine: the same sweep, N times back to back, on forced CPU devices.

    python bench/bench_devices.py [--runs 20] [--devices 4] [--out bench/devices.json]

Each run is a fresh interpreter running issue 12's command
(``python -m jaxnorm.sweep --arch cnn --dataset fashion_mnist --p 256,1024 --seeds 2 --epochs 4``)
with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``, into a fresh run directory. A run is
*stuck* when its process tree used under 1 s of CPU in ``--stuck`` seconds (a deadlock waits; a slow
run on a busy machine computes): it then gets SIGABRT with ``PYTHONFAULTHANDLER=1``, so its Python
stacks land in the record. ``--timeout`` bounds a run in any case. The first run also dumps every
compiled program (``--xla_dump_to``) and counts collective instructions in them (must be 0).
Prints and saves: runs finished, stuck or timed out, wall and CPU seconds per run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COLLECTIVES = re.compile(r"\b(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)(-start)?\(")
COMMAND = ["--arch", "cnn", "--dataset", "fashion_mnist", "--p", "256,1024", "--seeds", "2", "--epochs", "4",
           "--quiet", "--no-plot", "--cache-dir", "none"]


def count_collectives(dump_dir: Path) -> dict[str, int]:
    """Collective instructions per optimized HLO module dumped by XLA."""
    out = {}
    for f in sorted(dump_dir.glob("*after_optimizations.txt")):
        n = len(COLLECTIVES.findall(f.read_text()))
        if n:
            out[f.name] = n
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its waited-for children (Linux /proc), in seconds."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(v) for v in f[11:15]) / os.sysconf("SC_CLK_TCK")


def run_once(cmd, env, timeout: float, stuck: float) -> dict:
    """Runs ``cmd``; returns rc, status ("ok", "failed", "stuck", "timeout"), cpu seconds and the stderr tail."""
    with tempfile.TemporaryFile("w+") as err, tempfile.TemporaryFile("w+") as out:
        p = subprocess.Popen(cmd, env={**env, "PYTHONFAULTHANDLER": "1"}, cwd=REPO, stdout=out, stderr=err, text=True)
        t0 = time.time()
        last_cpu, last_t, status = 0.0, t0, None
        while p.poll() is None:
            time.sleep(2)
            cpu, now = cpu_seconds(p.pid), time.time()
            if cpu - last_cpu >= 1.0:
                last_cpu, last_t = cpu, now
            elif now - last_t > stuck:
                status = "stuck"
            if now - t0 > timeout:
                status = status or "timeout"
            if status:
                p.send_signal(signal.SIGABRT)  # faulthandler prints every thread's Python stack
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                break
        err.seek(0)
        out.seek(0)
        text, stdout = err.read(), out.read()
    if status is None:
        ok = p.returncode == 0 and json.loads(stdout[stdout.index("{"):])["finished"] == 4
        status = "ok" if ok else "failed"
    return dict(status=status, rc=p.returncode, cpu_seconds=round(last_cpu, 1),
                stderr_tail=None if status == "ok" else text[-1500:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--stuck", type=int, default=90, help="seconds without CPU progress that mean a deadlock")
    ap.add_argument("--out", default=str(REPO / "bench" / "devices.json"))
    args = ap.parse_args()
    record = dict(command="python -m jaxnorm.sweep " + " ".join(COMMAND), devices=args.devices, runs=[],
                  collectives=None)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            flags = f"--xla_force_host_platform_device_count={args.devices}"
            dump = Path(tmp) / "dump"
            if i == 0:
                flags += f" --xla_dump_to={dump} --xla_dump_hlo_as_text"
            env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
            t0 = time.time()
            run = run_once([sys.executable, "-m", "jaxnorm.sweep", *COMMAND, "--out", f"{tmp}/run{i}"], env,
                           args.timeout, args.stuck)
            run = dict(run=i, seconds=round(time.time() - t0, 1), **run)
            if i == 0:
                record["collectives"] = count_collectives(dump)
                record["programs_dumped"] = len(list(dump.glob("*after_optimizations.txt")))
            record["runs"].append(run)
            print(json.dumps(run), flush=True)
    secs = [r["seconds"] for r in record["runs"]]
    record["finished"] = sum(r["status"] == "ok" for r in record["runs"])
    record["stuck"] = sum(r["status"] == "stuck" for r in record["runs"])
    record["seconds_median"] = sorted(secs)[len(secs) // 2]
    print(f"{record['finished']}/{args.runs} runs finished on {args.devices} devices ({record['stuck']} stuck); "
          f"median {record['seconds_median']} s; "
          f"collective instructions in {record['programs_dumped']} compiled programs: {record['collectives'] or 0}")
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

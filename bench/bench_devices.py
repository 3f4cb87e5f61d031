"""Reliability of the multi-device engine: the same sweep, N times back to back, on forced CPU devices.

    python bench/bench_devices.py [--runs 20] [--devices 4] [--out bench/devices.json]

Each run is a fresh interpreter running issue 12's command
(``python -m jaxnorm.sweep --arch cnn --dataset fashion_mnist --p 256,1024 --seeds 2 --epochs 4``)
with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``, into a fresh run directory, with a
300 s timeout (one run takes well under a minute on 2 cores; the old engine aborted after ~40 s in
an all-gather rendezvous). The first run also dumps every compiled program (``--xla_dump_to``) and
counts collective instructions in them (must be 0). Prints and saves: runs finished, failures with
their last stderr line, wall seconds per run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--timeout", type=int, default=300)
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
            try:
                p = subprocess.run([sys.executable, "-m", "jaxnorm.sweep", *COMMAND, "--out", f"{tmp}/run{i}"],
                                   env=env, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
                rc, tail = p.returncode, (p.stderr.strip().splitlines() or [""])[-1]
                ok = rc == 0 and json.loads(p.stdout[p.stdout.index("{"):])["finished"] == 4
            except subprocess.TimeoutExpired:
                rc, tail, ok = None, f"timeout after {args.timeout} s", False
            run = dict(run=i, ok=ok, rc=rc, seconds=round(time.time() - t0, 1))
            if not ok:
                run["stderr_tail"] = tail[-300:]
            if i == 0:
                record["collectives"] = count_collectives(dump)
                record["programs_dumped"] = len(list(dump.glob("*after_optimizations.txt")))
            record["runs"].append(run)
            print(json.dumps(run), flush=True)
    secs = [r["seconds"] for r in record["runs"]]
    record["finished"] = sum(r["ok"] for r in record["runs"])
    record["seconds_median"] = sorted(secs)[len(secs) // 2]
    print(f"{record['finished']}/{args.runs} runs finished on {args.devices} devices; median {record['seconds_median']} s; "
          f"collective instructions in {record['programs_dumped']} compiled programs: {record['collectives'] or 0}")
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

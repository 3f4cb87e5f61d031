"""Chaos study of the sweep's crash safety (issue 13): interrupt, cut and corrupt a small real sweep.

Each case starts from a fresh or finished run directory of one small sweep (the small CNN on
Fashion-MNIST, 4 jobs, 3 epochs, a checkpoint every epoch; one step per dispatch so that a run
spends its time in many short dispatches), does one random thing to it, then reruns the same
command line and classifies the outcome:

* ``identical``: the rerun exits 0 and results.csv holds the rows of an uninterrupted reference
  run (same (P, seed, epoch, step) in the same order, numbers to 1e-5 relative, norms to 1e-4:
  the engine tests' tolerances), with no NUL byte;
* ``refused``: the rerun exits 2 with exactly one ``error:`` line on stderr and the run directory
  is byte for byte what it was before the rerun (nothing lost, truncated, padded or deleted);
* ``other``: anything else (a traceback, another exit code, different rows, a changed directory
  after a refusal); listed in the JSON with its details.

The random things (``--seed`` fixes them): SIGKILL, SIGINT or SIGTERM at a random time of a run
(sometimes twice in a row), then possibly: cut the last 1-400 bytes of results.csv, or cut it to
a random length, flip a byte of results.csv, write 4 KiB of random bytes into the newest
checkpoint's state.npz, replace its meta.json with garbage, or corrupt every checkpoint; the same
cuts and corruptions of a *finished* run; and two copies of the command started 0-1 s apart on one
``--out`` (the second must be refused "in use" or find the run finished, and the directory must
then end with the reference rows).

Usage: ``nice -n 10 python bench/chaos.py --cases 30`` (about 10 s a case on 2 shared CPU cores);
prints the counts and writes ``bench/chaos.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxnorm import results  # noqa: E402

SWEEP = ["--arch", "cnn", "--dataset", "fashion_mnist", "--size", "small", "--p", "40,72", "--seeds", "2",
         "--epochs", "3", "--batch-size", "16", "--test-subset", "200", "--margin-epochs", "3",
         "--replicas-per-device", "4", "--steps-per-dispatch", "1", "--checkpoint-epochs", "1",
         "--checkpoint-minutes", "0", "--quiet", "--no-plot"]
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}


def _cmd(out: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "jaxnorm.sweep", *SWEEP, "--out", str(out), "--cache-dir", str(cache)]


def _env() -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}


def _run(out: Path, cache: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(out, cache), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _interrupt(out: Path, cache: Path, sig: str, after: float) -> int:
    """Starts the sweep, sends ``sig`` after ``after`` seconds (if still running); returns the exit code."""
    p = subprocess.Popen(_cmd(out, cache), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p.wait(timeout=after)
    except subprocess.TimeoutExpired:
        p.send_signal(SIGNALS[sig])
    return p.wait(timeout=120)


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and not p.name.startswith(".lock-")} if d.exists() else {}


def _rows(d: Path):
    return results.load(d).drop(columns=["wall_time"]).reset_index(drop=True)


def _same_rows(d: Path, ref) -> str | None:
    """None when ``d``'s results are the reference rows; else why not."""
    raw = (d / "results.csv").read_bytes()
    if b"\0" in raw:
        return "NUL bytes in results.csv"
    try:
        a = _rows(d)
    except Exception as err:  # noqa: BLE001
        return f"results.load failed: {err}"
    keys = ["P", "seed", "epoch", "step"]
    if list(a[keys].itertuples(index=False)) != list(ref[keys].itertuples(index=False)):
        return f"rows differ: {len(a)} rows vs {len(ref)}"
    num = [c for c in a.columns if c.startswith(("test_", "train_"))]
    nrm = [c for c in a.columns if c.startswith(("spectral", "norm/"))]
    if not np.allclose(a[num].to_numpy(float), ref[num].to_numpy(float), rtol=1e-5, atol=1e-6, equal_nan=True):
        return "metrics differ"
    if not np.allclose(a[nrm].to_numpy(float), ref[nrm].to_numpy(float), rtol=1e-4, equal_nan=True):
        return "norms differ"
    if not a["diverged"].equals(ref["diverged"]):
        return "diverged flags differ"
    return None


def _classify(done: subprocess.CompletedProcess, d: Path, before: dict, ref) -> tuple[str, str]:
    err = [l for l in done.stderr.strip().splitlines() if l.strip()]
    if done.returncode == 2:
        if len(err) == 1 and err[0].startswith("error:") and _snapshot(d) == before:
            return "refused", err[0]
        return "other", f"exit 2 but stderr {err[-3:]} / directory changed: {_snapshot(d) != before}"
    if done.returncode != 0:
        return "other", f"exit {done.returncode}: {err[-3:]}"
    why = _same_rows(d, ref)
    return ("identical", "; ".join(l for l in err if l.startswith("warning"))[:300]) if why is None else ("other", why)


def _newest_ckpt(d: Path) -> Path | None:
    ck = d / "checkpoints"
    steps = sorted((int(p.name) for p in ck.iterdir() if p.name.isdigit()), reverse=True) if ck.exists() else []
    return ck / str(steps[0]) if steps else None


def _damage(d: Path, what: str, rng: random.Random) -> str:
    """Applies one kind of damage to run directory ``d``; returns what was done (or why nothing)."""
    res = d / "results.csv"
    if what == "none":
        return "none"
    if what.startswith("results") and not res.exists():
        return "no results.csv yet"
    if what == "results_cut_tail":
        k = rng.randint(1, 400)
        size = res.stat().st_size
        os.truncate(res, max(0, size - k))
        return f"cut {min(k, size)} bytes off results.csv"
    if what == "results_cut_random":
        size = res.stat().st_size
        n = rng.randint(0, size)
        os.truncate(res, n)
        return f"results.csv cut to {n} of {size} bytes"
    if what == "results_flip":
        size = res.stat().st_size
        if size == 0:
            return "results.csv empty"
        i = rng.randrange(size)
        with open(res, "r+b") as f:
            f.seek(i)
            b = f.read(1)
            f.seek(i)
            f.write(bytes([b[0] ^ 0x5A]))
        return f"flipped byte {i} of {size} in results.csv"
    ck = _newest_ckpt(d)
    if ck is None:
        return "no checkpoint yet"
    if what == "state_random":
        st = ck / "state.npz"
        if not st.exists():
            return "no state.npz"
        with open(st, "r+b") as f:
            f.seek(rng.randrange(max(1, st.stat().st_size - 4096)))
            f.write(rng.randbytes(4096))
        return f"4 KiB of random bytes in {st.relative_to(d)}"
    if what == "meta_garbage":
        (ck / "meta.json").write_bytes(rng.randbytes(rng.randint(1, 500)))
        return f"garbage {ck.relative_to(d)}/meta.json"
    if what == "all_ckpts":
        for p in (d / "checkpoints").iterdir():
            if p.is_dir() and (p / "meta.json").exists():
                (p / "meta.json").write_text("{")
        return "every meta.json garbage"
    raise ValueError(what)


DAMAGE = ["none", "results_cut_tail", "results_cut_random", "results_flip", "state_random", "meta_garbage",
          "all_ckpts"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=str(REPO / "bench" / "chaos.json"))
    ap.add_argument("--budget-s", type=float, default=0, help="stop starting cases after this many seconds (0: none)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="jaxnorm_chaos_"))
    cache = work / "cache"
    t_start = time.time()
    try:
        ref_dir = work / "ref"
        t0 = time.time()
        done = _run(ref_dir, cache)  # also fills the compilation cache
        assert done.returncode == 0, done.stderr[-2000:]
        t0 = time.time()
        shutil.rmtree(ref_dir)
        done = _run(ref_dir, cache)
        t_ref = time.time() - t0
        assert done.returncode == 0, done.stderr[-2000:]
        ref = _rows(ref_dir)
        print(f"reference: {len(ref)} rows, {t_ref:.1f} s a run (warm cache)", flush=True)
        cases, counts = [], {"identical": 0, "refused": 0, "other": 0}
        for c in range(args.cases):
            if args.budget_s and time.time() - t_start > args.budget_s:
                break
            d = work / f"case{c}"
            kind = rng.choice(["interrupt", "interrupt", "interrupt", "finished", "concurrent"])
            steps = []
            if kind == "interrupt":
                for _ in range(1 if rng.random() < 0.7 else 2):
                    sig, after = rng.choice(list(SIGNALS)), rng.uniform(0.3, 1.1 * t_ref)
                    steps.append(f"{sig} after {after:.2f} s: exit {_interrupt(d, cache, sig, after)}")
                steps.append(_damage(d, rng.choice(DAMAGE), rng))
            elif kind == "finished":
                shutil.copytree(ref_dir, d)
                steps.append(_damage(d, rng.choice(DAMAGE[1:]), rng))
            if kind == "concurrent":
                dt = rng.uniform(0, 1.0)
                a = subprocess.Popen(_cmd(d, cache), env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
                time.sleep(dt)
                b = subprocess.Popen(_cmd(d, cache), env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
                outs = [(p.wait(timeout=300), p.communicate()[1]) for p in (a, b)]
                steps.append(f"two runs {dt:.2f} s apart: exits {[o[0] for o in outs]}, second: "
                             f"{outs[1][1].strip().splitlines()[-1:] if outs[1][1].strip() else ''}")
                ok_pair = sorted(o[0] for o in outs) in ([0, 0], [0, 2]) and all(
                    o[0] == 0 or (len(o[1].strip().splitlines()) == 1 and "in use" in o[1]) for o in outs)
                done = _run(d, cache)  # the same command again: nothing to do, or resumes
                outcome, detail = _classify(done, d, {}, ref)
                if not ok_pair:
                    outcome, detail = "other", f"concurrent pair {outs}"
            else:
                before = _snapshot(d)
                done = _run(d, cache)
                outcome, detail = _classify(done, d, before, ref)
            counts[outcome] += 1
            cases.append(dict(case=c, kind=kind, steps=steps, outcome=outcome, detail=detail))
            print(f"case {c:3d} {kind:10s} {outcome:9s} | {' | '.join(steps)} | {detail[:160]}", flush=True)
            shutil.rmtree(d, ignore_errors=True)
        summary = dict(cases=len(cases), **counts, seed=args.seed, reference_rows=len(ref),
                       reference_seconds=round(t_ref, 1), wall_seconds=round(time.time() - t_start, 1),
                       sweep=" ".join(SWEEP), details=cases)
        Path(args.json).write_text(json.dumps(summary, indent=1))
        print(json.dumps({k: v for k, v in summary.items() if k != "details"}))
        return 0 if counts["other"] == 0 else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""A/B benchmark of the engine's train path: this checkout against another commit, or against itself with extra
XLA flags, side by side in one run.

Each round runs ``bench_engine.py --engine-only R`` (the default variant of the architecture, all replica-steps
busy, no evaluation, synthetic data) once as A and once as B, alternating, so that load drifts hit both alike;
it prints each round's images/s and the median ratio B / A, and writes them to ``bench/engine_ab.json``.
A is a clean ``git worktree`` of REV, or this checkout when REV is left out; B is this checkout, with
``--xla-flags`` appended to ``XLA_FLAGS`` when given.

    python bench/bench_ab.py dcb78f3 --arch resnet --replicas 16 --rounds 3
    python bench/bench_ab.py --xla-flags=--xla_cpu_prefer_vector_width=512 --arch resnet --rounds 3

Used to check that a change to the step (e.g. ``replica.make_train_step``'s ``lax.cond``) costs nothing when
every step is busy, and to measure XLA's CPU options. Raises SystemExit(2) for a revision git does not know, or
when neither REV nor ``--xla-flags`` is given.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rate(tree: Path, arch: str, R: int, steps: int, xla_flags: str = "") -> float:
    """Images/s printed by the engine-only child of ``tree``'s bench_engine.py (its own jaxnorm first on the path),
    with ``xla_flags`` appended to ``XLA_FLAGS``."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip()
    out = subprocess.run([sys.executable, str(tree / "bench" / "bench_engine.py"), "--arch", arch, "--synthetic",
                          "--engine-only", str(R), "--steps", str(steps)],
                         cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree), XLA_FLAGS=flags),
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rev", nargs="?", help="the commit to compare against (A); default: this checkout")
    ap.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS for this checkout's rounds (B)")
    ap.add_argument("--arch", default="resnet", choices=("cnn", "resnet", "vit"))
    ap.add_argument("--replicas", type=int, default=16)
    ap.add_argument("--steps", type=int, default=24, help="timed steps per replica (a multiple of K)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench/engine_ab.json", help="where the rounds and the ratio are written")
    args = ap.parse_args(argv)
    if args.rev is None and not args.xla_flags:
        print("bench_ab: nothing to compare; give a commit REV, --xla-flags FLAGS, or both", file=sys.stderr)
        raise SystemExit(2)
    if args.rev is not None and subprocess.run(["git", "rev-parse", "--verify", "--quiet", args.rev + "^{commit}"],
                                               cwd=ROOT, capture_output=True).returncode:
        print(f"bench_ab: unknown revision {args.rev!r}; give a commit of this repository", file=sys.stderr)
        raise SystemExit(2)
    a_name = args.rev or "this checkout"
    b_name = "this checkout" + (f" with {args.xla_flags}" if args.xla_flags else "")
    with tempfile.TemporaryDirectory() as tmp:
        other = ROOT
        if args.rev is not None:
            other = Path(tmp) / "tree"
            subprocess.run(["git", "worktree", "add", "--detach", str(other), args.rev], cwd=ROOT, check=True,
                           capture_output=True)
        try:
            rows = []
            for i in range(args.rounds):
                a = rate(other, args.arch, args.replicas, args.steps)
                b = rate(ROOT, args.arch, args.replicas, args.steps, args.xla_flags)
                rows.append((a, b))
                print(f"round {i + 1}: {a_name} {a:.1f} img/s, {b_name} {b:.1f} img/s, ratio {b / a:.3f}",
                      flush=True)
        finally:
            if other != ROOT:
                subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, capture_output=True)
    ratio = statistics.median(b / a for a, b in rows)
    print(f"{args.arch} R={args.replicas}: {b_name} / {a_name} = {ratio:.3f} (median of {args.rounds})")
    out = dict(rev=args.rev, xla_flags=args.xla_flags, arch=args.arch, R=args.replicas, steps=args.steps, ratio=ratio,
               a=a_name, b=b_name, rounds=[dict(a_images_per_s=a, b_images_per_s=b) for a, b in rows],
               measured=time.strftime("%Y-%m-%d %H:%M"), load_average=os.getloadavg())
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
